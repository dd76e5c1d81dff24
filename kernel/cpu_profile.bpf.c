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
//  * every loss is counted in `counters`.
//
// Build-time settings (-D): STACK_ENTRIES, RINGBUF_PAGES, INCLUDE_IDLE,
// WAKEUP_EVERY, and common.h's FILTER_PIDS and FOLLOW_CHILDREN.

#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

struct sample {
    u64 timestamp_ns;      // CLOCK_MONOTONIC
    u32 pid;               // thread group id
    u32 tid;
    u32 cpu;
    s32 user_stack_id;     // >= 0, or -errno when no stack was stored
    s32 kernel_stack_id;
    u32 generation;        // which stack map the ids refer to
    char comm[TASK_COMM_LEN];
};

enum counter {
    SAMPLES_SEEN,          // samples of a target, stored or not
    RING_FULL,             // dropped: no room in the ring buffer
    USER_STACK_LOST,       // stack map bucket taken or out of memory
    KERNEL_STACK_LOST,
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

    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    u32 g = gen ? (*gen & 1) : 0;
    s32 ustack, kstack;
    if (g) {
        ustack = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        kstack = stacks_1.get_stackid(ctx, 0);
    } else {
        ustack = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        kstack = stacks_0.get_stackid(ctx, 0);
    }

    struct sample *s = samples.ringbuf_reserve(sizeof(struct sample));
    if (!s) {
        count(RING_FULL);
        return 0;
    }
    s->timestamp_ns = bpf_ktime_get_ns();
    s->pid = pid;
    s->tid = (u32)id;
    s->cpu = bpf_get_smp_processor_id();
    s->user_stack_id = lost_stack(ustack, USER_STACK_LOST);
    s->kernel_stack_id = lost_stack(kstack, KERNEL_STACK_LOST);
    s->generation = g;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));

    // Waking the reader for every record costs far more than the record;
    // each CPU wakes it every WAKEUP_EVERY records, and it drains on a timer too.
    u8 one = 1;
    int new_process = known.insert(&pid, &one) == 0;
    samples.ringbuf_submit(s, new_process || seen % WAKEUP_EVERY == 0 ?
                           BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
    return 0;
}
