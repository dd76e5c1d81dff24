// CPU profiling: sample every CPU with a perf_event CPU_CLOCK timer.
//
// Contract with user space (ebpf_stream/_probes/cpu.py mirrors it):
//  * one fixed-size `struct sample` per sample in the `samples` ring buffer,
//    so user space decodes whole batches as one array;
//  * stacks are stored once in a stack map and referenced by id; user space
//    reads each id once per generation, not once per sample;
//  * two stack maps alternate: user space flips `generation` and clears the
//    map that becomes active, so long runs never fill a map and the stacks of
//    samples still in flight stay readable for a whole generation;
//  * every loss is counted in `counters`;
//  * with PYTHON, samples of Python processes carry their Python stack
//    (python_frames.h), and a target's exec is reported (PROCESS_EXEC) so
//    that user space looks at the new program; with LOOP_STALLS the ring
//    also carries event-loop records (event_loop.h).
//
// Build-time settings (-D): STACK_ENTRIES, RINGBUF_PAGES, INCLUDE_IDLE,
// WAKEUP_EVERY, PYTHON, LOOP_STALLS, and common.h's FILTER_PIDS and
// FOLLOW_CHILDREN.

#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

enum kind {
    SAMPLE,
    LOOP_THREAD,
    LOOP_BLOCKED,
    LOOP_STALL,
    PROCESS_EXEC,
};

struct sample {
    u64 timestamp_ns;      // CLOCK_MONOTONIC
    u32 pid;               // thread group id
    u32 tid;
    u32 cpu;
    s32 user_stack_id;     // >= 0, or -errno when no stack was stored
    s32 kernel_stack_id;
    u32 generation;        // which stack maps the ids and python_stack refer to
    char comm[TASK_COMM_LEN];
    u64 python_stack;      // key in python_stacks_<generation>; 0: none
    u64 busy_since;        // the loop's busy period this belongs to; 0: none
    u64 duration_ns;       // LOOP_BLOCKED: time asleep; LOOP_STALL: time busy
    u32 kind;
    u32 pad;
};

enum counter {
    SAMPLES_SEEN,          // samples of a target, stored or not
    RING_FULL,             // dropped: no room in the ring buffer
    USER_STACK_LOST,       // stack map bucket taken or out of memory
    KERNEL_STACK_LOST,
    PYTHON_STACK_LOST,     // Python stack map full
    N_COUNTERS,
};

BPF_RINGBUF_OUTPUT(samples, RINGBUF_PAGES);
BPF_STACK_TRACE(stacks_0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_ENTRIES);
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

#if PYTHON
#include "python_frames.h"
#if LOOP_STALLS
#include "event_loop.h"
#endif

// A target that execs becomes a new program: forget what was known of the
// old one and tell user space, which looks for an interpreter in the new one.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    python_processes.delete(&pid);
    known.delete(&pid);
    struct sample *r = samples.ringbuf_reserve(sizeof(struct sample));
    if (!r) {
        count(RING_FULL);
        return 0;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->timestamp_ns = bpf_ktime_get_ns();
    r->pid = pid;
    r->tid = (u32)bpf_get_current_pid_tgid();
    r->user_stack_id = -EFAULT;
    r->kernel_stack_id = -EFAULT;
    r->kind = PROCESS_EXEC;
    bpf_get_current_comm(&r->comm, sizeof(r->comm));
    samples.ringbuf_submit(r, BPF_RB_FORCE_WAKEUP);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    if (pid == (u32)id)
        python_processes.delete(&pid);
    return 0;
}
#endif

// A stack that could not be stored is a loss worth reporting; a stack that
// does not exist (no user stack in a kernel thread, no kernel stack while in
// user mode) is not.
static __always_inline s32 lost_stack(s32 id, int which) {
    if (id == -EEXIST || id == -ENOMEM)
        count(which);
    return id;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32;
    if (pid == 0 && !INCLUDE_IDLE)
        return 0;
    if (!is_target(pid))
        return 0;
    u64 seen = count(SAMPLES_SEEN);

    u32 g = current_generation();
    s32 ustack, kstack;
    if (g) {
        ustack = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        kstack = stacks_1.get_stackid(ctx, 0);
    } else {
        ustack = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        kstack = stacks_0.get_stackid(ctx, 0);
    }

    u64 now = bpf_ktime_get_ns();
    u32 tid = id;
    u64 python = 0, busy_since = 0;
#if PYTHON
    // Walked before reserving: a reserved record holds up the reader.
    python = python_stack(pid, tid, g, now);
#if LOOP_STALLS
    struct loop_thread *t = loop_threads.lookup(&tid);
    if (t)
        busy_since = t->busy_since;
#endif
#endif

    struct sample *s = samples.ringbuf_reserve(sizeof(struct sample));
    if (!s) {
        count(RING_FULL);
        return 0;
    }
    s->timestamp_ns = now;
    s->pid = pid;
    s->tid = tid;
    s->cpu = bpf_get_smp_processor_id();
    s->user_stack_id = lost_stack(ustack, USER_STACK_LOST);
    s->kernel_stack_id = lost_stack(kstack, KERNEL_STACK_LOST);
    s->generation = g;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));
    s->python_stack = python;
    s->busy_since = busy_since;
    s->duration_ns = 0;
    s->kind = SAMPLE;
    s->pad = 0;

    // Waking the reader for every record costs far more than the record;
    // each CPU wakes it every WAKEUP_EVERY records, and it drains on a timer too.
    u8 one = 1;
    int new_process = known.insert(&pid, &one) == 0;
    samples.ringbuf_submit(s, new_process || seen % WAKEUP_EVERY == 0 ?
                           BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
    return 0;
}
