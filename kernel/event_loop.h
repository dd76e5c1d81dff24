// Event-loop stall detection for the threads of Python processes.
//
// A loop is busy from a return from epoll_wait (or epoll_pwait, pwait2) to
// its next entry: that is the time its callbacks ran.  The threads watched
// are those of registered Python processes and, when recording chosen
// targets, of every target: a launched command is watched from its exec
// on, not only once user space has found its interpreter, which may be
// after its loop's first busy period began.  Contract with user space
// (ebpf_stream/_probes/cpu.py mirrors it), in `samples` records:
//  * LOOP_THREAD: a thread's first wait whose Python stack could be walked,
//    with that stack, from which user space tells an asyncio loop from
//    other pollers; sent again at later waits until one is in the ring;
//  * LOOP_BLOCKED: the thread slept at least BLOCKED_MIN_NS while its loop
//    was busy; `python_stack` is where it went to sleep, which CPU samples
//    can never show;
//  * LOOP_STALL: the loop was busy for at least STALL_NS, from `busy_since`
//    to `timestamp_ns`; `python_stack` is the wait that ended it, so each
//    stall says by itself whether it is an asyncio loop's;
//  * CPU samples of a busy loop's thread carry its `busy_since`, so user
//    space gathers a stall's stacks by it.  The stall record comes last:
//    every record of its busy period was reserved before it in this ring.
//  * `loop_busy[(pid, tid)]` is a per-CPU log2 histogram of busy periods.
//
// Build-time settings (-D): STALL_NS, BLOCKED_MIN_NS.

struct loop_thread {
    u64 busy_since;        // 0 while waiting
    u64 blocked_since;     // 0 unless asleep while busy
    u64 blocked_stack;
    u32 blocked_generation;
    u32 pid;
    u32 named;             // a LOOP_THREAD with a Python stack is in the ring
    u32 pad;
    u8 blocked_request[REQUEST_BYTES];  // the request it went to sleep in
};

struct loop_key {
    u32 pid;
    u32 tid;
};

struct loop_histogram {
    u64 count;
    u64 total_ns;
    u64 buckets[LOG2_BUCKETS];
};

BPF_TABLE("lru_hash", u32, struct loop_thread, loop_threads, 4096);
BPF_PERCPU_HASH(loop_busy, struct loop_key, struct loop_histogram, 4096);

// Whether the record made it into the ring (a full ring counts it lost).
static __always_inline int loop_record(u32 kind, u32 pid, u32 tid, u64 now, u64 stack,
                                       u32 g, u64 busy_since, u64 duration, u8 *request) {
    struct sample *r = reserve_record(kind, pid, tid, now);
    if (!r)
        return 0;
    r->generation = g;
    r->python_stack = stack;
    r->busy_since = busy_since;
    r->duration_ns = duration;
    if (request)
        __builtin_memcpy(r->request, request, REQUEST_BYTES);
    // Nothing here may wake the reader: this can run inside the scheduler.
    samples.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 1;
}

static __always_inline int loop_watched(u32 pid) {
    if (python_processes.lookup(&pid))
        return 1;
#if FILTER_PIDS
    return is_target(pid);
#else
    return 0;
#endif
}

// Runs on entry to epoll_wait, epoll_pwait and epoll_pwait2: one program
// attached to the three, so the verifier checks its Python walk once.
int on_loop_wait(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32, tid = id;
    if (!loop_watched(pid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct loop_thread *t = loop_threads.lookup(&tid);
    if (!t || t->pid != pid) {
        struct loop_thread fresh = {.pid = pid};
        loop_threads.update(&tid, &fresh);
        t = loop_threads.lookup(&tid);
        if (!t)
            return 0;
    }
    // One walk serves both records; a thread not yet named walks nothing
    // until its process is registered.  The stall test reads the map, not
    // a register, so that every path reaches the walk in one state and
    // the verifier checks it once.
    u64 stack = 0;
    u32 g = 0;
    if (!t->named || (t->busy_since && now - t->busy_since >= STALL_NS)) {
        g = current_generation();
        stack = python_stack(pid, tid, g, now, 0);
    }
    if (!t->named && stack)
        t->named = loop_record(LOOP_THREAD, pid, tid, now, stack, g, 0, 0, 0);
    u64 since = t->busy_since;
    if (!since)
        return 0;
    u64 busy = now - since;
    t->busy_since = 0;
    t->blocked_since = 0;
    struct loop_key key = {pid, tid};
    struct loop_histogram *h = loop_busy.lookup(&key);
    if (!h) {
        struct loop_histogram zero = {};
        loop_busy.insert(&key, &zero);
        h = loop_busy.lookup(&key);
        if (!h)
            return 0;
    }
    h->count++;
    h->total_ns += busy;
    h->buckets[log2_bucket(busy) & (LOG2_BUCKETS - 1)]++;
    if (busy >= STALL_NS)
        loop_record(LOOP_STALL, pid, tid, now, stack, g, since, busy, 0);
    return 0;
}

// Runs on exit from the same three calls: the loop is busy from here on.
int on_loop_return(void *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    struct loop_thread *t = loop_threads.lookup(&tid);
    if (t)
        t->busy_since = bpf_ktime_get_ns();
    return 0;
}

// A busy loop's thread going to sleep: remember where, in Python terms.
// This runs as the sleeping thread, so its memory is the one read.
TRACEPOINT_PROBE(sched, sched_switch) {
    if (args->prev_state & 0xff) {  // asleep; a preempted thread is still runnable
        u32 prev = args->prev_pid;
        struct loop_thread *t = loop_threads.lookup(&prev);
        if (t && t->busy_since) {
            u64 now = bpf_ktime_get_ns();
            u32 g = current_generation();
            __builtin_memset(t->blocked_request, 0, REQUEST_BYTES);
            t->blocked_stack = python_stack(t->pid, prev, g, now, t->blocked_request);
            t->blocked_generation = g;
            t->blocked_since = now;
        }
    }
    u32 next = args->next_pid;
    struct loop_thread *n = loop_threads.lookup(&next);
    if (n && n->blocked_since) {
        u64 now = bpf_ktime_get_ns();
        u64 slept = now - n->blocked_since;
        n->blocked_since = 0;
        if (slept >= BLOCKED_MIN_NS)
            loop_record(LOOP_BLOCKED, n->pid, next, now, n->blocked_stack,
                        n->blocked_generation, n->busy_since, slept, n->blocked_request);
    }
    return 0;
}
