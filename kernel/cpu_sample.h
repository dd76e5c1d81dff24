// The CPU probe's ring-buffer record, one fixed size for every kind, so user
// space decodes whole batches as one array (ebpf_stream/_probes/cpu.py's
// SAMPLE mirrors it; the reader benchmark fills rings with it).

#include <linux/sched.h>           // TASK_COMM_LEN

#define NO_STACK 0                 // none to take: no user stack in a kernel thread,
                                   // no kernel stack while in user mode
#define STACK_LOST 2               // taken but not stored; stack keys are odd
#define REQUEST_BYTES 32           // a published request (request_context.h)

enum kind {
    SAMPLE,
    LOOP_THREAD,
    LOOP_BLOCKED,
    LOOP_STALL,
    PROCESS_EXEC,
    OFF_CPU_WAIT,
};

struct sample {
    u64 timestamp_ns;      // CLOCK_MONOTONIC
    u32 pid;               // thread group id
    u32 tid;
    u32 cpu;
    u32 generation;        // which stack maps the stack keys refer to
    u64 user_stack;        // key in stacks_<generation>, or NO_STACK / STACK_LOST
    u64 kernel_stack;
    char comm[TASK_COMM_LEN];
    u64 python_stack;      // key in python_stacks_<generation>; 0: none
    u64 busy_since;        // the loop's busy period this belongs to; 0: none
    u64 duration_ns;       // LOOP_BLOCKED: time asleep; LOOP_STALL: time busy;
                           // OFF_CPU_WAIT: the nanoseconds of waiting it stands for
    u32 kind;
    u32 state;             // OFF_CPU_WAIT: the task state it waited in (TASK_INTERRUPTIBLE...)
    u8 request[REQUEST_BYTES];  // SAMPLE, LOOP_BLOCKED: the running task's request; zeros: none
};
