// Network tracing: TCP connection lifecycles and per-process TCP totals.
//
// Contract with user space (ebpf_stream/_probes/network.py mirrors it):
//  * one fixed-size `struct connection_record` per TCP connection in the
//    `records` ring buffer, sent when the socket is destroyed (so every byte
//    the process moved through it is counted), or when a connect fails;
//  * `totals` holds each process's cumulative `struct process_totals`,
//    updated in the kernel and read whole by user space, which also deletes
//    the entries of processes that have exited;
//  * every loss is counted in `counters`.
//
// Only tracepoint arguments are read, never kernel structs: their layouts
// change between kernel versions.  The socket's address is the connection's
// key.  State changes say which sockets are connections and how they end;
// sock_send_length/sock_recv_length run in the context of the process doing
// the I/O and give exact byte counts.  An accepted connection becomes
// ESTABLISHED in softirq context, on behalf of no particular process (on
// loopback, often the client's), so its owner is the first process that
// sends, receives or closes it in an orderly way.
//
// Build-time settings (-D): MAX_CONNECTIONS, MAX_PROCESSES, RINGBUF_PAGES,
// and common.h's FILTER_PIDS and FOLLOW_CHILDREN.

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MSG_PEEK 2
#define TASK_COMM_LEN 16

// include/net/tcp_states.h: part of the kernel's ABI (tracepoints print them).
enum tcp_state {
    ESTABLISHED = 1, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT,
    CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING, NEW_SYN_RECV,
};

enum role { CLIENT = 0, SERVER = 1 };
enum outcome { CLOSED = 0, RESET = 1, FAILED = 2 };

// Where a connection runs, as the state-change tracepoint gives it.
struct endpoints {
    u16 family;                // AF_INET or AF_INET6 (v4-mapped addresses included)
    u16 local_port;
    u16 peer_port;
    u8 local_address[16];      // AF_INET: the first 4 bytes
    u8 peer_address[16];
};

struct connection_record {
    u64 start_ns;              // CLOCK_MONOTONIC: connect(), or the accepted handshake's end
    u64 end_ns;
    u64 bytes_sent;
    u64 bytes_received;
    u32 pid;                   // 0: accepted, but no process touched it before it ended
    u32 retransmits;
    u8 role;
    u8 outcome;
    struct endpoints endpoints;
    char comm[TASK_COMM_LEN];
};

struct connection {
    struct connection_record record;
    u32 resets_sent;
    u32 resets_received;
    u8 established;
};

struct process_totals {
    u64 bytes_sent;
    u64 bytes_received;
    u64 connects;
    u64 accepts;
    u64 failed_connects;
    u64 retransmits;
    u64 resets_sent;
    u64 resets_received;
    char comm[TASK_COMM_LEN];
};

enum counter {
    RING_FULL,                 // a connection record dropped: no room in the ring buffer
    CONNECTIONS_FULL,          // a connection not tracked: `connections` was full
    PROCESSES_FULL,            // a process's totals not kept: `totals` was full
    OWNER_UNKNOWN,             // an accepted connection ended before any process touched it
    N_COUNTERS,
};

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_HASH(connections, u64, struct connection, MAX_CONNECTIONS);
BPF_HASH(totals, u32, struct process_totals, MAX_PROCESSES);
#include "common.h"

// A process's totals, created on first use.  `named_by`: the connection
// whose owner `pid` is, when the event runs on behalf of another process
// (softirq, timers); 0 when `pid` is the current process.
static __always_inline struct process_totals *totals_of(u32 pid, struct connection *named_by) {
    struct process_totals *t = totals.lookup(&pid);
    if (t)
        return t;
    struct process_totals zero = {};
    if (named_by)
        __builtin_memcpy(zero.comm, named_by->record.comm, sizeof(zero.comm));
    else
        bpf_get_current_comm(&zero.comm, sizeof(zero.comm));
    totals.insert(&pid, &zero);  // fails harmlessly if another CPU just inserted it
    t = totals.lookup(&pid);
    if (!t)
        count(PROCESSES_FULL);
    return t;
}

static __always_inline void add(u64 *field, u64 n) {
    if (n)
        __sync_fetch_and_add(field, n);
}

// Counts what happened to `c` before its owner was known, now that it is.
static __always_inline void credit_owner(struct connection *c) {
    struct process_totals *t = totals_of(c->record.pid, 0);
    if (!t)
        return;
    add(&t->accepts, 1);
    add(&t->retransmits, c->record.retransmits);
    add(&t->resets_sent, c->resets_sent);
    add(&t->resets_received, c->resets_received);
}

// The owner's totals, or 0 while an accepted connection has no owner (its
// events are credited when it gets one).
static __always_inline struct process_totals *owner_totals(struct connection *c) {
    return c->record.pid ? totals_of(c->record.pid, c) : 0;
}

// An accepted connection's owner is the first process that touches it.
// Returns 0 when that process is not a target: the connection is forgotten.
static __always_inline struct connection *claim(u64 sk, struct connection *c) {
    if (c->record.pid)
        return c;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid)) {
        connections.delete(&sk);
        return 0;
    }
    c->record.pid = pid;
    bpf_get_current_comm(&c->record.comm, sizeof(c->record.comm));
    credit_owner(c);
    return c;
}

// Reports the connection and forgets it.
static __always_inline void emit(u64 sk, struct connection *c) {
    if (!c->record.pid) {
        count(OWNER_UNKNOWN);
        if (FILTER_PIDS)
            goto forget;
    }
    struct connection_record *r = records.ringbuf_reserve(sizeof(*r));
    if (!r) {
        count(RING_FULL);
        goto forget;
    }
    __builtin_memcpy(r, &c->record, sizeof(*r));
    r->end_ns = bpf_ktime_get_ns();
    r->outcome = !c->established ? FAILED :
                 c->resets_sent || c->resets_received ? RESET : CLOSED;
    records.ringbuf_submit(r, 0);
forget:
    connections.delete(&sk);
}

static __always_inline void on_connect(u64 sk) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(pid))
        return;
    struct connection *old = connections.lookup(&sk);
    if (old)  // connect() again on a socket that was disconnected
        emit(sk, old);
    struct connection c = {};
    c.record.start_ns = bpf_ktime_get_ns();
    c.record.pid = pid;
    c.record.role = CLIENT;
    bpf_get_current_comm(&c.record.comm, sizeof(c.record.comm));
    if (connections.insert(&sk, &c)) {
        count(CONNECTIONS_FULL);
        return;
    }
    struct process_totals *t = totals_of(pid, 0);
    if (t)
        add(&t->connects, 1);
}

static __always_inline void on_accepted(u64 sk, struct endpoints *e) {
    struct connection c = {};
    c.record.start_ns = bpf_ktime_get_ns();
    c.record.role = SERVER;
    c.record.endpoints = *e;
    c.established = 1;
    if (connections.insert(&sk, &c))
        count(CONNECTIONS_FULL);
}

static __always_inline void on_state_change(u64 sk, int from, int to, struct endpoints *e) {
    if (from == CLOSE && to == SYN_SENT) {
        on_connect(sk);
        return;
    }
    if (from == SYN_RECV && to == ESTABLISHED) {
        on_accepted(sk, e);
        return;
    }
    struct connection *c = connections.lookup(&sk);
    if (!c)
        return;
    if (from == SYN_SENT && to == ESTABLISHED) {
        c->established = 1;
        c->record.endpoints = *e;  // the local port is chosen after SYN_SENT
    } else if (from == SYN_SENT && to == CLOSE) {
        c->record.endpoints = *e;
        struct process_totals *t = owner_totals(c);
        if (t)
            add(&t->failed_connects, 1);
        emit(sk, c);
    } else if ((from == ESTABLISHED && to == FIN_WAIT1) || (from == CLOSE_WAIT && to == LAST_ACK)) {
        claim(sk, c);  // an orderly close(): the closing process holds the socket
    }
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    struct endpoints e = {.family = args->family, .local_port = args->sport,
                          .peer_port = args->dport};
    if (e.family == AF_INET) {
        __builtin_memcpy(e.local_address, args->saddr, 4);
        __builtin_memcpy(e.peer_address, args->daddr, 4);
    } else {
        __builtin_memcpy(e.local_address, args->saddr_v6, 16);
        __builtin_memcpy(e.peer_address, args->daddr_v6, 16);
    }
    on_state_change((u64)args->skaddr, args->oldstate, args->newstate, &e);
    return 0;
}

// The socket is gone: nothing more can be sent or received through it.
TRACEPOINT_PROBE(tcp, tcp_destroy_sock) {
    u64 sk = (u64)args->skaddr;
    struct connection *c = connections.lookup(&sk);
    if (c)
        emit(sk, c);
    return 0;
}

static __always_inline void on_io(void *sk_ptr, u16 family, u16 protocol, int ret, int sent) {
    if (protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
        return;
    u64 sk = (u64)sk_ptr;
    u64 bytes = ret > 0 ? ret : 0;
    struct connection *c = connections.lookup(&sk);
    if (c && claim(sk, c))
        add(sent ? &c->record.bytes_sent : &c->record.bytes_received, bytes);
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!bytes || !is_target(pid))
        return;
    struct process_totals *t = totals_of(pid, 0);
    if (t)
        add(sent ? &t->bytes_sent : &t->bytes_received, bytes);
}

TRACEPOINT_PROBE(sock, sock_send_length) {
    on_io(args->sk, args->family, args->protocol, args->ret, 1);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    // A peek leaves the bytes queued: the read that takes them counts them.
    on_io(args->sk, args->family, args->protocol, args->flags & MSG_PEEK ? 0 : args->ret, 0);
    return 0;
}

enum tcp_event { RETRANSMIT, RESET_SENT, RESET_RECEIVED };

// Counts an event on a tracked connection, and for its owner once known
// (an owner found later is credited by claim()).
static __always_inline void on_tcp_event(u64 sk, enum tcp_event event) {
    struct connection *c = connections.lookup(&sk);
    if (!c)
        return;
    __sync_fetch_and_add(event == RETRANSMIT ? &c->record.retransmits :
                         event == RESET_SENT ? &c->resets_sent : &c->resets_received, 1);
    struct process_totals *t = owner_totals(c);
    if (t)
        add(event == RETRANSMIT ? &t->retransmits :
            event == RESET_SENT ? &t->resets_sent : &t->resets_received, 1);
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    on_tcp_event((u64)args->skaddr, RETRANSMIT);
    return 0;
}

// Raw, not the tracepoint: its `enum sk_rst_reason` field does not compile
// against the older kernel headers bcc may have to use.  The first argument
// is the socket (NULL for a reset answering a packet that matched no socket).
RAW_TRACEPOINT_PROBE(tcp_send_reset) {
    on_tcp_event(ctx->args[0], RESET_SENT);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    on_tcp_event((u64)args->skaddr, RESET_RECEIVED);
    return 0;
}
