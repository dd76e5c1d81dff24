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

// FNV-1a over 64-bit words, for keying stacks by their contents.
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

// Log2 histogram buckets: bucket i counts [2^i, 2^(i+1)) ns, bucket 0 also
// takes 0 ns and the last one everything longer.
#define LOG2_BUCKETS 32

static __always_inline u32 log2_bucket(u64 ns) {
    u32 b = 0;
    // Binary search for the highest set bit, capped at the last bucket.
    if (ns >> 32) return LOG2_BUCKETS - 1;
    if (ns >> 16) { b += 16; ns >>= 16; }
    if (ns >> 8) { b += 8; ns >>= 8; }
    if (ns >> 4) { b += 4; ns >>= 4; }
    if (ns >> 2) { b += 2; ns >>= 2; }
    if (ns >> 1) { b += 1; }
    return b;
}
