// CPython frame walking, run from the CPU sampling program.
//
// Contract with user space (ebpf_stream/_python/offsets.py and
// ebpf_stream/_probes/python_walker.py mirror it):
//  * each row of `python_offsets` holds one interpreter layout's struct
//    offsets, in the order of offsets.py's KERNEL_FIELDS; user space fills
//    rows as it meets distinct layouts (versions, and builds of a version,
//    differ: from 3.13 each interpreter publishes its own offsets);
//  * `python_processes[tgid]` says where a process keeps `_PyRuntime` and
//    which row of `python_offsets` applies; user space adds a process only
//    after reading its thread list back through /proc/PID/mem, and the
//    kernel deletes it at exec and exit;
//  * a walk stores the stack, leaf first, in `python_stacks_<generation>`
//    under a hash of its contents, so a stack seen again is neither stored
//    nor read again.  The maps alternate with the native stack maps.
//
// The thread state is found by the sampled thread's own id in the
// interpreter's thread list, never through the GIL holder, which may be
// another thread.
//
// Build-time settings (-D): PYTHON_LAYOUTS, PYTHON_STACK_ENTRIES.

#define PYTHON_MAX_DEPTH 128           // frames kept; a deeper stack is marked truncated
#define PYTHON_MAX_WALK 160            // frames visited, C-stack shims included
#define PYTHON_MAX_INTERPRETERS 4
#define PYTHON_MAX_THREADS 64
#define PYTHON_NONE 0xFFFFFFFF
#define FRAME_BYTES 80                 // cover every field read from a frame, and from a code
#define CODE_BYTES 96                  // object (user space refuses layouts that put one beyond)
#define PYTHON_RECHECK_NS 1000000000ULL // how long a thread without a thread state stays unsearched

struct python_offsets {
    u32 runtime_interpreters_head;
    u32 interp_next;
    u32 interp_threads_head;
    u32 tstate_next;
    u32 tstate_native_thread_id;
    u32 tstate_frame;
    u32 cframe_current_frame;
    u32 frame_code;
    u32 frame_previous;
    u32 frame_instr;
    u32 frame_owner;
    u32 frame_is_entry;
    u32 owner_generator;
    u32 owner_cstack;
    u32 code_type;
    u32 code_first_line;
    u32 code_adaptive;
};

struct python_process {
    u64 runtime;                      // address of _PyRuntime
    u64 code_type;                    // address of PyCode_Type
    u32 row;                          // of python_offsets
    // The rest is what the process published of its requests
    // (request_context.h); context_var is 0 when it published nothing.
    u32 thread_context;               // offset of PyThreadState.context
    u64 context_var;
    u64 bitmap_type;
    u64 array_type;
    u64 bytes_type;
    u32 context_hash;
    u32 pad;
    // A process in another pid namespace (a container): its interpreter
    // knows its threads by the ids that namespace gives them.  0: ours.
    u64 pidns_dev;
    u64 pidns_ino;
};

#define PYTHON_FRAME_ENTRY 1          // the first frame its _PyEval_EvalFrameDefault call ran
#define PYTHON_FRAME_GENERATOR 2      // a generator's or coroutine's frame

struct python_frame {
    u64 code;                         // the PyCodeObject
    s32 lasti;                        // instruction index in code units; -1 before the first
    s32 first_line;                   // co_firstlineno as read now: tells a reused address apart
    u32 flags;
    u32 pad;
};

struct python_stack {
    u32 depth;
    u32 truncated;
    struct python_frame frames[PYTHON_MAX_DEPTH];
};

// Where a walk is built: far too big for the BPF stack.
struct python_scratch {
    struct python_stack stack;
    u8 frame[136];                    // the _PyInterpreterFrame header (FRAME_BYTES read)
    u8 code[136];                     // the head of the PyCodeObject (CODE_BYTES read)
};

struct python_thread {
    u64 tstate;                       // 0: none found at checked_ns
    u64 checked_ns;
};

BPF_ARRAY(python_offsets, struct python_offsets, PYTHON_LAYOUTS);
BPF_HASH(python_processes, u32, struct python_process, 4096);
BPF_TABLE("lru_hash", u32, struct python_thread, python_threads, 8192);
BPF_PERCPU_ARRAY(python_scratch, struct python_scratch, 1);
// Not preallocated: a value is 3 KB and the maps are rotated long before they fill.
BPF_F_TABLE("hash", u64, struct python_stack, python_stacks_0, PYTHON_STACK_ENTRIES,
            BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct python_stack, python_stacks_1, PYTHON_STACK_ENTRIES,
            BPF_F_NO_PREALLOC);

static __always_inline u64 read_u64(u64 address) {
    u64 value = 0;
    if (bpf_probe_read_user(&value, sizeof(value), (void *)address))
        return 0;
    return value;
}

#include "request_context.h"

// Offsets are masked to the scratch buffers, which is what lets the
// verifier accept offsets that only user space knows.
static __always_inline u64 field_u64(u8 *buffer, u32 offset) {
    return *(u64 *)(buffer + (offset & 127));
}

static __always_inline u8 field_u8(u8 *buffer, u32 offset) {
    return buffer[offset & 127];
}

// The current thread's id as its process's interpreter knows it: the
// host's, or that of the process's own pid namespace.
static __always_inline u32 thread_id_seen_by(struct python_process *p, u32 tid) {
    if (!p->pidns_ino)
        return tid;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(p->pidns_dev, p->pidns_ino, &ns, sizeof(ns)))
        return tid;
    return ns.pid;
}

// The thread state of the current thread, `tid` by the host and `own_tid`
// by its interpreter.
static __always_inline u64 python_thread_state(struct python_offsets *o, u64 runtime,
                                               u32 tid, u32 own_tid, u64 now) {
    struct python_thread *known = python_threads.lookup(&tid);
    if (known) {
        if (known->tstate && read_u64(known->tstate + o->tstate_native_thread_id) == own_tid)
            return known->tstate;
        if (!known->tstate && now - known->checked_ns < PYTHON_RECHECK_NS)
            return 0;
    }
    struct python_thread found = {0, now};
    u64 interp = read_u64(runtime + o->runtime_interpreters_head);
    #pragma clang loop unroll(disable)
    for (int i = 0; i < PYTHON_MAX_INTERPRETERS && interp && !found.tstate; i++) {
        u64 ts = read_u64(interp + o->interp_threads_head);
        #pragma clang loop unroll(disable)
        for (int j = 0; j < PYTHON_MAX_THREADS && ts; j++) {
            if (read_u64(ts + o->tstate_native_thread_id) == own_tid) {
                found.tstate = ts;
                break;
            }
            ts = read_u64(ts + o->tstate_next);
        }
        interp = read_u64(interp + o->interp_next);
    }
    python_threads.update(&tid, &found);
    return found.tstate;
}

// Walks the current thread's Python stack into scratch and stores it in the
// stack map of generation `g`.  Returns its key, or 0 for no Python stack.
// With `request`, copies the running task's request there too (left as is
// when there is none).
static __always_inline u64 python_stack(u32 tgid, u32 tid, u32 g, u64 now, u8 *request) {
    struct python_process *process = python_processes.lookup(&tgid);
    if (!process)
        return 0;
    u32 row = process->row;
    struct python_offsets *o = python_offsets.lookup(&row);
    u32 zero = 0;
    struct python_scratch *s = python_scratch.lookup(&zero);
    if (!o || !s)
        return 0;
    u64 tstate = python_thread_state(o, process->runtime, tid,
                                     thread_id_seen_by(process, tid), now);
    if (!tstate)
        return 0;
    if (request)
        request_context(process, tstate, request);
    u64 frame = read_u64(tstate + o->tstate_frame);
    if (o->cframe_current_frame != PYTHON_NONE && frame)
        frame = read_u64(frame + o->cframe_current_frame);

    // The depth lives in the scratch map, not in a register: the verifier
    // does not track it there, so the paths through one pass of the loop
    // merge instead of multiplying pass after pass.
    struct python_stack *st = &s->stack;
    st->depth = 0;
    st->truncated = 0;
    u64 hash = FNV_OFFSET;
    // Not unrolled: the verifier checks a bounded loop one pass at a time.
    #pragma clang loop unroll(disable)
    for (int i = 0; i < PYTHON_MAX_WALK; i++) {
        if (!frame)
            break;
        if (bpf_probe_read_user(s->frame, FRAME_BYTES, (void *)frame))
            break;
        // From 3.14 the frame holds a tagged reference to its code: the
        // low bits are flags.  Objects are 8-aligned, so masking is safe
        // for every version.
        u64 code = field_u64(s->frame, o->frame_code) & ~7ULL;
        u8 owner = field_u8(s->frame, o->frame_owner);
        frame = field_u64(s->frame, o->frame_previous);
        u32 depth = st->depth;
        if (o->owner_cstack != PYTHON_NONE && owner == o->owner_cstack) {
            // A shim frame the interpreter pushes when C calls into Python:
            // the frame below it is where an evaluation loop call began.
            if (depth > 0)
                st->frames[(depth - 1) & (PYTHON_MAX_DEPTH - 1)].flags |= PYTHON_FRAME_ENTRY;
            continue;
        }
        if (depth >= PYTHON_MAX_DEPTH) {
            st->truncated = 1;
            break;
        }
        if (!code || bpf_probe_read_user(s->code, CODE_BYTES, (void *)code))
            break;
        if (field_u64(s->code, o->code_type) != process->code_type)
            break;  // not a code object: the thread moved on under us
        struct python_frame *f = &st->frames[depth & (PYTHON_MAX_DEPTH - 1)];
        u64 instr = field_u64(s->frame, o->frame_instr);
        u64 start = code + o->code_adaptive;
        f->code = code;
        f->lasti = instr >= start && instr - start < (1ULL << 30) ? (instr - start) / 2 : -1;
        f->first_line = *(s32 *)(s->code + (o->code_first_line & 127));
        f->flags = owner == o->owner_generator ? PYTHON_FRAME_GENERATOR : 0;
        if (o->frame_is_entry != PYTHON_NONE && field_u8(s->frame, o->frame_is_entry))
            f->flags |= PYTHON_FRAME_ENTRY;
        f->pad = 0;
        hash = (hash ^ code) * FNV_PRIME;
        hash = (hash ^ (((u64)(u32)f->lasti << 32) | f->flags)) * FNV_PRIME;
        st->depth = depth + 1;
    }
    u32 depth = st->depth;
    if (!depth)
        return 0;
    // The outermost frame always began an evaluation loop call.
    st->frames[(depth - 1) & (PYTHON_MAX_DEPTH - 1)].flags |= PYTHON_FRAME_ENTRY;
    u64 key = (hash ^ depth ^ st->truncated) | 1;
    int stored = g ? python_stacks_1.insert(&key, st) : python_stacks_0.insert(&key, st);
    if (stored && stored != -EEXIST) {
        count(PYTHON_STACK_LOST);
        return 0;
    }
    return key;
}
