// Off-CPU time: where target threads wait, weighted in nanoseconds of waiting.
//
// A thread's user and Python stacks can only be read in its own context,
// and whether a wait is worth recording is only known as it ends.  So:
//  * a target's thread gets task storage at its first syscall: kernel
//    threads, which make none, are never watched;
//  * a watched thread switched out to wait (not one preempted, which is
//    still runnable) has the time stamped in its storage;
//  * switched back in, its wait is measured.  A wait of at least OFF_CPU_NS
//    is kept with its length; a shorter one with probability
//    length / OFF_CPU_NS and the weight OFF_CPU_NS.  Every stack's expected
//    weight is then its waiting time, while a thread costs at most one
//    capture per OFF_CPU_NS however often it switches.  A kept wait takes
//    the thread's kernel stack there (`next` has not run yet, so that is
//    where it slept) and is left pending;
//  * the thread's return from the syscall it waited in, in its own context,
//    adds its user and Python stacks and its request, and records it
//    (OFF_CPU_WAIT).  Waits until then add up (a call may sleep more than
//    once), under the first one's kernel stack; so a wait outside any
//    syscall (a page fault's I/O, say) goes with the thread's next call;
//  * unless OFF_CPU_IDLE_LOOPS, a Python process's wait in epoll is its
//    event loop idling, not blocking, and is not recorded.
// `tp_btf__sched_switch` is a BTF tracepoint program (tp_btf/sched_switch): only
// that kind is given the tasks' pointers, which the task storage and the
// sleeping thread's stack take.
//
// Build-time settings (-D): OFF_CPU_NS, OFF_CPU_IDLE_LOOPS.

struct off_cpu_thread {
    u64 since;             // switched out to wait at; 0 while running
    u64 weight;            // a pending wait's nanoseconds; 0: none
    u64 kernel_stack;      // the pending wait's, in stacks_<generation>
    u32 generation;
    u32 state;             // the pending wait's task state (TASK_INTERRUPTIBLE...)
    u32 waiting_state;     // the current wait's
    u32 pad;
};

BPF_TASK_STORAGE(off_cpu_threads, struct off_cpu_thread);

#define EPOLL_WAIT 232             // x86-64 syscall numbers
#define EPOLL_PWAIT 281
#define EPOLL_PWAIT2 441

// tp_btf/sched_switch(bool preempt, struct task_struct *prev,
//                    struct task_struct *next, unsigned int prev_state).
int tp_btf__sched_switch(u64 *ctx) {
    struct task_struct *prev = (struct task_struct *)ctx[1];
    struct task_struct *next = (struct task_struct *)ctx[2];
    u64 now = bpf_ktime_get_ns();
    struct off_cpu_thread *t = off_cpu_threads.task_storage_get(prev, 0, 0);
    if (t) {
        t->since = (ctx[3] & 0xff) ? now : 0;
        t->waiting_state = ctx[3] & 0xff;
    }
    struct off_cpu_thread *n = off_cpu_threads.task_storage_get(next, 0, 0);
    if (!n || !n->since)
        return 0;
    u64 waited = now - n->since;
    n->since = 0;
    u64 weight = waited;
    if (waited < OFF_CPU_NS)
        weight = bpf_get_prandom_u32() % OFF_CPU_NS < waited ? OFF_CPU_NS : 0;
    if (!weight)
        return 0;
    if (!n->weight) {
        u32 g = current_generation();
        u32 zero = 0;
        struct native_stack *s = stack_scratch.lookup(&zero);
        if (!s)
            return 0;
        long bytes = bpf_get_task_stack(next, s->ips, sizeof(s->ips), 0);
        n->kernel_stack = store_scratch_stack(s, bytes, g, KERNEL_STACK_LOST);
        n->generation = g;
        n->state = n->waiting_state;
    }
    n->weight += weight;
    return 0;
}

// args: (struct pt_regs *regs, long ret).  A raw tracepoint: cheaper on every
// syscall, and unlike a perf tracepoint program it does not decide whether
// other tools' perf events on the tracepoint see the call.
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct task_struct *task = bpf_get_current_task_btf();
    struct off_cpu_thread *t = off_cpu_threads.task_storage_get(task, 0, 0);
    u64 id = bpf_get_current_pid_tgid();
    u32 pid = id >> 32, tid = id;
    if (!t) {
        if (is_target(pid))  // watched from now on
            off_cpu_threads.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
        return 0;
    }
    if (!t->weight)
        return 0;
    u64 python = 0;
    u8 request[REQUEST_BYTES] = {};
#if PYTHON
    u64 nr = 0;  // saved at entry (x86-64 pt_regs, a stable layout)
    bpf_probe_read_kernel(&nr, sizeof(nr), &((struct pt_regs *)ctx->args[0])->orig_ax);
    if (!OFF_CPU_IDLE_LOOPS && (nr == EPOLL_WAIT || nr == EPOLL_PWAIT || nr == EPOLL_PWAIT2)
            && python_processes.lookup(&pid)) {
        t->weight = 0;  // an event loop idling
        return 0;
    }
    python = python_stack(pid, tid, t->generation, bpf_ktime_get_ns(), request);
#endif
    u64 user_stack = store_stack(ctx, BPF_F_USER_STACK, t->generation, USER_STACK_LOST);
    struct sample *r = reserve_record(OFF_CPU_WAIT, pid, tid, bpf_ktime_get_ns());
    if (r) {
        r->generation = t->generation;
        r->user_stack = user_stack;
        r->kernel_stack = t->kernel_stack;
        r->python_stack = python;
        r->duration_ns = t->weight;
        r->state = t->state;
        bpf_get_current_comm(&r->comm, sizeof(r->comm));
        __builtin_memcpy(r->request, request, REQUEST_BYTES);
        // Waits are rarer than samples: the reader's timer takes them.
        samples.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    }
    t->weight = 0;
    return 0;
}
