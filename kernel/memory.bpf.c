// Memory tracing: page faults, resident sizes, mmap/munmap/brk and OOM kills.
//
// Contract with user space (ebpf_stream/_probes/memory.py mirrors it):
//  * `totals` holds one `struct totals` per process (tgid), cumulative since
//    attach; user space reads it every export interval and deletes the
//    entries of processes that have exited.  When it is full, the events of
//    processes without an entry are counted in TOTALS_FULL, and lost;
//  * page faults come from the software perf events PAGE_FAULTS_MIN and
//    PAGE_FAULTS_MAJ with a period of 1 (on_minor_fault, on_major_fault, one
//    event per CPU): the kernel raises them exactly where it adds to the
//    task's min_flt/maj_flt, so the counts match getrusage();
//  * `rss` is indexed by kmem:rss_stat's `member` (user space reads the
//    names from the tracepoint's format), in bytes, the latest size seen;
//  * one fixed-size `struct oom_kill` per OOM victim in the `records` ring.
//
// Build-time settings (-D): MAX_PROCESSES, RINGBUF_PAGES, and common.h's
// FILTER_PIDS and FOLLOW_CHILDREN.

#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf_perf_event.h>

#define N_RSS 4

struct totals {
    u64 minor_faults;
    u64 major_faults;
    s64 rss[N_RSS];        // bytes; 0 until kmem:rss_stat reports the member
    u64 mmap_calls;
    u64 mmap_bytes;        // lengths rounded up to pages, as the kernel maps them
    u64 munmap_calls;
    u64 munmap_bytes;
    s64 brk_growth;
    u64 brk;               // the latest program break, 0 until one is seen
    char comm[TASK_COMM_LEN];
};

struct oom_kill {
    u64 timestamp_ns;      // CLOCK_MONOTONIC
    u64 total_vm_kb;
    u64 anon_rss_kb;
    u64 file_rss_kb;
    u64 shmem_rss_kb;
    u32 pid;
    s32 oom_score_adj;
    char comm[TASK_COMM_LEN];
};

enum counter {
    RING_FULL,             // an OOM kill record dropped: no room in the ring
    TOTALS_FULL,           // an event lost: `totals` is full and has no entry for its process
    N_COUNTERS,
};

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_HASH(totals, u32, struct totals, MAX_PROCESSES);
#include "common.h"

// The calling process's totals, created on its first event; NULL when it is
// not a target or the map is full.
static __always_inline struct totals *current_totals(void) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid || !is_target(tgid))
        return 0;
    struct totals *t = totals.lookup(&tgid);
    if (t)
        return t;
    struct totals fresh = {};
    bpf_get_current_comm(&fresh.comm, sizeof(fresh.comm));
    // -EEXIST: another thread of the process created it first, which is fine.
    if (totals.insert(&tgid, &fresh) == -E2BIG)
        count(TOTALS_FULL);
    return totals.lookup(&tgid);
}

// Threads of one process fault on several CPUs at once: counts add atomically.
int on_minor_fault(struct bpf_perf_event_data *ctx) {
    struct totals *t = current_totals();
    if (t)
        __sync_fetch_and_add(&t->minor_faults, 1);
    return 0;
}

int on_major_fault(struct bpf_perf_event_data *ctx) {
    struct totals *t = current_totals();
    if (t)
        __sync_fetch_and_add(&t->major_faults, 1);
    return 0;
}

// `curr` says the counter belongs to the running process's mm; changes made
// to another process's memory (reclaim, teardown after exit) cannot be
// attributed without reading kernel structs, so they are left out.
TRACEPOINT_PROBE(kmem, rss_stat) {
    if (!args->curr)
        return 0;
    struct totals *t = current_totals();
    // Bounds-checked after the call, on a copy, so the verifier sees the check.
    u32 member = args->member;
    if (t && member < N_RSS)
        t->rss[member] = args->size;
    return 0;
}

static __always_inline u64 page_aligned(u64 len) {
    return (len + PAGE_SIZE - 1) & ~(u64)(PAGE_SIZE - 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap) {
    struct totals *t = current_totals();
    if (t) {
        __sync_fetch_and_add(&t->mmap_calls, 1);
        __sync_fetch_and_add(&t->mmap_bytes, page_aligned(args->len));
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_munmap) {
    struct totals *t = current_totals();
    if (t) {
        __sync_fetch_and_add(&t->munmap_calls, 1);
        __sync_fetch_and_add(&t->munmap_bytes, page_aligned(args->len));
    }
    return 0;
}

// brk returns the break after the call (the old one when it fails), so the
// growth is the difference from the previous return; the first call seen
// (glibc's brk(0) at start-up, for a process that starts after tracing
// began) only records the break.
TRACEPOINT_PROBE(syscalls, sys_exit_brk) {
    struct totals *t = current_totals();
    if (!t)
        return 0;
    // Threads of a process do not call brk at once (glibc's arena lock), so
    // plain reads and writes do.
    u64 now = args->ret, before = t->brk;
    t->brk = now;
    if (before)
        t->brk_growth += now - before;
    return 0;
}

// A new program image has a new mm: its break and resident sizes start over.
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct totals *t = totals.lookup(&tgid);
    if (!t)
        return 0;
    bpf_get_current_comm(&t->comm, sizeof(t->comm));
    t->brk = 0;
    #pragma unroll
    for (int i = 0; i < N_RSS; i++)
        t->rss[i] = 0;
    return 0;
}

// Runs in whichever task ran out of memory; the victim is args->pid.
TRACEPOINT_PROBE(oom, mark_victim) {
    u32 pid = args->pid;
    if (!is_target(pid))
        return 0;
    struct oom_kill *r = records.ringbuf_reserve(sizeof(struct oom_kill));
    if (!r) {
        count(RING_FULL);
        return 0;
    }
    r->timestamp_ns = bpf_ktime_get_ns();
    r->total_vm_kb = args->total_vm;
    r->anon_rss_kb = args->anon_rss;
    r->file_rss_kb = args->file_rss;
    r->shmem_rss_kb = args->shmem_rss;
    r->pid = pid;
    r->oom_score_adj = args->oom_score_adj;
    TP_DATA_LOC_READ_STR(&r->comm, comm, sizeof(r->comm));
    records.ringbuf_submit(r, BPF_RB_FORCE_WAKEUP);  // rare, and worth seeing at once
    return 0;
}
