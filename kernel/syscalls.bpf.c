// Syscall tracing: exact counts, errors and latency histograms per process
// and syscall, aggregated here; slow calls streamed with their stacks.
// Built with LATENCY=0 it only counts calls and errors, from the exit hook
// alone: no entry hook and no clock reads, the cheapest exact count.
//
// Contract with user space (ebpf_stream/_probes/syscalls.py mirrors it):
//  * `totals`, a per-CPU hash keyed by (tgid, syscall nr), holds each pair's
//    calls, failed calls (return value in [-4095, -1]), summed duration and a
//    log2 histogram: buckets[i] counts calls of [2^i, 2^(i+1)) ns, bucket 0
//    also takes 0 ns and the last bucket everything longer.  Per-CPU values
//    need no atomics; user space sums them.  A call is counted when it
//    returns, so its outcome and duration are known; a call that never
//    returns (exit, exit_group, or any call its thread dies in) is counted
//    when its thread exits, with no error.  User space deletes the keys of
//    processes that have exited.
//    With LATENCY=0, duration_ns and buckets stay 0, the number of a call
//    is read from the registers saved at entry, and the calls that never
//    return are recognised by number: exit and exit_group (x86-64 numbers,
//    so a 32-bit process's are missed).  It also counts calls a seccomp
//    filter or ptrace refused before entry: they pass sys_exit only.
//  * with LATENCY=1, one fixed-size `struct slow_call` per call of at least
//    SLOW_NS in the `records` ring buffer, with the user and kernel stacks
//    at return, leaf first, zero-filled past the last frame.
//  * every loss is counted in `counters`.
//
// Build-time settings (-D): LATENCY, SLOW_NS, STACK_DEPTH, TOTALS_ENTRIES, and
// common.h's RINGBUF_PAGES, FILTER_PIDS and FOLLOW_CHILDREN.

#include <uapi/linux/ptrace.h>
#include <asm/unistd.h>

#define BUCKETS 32

struct key {
    u32 pid;               // thread group id
    u32 nr;                // syscall number
};

struct totals {
    u64 count;
    u64 errors;
    u64 duration_ns;
    u64 buckets[BUCKETS];
};

#if LATENCY
// The call a thread is in: start_ns is 0 between calls.
struct call {
    u64 start_ns;
    u64 nr;
};
#endif

struct slow_call {
    u64 timestamp_ns;      // CLOCK_MONOTONIC, at return
    u64 duration_ns;
    s64 ret;
    u32 pid;
    u32 tid;
    u32 nr;
    u32 reserved;
    char comm[16];          // TASK_COMM_LEN
    u64 user_stack[STACK_DEPTH];
    u64 kernel_stack[STACK_DEPTH];
};

enum counter {
    RING_FULL,             // a slow call dropped: no room in the ring buffer
    TOTALS_FULL,           // a call not counted: no room for a new (pid, syscall)
    N_COUNTERS,
};

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_PERCPU_HASH(totals, struct key, struct totals, TOTALS_ENTRIES);
#if LATENCY
// Freed with its thread: no entries to size, leak or delete.
BPF_TASK_STORAGE(calls, struct call);
#endif
#include "common.h"

static __always_inline void add_call(u32 pid, u32 nr, u64 ns, s64 ret) {
    struct key k = {pid, nr};
    struct totals *t = totals.lookup(&k);
    if (!t) {
        struct totals zero = {};
        totals.insert(&k, &zero);
        t = totals.lookup(&k);
        if (!t) {
            count(TOTALS_FULL);
            return;
        }
    }
    t->count++;
    t->errors += (u64)(ret + 4095) < 4095;   // ret in [-4095, -1]
#if LATENCY
    t->duration_ns += ns;
    t->buckets[log2_bucket(ns) & (BUCKETS - 1)]++;
#endif
}

#if LATENCY

RAW_TRACEPOINT_PROBE(sys_enter) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    struct call *c = calls.task_storage_get(bpf_get_current_task_btf(), 0,
                                            BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!c)
        return 0;
    c->nr = ctx->args[1];
    c->start_ns = bpf_ktime_get_ns();
    return 0;
}

static __always_inline void stream_slow(struct bpf_raw_tracepoint_args *ctx, u64 id,
                                        u32 nr, u64 now, u64 ns, s64 ret) {
    struct slow_call *r = records.ringbuf_reserve(sizeof(struct slow_call));
    if (!r) {
        count(RING_FULL);
        return;
    }
    r->timestamp_ns = now;
    r->duration_ns = ns;
    r->ret = ret;
    r->pid = id >> 32;
    r->tid = (u32)id;
    r->nr = nr;
    r->reserved = 0;
    bpf_get_current_comm(&r->comm, sizeof(r->comm));
    // bpf_get_stack leaves the tail as it was: zero it so user space can trim.
    int n = bpf_get_stack(ctx, r->user_stack, sizeof(r->user_stack), BPF_F_USER_STACK);
    if (n < 0)
        n = 0;
    for (int i = 0; i < STACK_DEPTH; i++)
        if (i * 8 >= n)
            r->user_stack[i] = 0;
    n = bpf_get_stack(ctx, r->kernel_stack, sizeof(r->kernel_stack), 0);
    if (n < 0)
        n = 0;
    for (int i = 0; i < STACK_DEPTH; i++)
        if (i * 8 >= n)
            r->kernel_stack[i] = 0;
    // Wakes the reader only when it has caught up: one wakeup per drain.
    records.ringbuf_submit(r, 0);
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    struct call *c = calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!c || !c->start_ns)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 ns = now - c->start_ns;
    u32 nr = c->nr;
    c->start_ns = 0;
    u64 id = bpf_get_current_pid_tgid();
    s64 ret = ctx->args[1];
    add_call(id >> 32, nr, ns, ret);
    if (ns >= SLOW_NS)
        stream_slow(ctx, id, nr, now, ns, ret);
    return 0;
}

// A call still in progress when its thread exits never returns: count it now.
RAW_TRACEPOINT_PROBE(sched_process_exit) {
    struct call *c = calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!c || !c->start_ns)
        return 0;
    u64 ns = bpf_ktime_get_ns() - c->start_ns;
    c->start_ns = 0;
    add_call(bpf_get_current_pid_tgid() >> 32, c->nr, ns, 0);
    return 0;
}
#else
// The syscall number saved at entry (x86-64 pt_regs, a stable layout).
static __always_inline u32 syscall_nr(struct pt_regs *regs) {
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    return nr;
}

// args: (struct pt_regs *regs, long ret).
RAW_TRACEPOINT_PROBE(sys_exit) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    u32 nr = syscall_nr((struct pt_regs *)ctx->args[0]);
    s64 ret = ctx->args[1];
    // A new task's first return to user space passes sys_exit with its
    // parent's fork or clone and 0: not a call it made.  The parent's return
    // is never 0 (a pid or an error).
    if (ret == 0 && (nr == __NR_clone || nr == __NR_clone3 || nr == __NR_fork ||
                     nr == __NR_vfork))
        return 0;
    add_call(pid, nr, 0, ret);
    return 0;
}

// exit and exit_group never reach sys_exit: count them as their thread ends.
// A thread that dies any other way (a fatal signal) is in no call by then:
// the call it was in has already returned through sys_exit.
RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return 0;
    u32 nr = syscall_nr((struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf()));
    if (nr == __NR_exit || nr == __NR_exit_group)
        add_call(pid, nr, 0, 0);
    return 0;
}
#endif
