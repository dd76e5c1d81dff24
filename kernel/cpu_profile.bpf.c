// CPU profiling: sample every CPU with a perf_event CPU_CLOCK timer.
//
// Contract with user space (ebpf_stream/_probes/cpu.py mirrors it):
//  * one fixed-size `struct sample` per sample in the `samples` ring buffer,
//    so user space decodes whole batches as one array;
//  * stacks are stored once each in a hash map, under a hash of their
//    contents, and a sample carries the key; user space reads a key once per
//    generation, not once per sample;
//  * two stack maps alternate: user space flips `generation` and clears the
//    map that becomes active, so long runs never fill a map and the stacks of
//    samples still in flight stay readable for a whole generation;
//  * every loss is counted in `counters`;
//  * with PYTHON, samples of Python processes carry their Python stack
//    (python_frames.h) and the request their task runs, if the process
//    publishes requests (request_context.h), and a target's exec is reported (PROCESS_EXEC) so
//    that user space looks at the new program; with LOOP_STALLS the ring
//    also carries event-loop records (event_loop.h).
//
//  * with OFF_CPU, the ring also carries the waits of target threads
//    (off_cpu.h).
//
// Build-time settings (-D): STACK_ENTRIES, RINGBUF_PAGES, INCLUDE_IDLE,
// WAKEUP_EVERY, PYTHON, LOOP_STALLS, OFF_CPU, and common.h's FILTER_PIDS and
// FOLLOW_CHILDREN.

#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#include "cpu_sample.h"

enum counter {
    SAMPLES_SEEN,          // samples of a target, stored or not
    RING_FULL,             // dropped: no room in the ring buffer
    USER_STACK_LOST,       // stack map full or out of memory
    KERNEL_STACK_LOST,
    PYTHON_STACK_LOST,     // Python stack map full
    N_COUNTERS,
};

#define MAX_STACK_DEPTH 127        // the kernel's PERF_MAX_STACK_DEPTH

struct native_stack {
    u32 depth;
    u32 pad;
    u64 ips[MAX_STACK_DEPTH];      // leaf first
};

BPF_RINGBUF_OUTPUT(samples, RINGBUF_PAGES);
// Hash maps, not BPF_STACK_TRACE: a stack-trace map has one slot per bucket
// and refuses a stack whose bucket another took first, which with a few
// hundred stacks per generation loses a few percent of them.  Not
// preallocated: a value is 1 KB and the maps are rotated long before they fill.
BPF_F_TABLE("hash", u64, struct native_stack, stacks_0, STACK_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct native_stack, stacks_1, STACK_ENTRIES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stack_scratch, struct native_stack, 1);
BPF_ARRAY(generation, u32, 1);
#include "common.h"
// Processes that have been sampled before.  A process's first sample wakes
// the reader at once, so that user space reads its memory map while it is
// still alive: a short-lived process would otherwise exit unnamed.
BPF_TABLE("lru_hash", u32, u8, known, 8192);

static __always_inline u32 current_generation(void) {
    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    return gen ? (*gen & 1) : 0;
}

// A zeroed record of `kind` with the fields every kind has, or NULL (counted)
// when the ring is full.  The caller fills in the rest and submits it.
static __always_inline struct sample *reserve_record(u32 kind, u32 pid, u32 tid, u64 now) {
    struct sample *r = samples.ringbuf_reserve(sizeof(struct sample));
    if (!r) {
        count(RING_FULL);
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->timestamp_ns = now;
    r->pid = pid;
    r->tid = tid;
    r->cpu = bpf_get_smp_processor_id();
    r->kind = kind;
    return r;
}

#if PYTHON
#include "python_frames.h"
#if LOOP_STALLS
#include "event_loop.h"
#endif

// A target that execs becomes a new program: forget what was known of the
// old one (its loop thread too) and tell user space, which looks for an
// interpreter in the new one.
// That includes its thread's cached thread state, or lack of one: a sample
// taken while exec was loading the new image, still walked as the old
// program, caches "no thread state" and would hide the new interpreter's
// frames for PYTHON_RECHECK_NS.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    python_processes.delete(&pid);
    python_threads.delete(&pid);  // exec leaves one thread, whose id is pid
#if LOOP_STALLS
    loop_threads.delete(&pid);    // its loop, and what user space was told of it, are gone
#endif
    known.delete(&pid);
    struct sample *r = reserve_record(PROCESS_EXEC, pid, (u32)bpf_get_current_pid_tgid(),
                                      bpf_ktime_get_ns());
    if (!r)
        return 0;
    bpf_get_current_comm(&r->comm, sizeof(r->comm));
    samples.ringbuf_submit(r, BPF_RB_FORCE_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32, tid = id;
    python_threads.delete(&tid);  // a later thread may be given the same id
#if LOOP_STALLS
    loop_threads.delete(&tid);
#endif
    if (pid == tid) {
        python_processes.delete(&pid);
        known.delete(&pid);  // or every process ever sampled would hold an entry
    }
    return 0;
}
#endif

// Stores the stack of `bytes` in scratch `s` in generation g's map and
// returns its key.  A stack already there is only hashed, neither copied nor
// stored.
static __always_inline u64 store_scratch_stack(struct native_stack *s, long bytes, u32 g,
                                               int lost) {
    if (bytes <= 0)
        return NO_STACK;
    u32 depth = bytes / sizeof(u64);
    s->depth = depth;
    s->pad = 0;
    u64 hash = FNV_OFFSET;
    #pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= depth)
            break;
        // Opaque to the compiler, which would otherwise fold the two bounds
        // into one on `depth` that the verifier cannot check the index by.
        u32 at = i;
        asm volatile("" : "+r"(at));
        if (at >= MAX_STACK_DEPTH)
            break;
        hash = (hash ^ s->ips[at]) * FNV_PRIME;
    }
    // Odd and below 2^63: never NO_STACK or STACK_LOST, and non-negative
    // where user space hands keys on as signed integers.
    u64 key = ((hash ^ depth) >> 1) | 1;
    if (g ? stacks_1.lookup(&key) != 0 : stacks_0.lookup(&key) != 0)
        return key;
    int stored = g ? stacks_1.insert(&key, s) : stacks_0.insert(&key, s);
    if (stored && stored != -EEXIST) {  // EEXIST: another CPU stored it meanwhile
        count(lost);
        return STACK_LOST;
    }
    return key;
}

// Stores the current user or kernel stack (see store_scratch_stack).
static __always_inline u64 store_stack(void *ctx, u64 flags, u32 g, int lost) {
    u32 zero = 0;
    struct native_stack *s = stack_scratch.lookup(&zero);
    if (!s)
        return NO_STACK;
    return store_scratch_stack(s, bpf_get_stack(ctx, s->ips, sizeof(s->ips), flags), g, lost);
}

#if OFF_CPU
#include "off_cpu.h"
#endif

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    if (pid == 0 && !INCLUDE_IDLE)
        return 0;
    if (!is_target(pid))
        return 0;
    u64 seen = count(SAMPLES_SEEN);

    u32 g = current_generation();
    u64 now = bpf_ktime_get_ns();
    u32 tid = id;
    u64 python = 0, busy_since = 0;
    u8 request[REQUEST_BYTES] = {};
#if PYTHON
    // Walked before reserving: a reserved record holds up the reader.  And
    // walked first, while every path here is in one state: the verifier
    // then checks the walk once, not once per outcome of the native stacks.
    python = python_stack(pid, tid, g, now, request);
#if LOOP_STALLS
    struct loop_thread *t = loop_threads.lookup(&tid);
    if (t)
        busy_since = t->busy_since;
#endif
#endif
    u64 ustack = store_stack(ctx, BPF_F_USER_STACK, g, USER_STACK_LOST);
    u64 kstack = store_stack(ctx, 0, g, KERNEL_STACK_LOST);

    struct sample *s = reserve_record(SAMPLE, pid, tid, now);
    if (!s)
        return 0;
    s->generation = g;
    s->user_stack = ustack;
    s->kernel_stack = kstack;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));
    s->python_stack = python;
    s->busy_since = busy_since;
    __builtin_memcpy(s->request, request, REQUEST_BYTES);

    // Waking the reader for every record costs far more than the record;
    // each CPU wakes it every WAKEUP_EVERY records, and it drains on a timer too.
    u8 one = 1;
    int new_process = known.insert(&pid, &one) == 0;
    samples.ringbuf_submit(s, new_process || seen % WAKEUP_EVERY == 0 ?
                           BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
    return 0;
}
