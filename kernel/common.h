// What every probe family shares: which processes to record, and loss counters.
//
// Include it after the probe's `enum counter`, which must end with N_COUNTERS.
//
// Build-time settings (-D): FILTER_PIDS (record only pids in `targets`),
// FOLLOW_CHILDREN (targets' children become targets at fork).

#if FILTER_PIDS
BPF_TABLE("lru_hash", u32, u8, targets, 8192);

static __always_inline int is_target(u32 tgid) {
    return targets.lookup(&tgid) != 0;
}

#if FOLLOW_CHILDREN
// Targets' children become targets, so a launched command is followed
// through fork and exec.
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    targets.update(&child, &one);
    return 0;
}
#endif
#else
static __always_inline int is_target(u32 tgid) {
    return 1;
}
#endif

BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);

static __always_inline u64 count(int which) {
    u64 *c = counters.lookup(&which);
    if (!c)
        return 0;
    return ++(*c);
}
