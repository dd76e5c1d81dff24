// TCP connections with known byte counts over loopback, to check network
// tracing against ground truth.
//
// tcp_pairs CONNECTIONS
//   Prints "ready" and waits for a line on stdin.  The parent is the server:
//   it listens on 127.0.0.1 and ::1.  A forked child, named "tcp_client",
//   opens CONNECTIONS connections in turn: IPv4, IPv6, and IPv6 to the
//   v4-mapped address of the IPv4 listener.  On connection i the client
//   sends request_bytes(i), the server answers response_bytes(i), the client
//   closes, and the server closes when it reads the end.  Then the client
//   connects to a bound port nobody listens on (refused), and opens one more
//   connection that it resets (SO_LINGER 0) after sending RESET_REQUEST
//   bytes and reading a 1-byte answer.  Each side prints one line per
//   connection, as it saw it:
//     conn PID ROLE FAMILY LOCAL_ADDRESS LOCAL_PORT PEER_ADDRESS PEER_PORT SENT RECEIVED OUTCOME
//   then the parent prints "done".
//
// tcp_pairs --echo ROUNDS
//   One IPv4 connection between the two processes, ROUNDS round trips of one
//   byte each; the client prints the elapsed nanoseconds.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RESET_REQUEST 1000

static char buffer[65536];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static size_t request_bytes(int i) { return 1000 + 3713 * (size_t)i; }
static size_t response_bytes(int i) { return 200 + 2917 * (size_t)i; }

static void send_all(int fd, size_t n) {
    while (n) {
        size_t chunk = n < 4096 ? n : 4096;
        ssize_t sent = send(fd, buffer, chunk, 0);
        if (sent < 0)
            die("send");
        n -= (size_t)sent;
    }
}

static void receive_exactly(int fd, size_t n) {
    while (n) {
        ssize_t got = recv(fd, buffer, n < sizeof(buffer) ? n : sizeof(buffer), 0);
        if (got <= 0)
            die("recv");
        n -= (size_t)got;
    }
}

static void print_connection(int fd, const char *role, size_t sent, size_t received,
                             const char *outcome) {
    struct sockaddr_storage local, peer;
    socklen_t len = sizeof(local);
    if (getsockname(fd, (struct sockaddr *)&local, &len))
        die("getsockname");
    len = sizeof(peer);
    if (getpeername(fd, (struct sockaddr *)&peer, &len))
        die("getpeername");
    char local_text[INET6_ADDRSTRLEN], peer_text[INET6_ADDRSTRLEN];
    int family = local.ss_family == AF_INET ? 4 : 6;
    unsigned local_port, peer_port;
    if (family == 4) {
        struct sockaddr_in *l = (struct sockaddr_in *)&local, *p = (struct sockaddr_in *)&peer;
        inet_ntop(AF_INET, &l->sin_addr, local_text, sizeof(local_text));
        inet_ntop(AF_INET, &p->sin_addr, peer_text, sizeof(peer_text));
        local_port = ntohs(l->sin_port);
        peer_port = ntohs(p->sin_port);
    } else {
        struct sockaddr_in6 *l = (struct sockaddr_in6 *)&local, *p = (struct sockaddr_in6 *)&peer;
        inet_ntop(AF_INET6, &l->sin6_addr, local_text, sizeof(local_text));
        inet_ntop(AF_INET6, &p->sin6_addr, peer_text, sizeof(peer_text));
        local_port = ntohs(l->sin6_port);
        peer_port = ntohs(p->sin6_port);
    }
    printf("conn %d %s %d %s %u %s %u %zu %zu %s\n", getpid(), role, family, local_text,
           local_port, peer_text, peer_port, sent, received, outcome);
}

static int listen_on(int family, struct sockaddr_storage *address) {
    memset(address, 0, sizeof(*address));
    socklen_t len;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)address;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof(*a);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)address;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        len = sizeof(*a);
    }
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)address, len) || listen(fd, 64))
        die("listen");
    if (getsockname(fd, (struct sockaddr *)address, &len))
        die("getsockname");
    return fd;
}

// The v4-mapped IPv6 form of an IPv4 address.
static struct sockaddr_in6 mapped(const struct sockaddr_in *v4) {
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = v4->sin_port};
    a.sin6_addr.s6_addr[10] = a.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&a.sin6_addr.s6_addr[12], &v4->sin_addr, 4);
    return a;
}

static int connect_to(int family, const void *address, socklen_t len) {
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, address, len))
        return -1 - fd;  // the caller still owns the socket
    return fd;
}

static void client(int connections, const struct sockaddr_storage *v4,
                   const struct sockaddr_storage *v6) {
    prctl(PR_SET_NAME, "tcp_client");
    struct sockaddr_in6 v4_mapped = mapped((const struct sockaddr_in *)v4);
    for (int i = 0; i < connections; i++) {
        int fd;
        if (i % 3 == 0)
            fd = connect_to(AF_INET, v4, sizeof(struct sockaddr_in));
        else if (i % 3 == 1)
            fd = connect_to(AF_INET6, v6, sizeof(struct sockaddr_in6));
        else
            fd = connect_to(AF_INET6, &v4_mapped, sizeof(v4_mapped));
        if (fd < 0)
            die("connect");
        send_all(fd, request_bytes(i));
        receive_exactly(fd, response_bytes(i));
        print_connection(fd, "client", request_bytes(i), response_bytes(i), "closed");
        close(fd);
    }

    // Refused: the port is bound, so no other socket can take it, but not listening.
    struct sockaddr_in closed = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(closed);
    int bound = socket(AF_INET, SOCK_STREAM, 0);
    if (bound < 0 || bind(bound, (struct sockaddr *)&closed, len) ||
        getsockname(bound, (struct sockaddr *)&closed, &len))
        die("bind");
    int refused = connect_to(AF_INET, &closed, len);
    if (refused >= 0 || errno != ECONNREFUSED)
        die("connect to a closed port");
    printf("conn %d client 4 127.0.0.1 0 127.0.0.1 %u 0 0 failed\n", getpid(),
           ntohs(closed.sin_port));
    close(-1 - refused);
    close(bound);

    int fd = connect_to(AF_INET, v4, sizeof(struct sockaddr_in));
    if (fd < 0)
        die("connect");
    send_all(fd, RESET_REQUEST);
    receive_exactly(fd, 1);
    print_connection(fd, "client", RESET_REQUEST, 1, "reset");
    struct linger abort_on_close = {.l_onoff = 1, .l_linger = 0};
    if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_on_close, sizeof(abort_on_close)))
        die("setsockopt");
    close(fd);
}

static void server(int connections, int v4, int v6) {
    for (int i = 0; i < connections; i++) {
        int fd = accept(i % 3 == 1 ? v6 : v4, NULL, NULL);
        if (fd < 0)
            die("accept");
        receive_exactly(fd, request_bytes(i));
        send_all(fd, response_bytes(i));
        print_connection(fd, "server", response_bytes(i), request_bytes(i), "closed");
        if (recv(fd, buffer, 1, 0) != 0)
            die("expected the end of the connection");
        close(fd);
    }
    int fd = accept(v4, NULL, NULL);
    if (fd < 0)
        die("accept");
    receive_exactly(fd, RESET_REQUEST);
    print_connection(fd, "server", 1, RESET_REQUEST, "reset");  // the peer is gone soon after
    send_all(fd, 1);
    if (recv(fd, buffer, 1, 0) != -1 || errno != ECONNRESET)
        die("expected a reset");
    close(fd);
}

static long long elapsed_ns(const struct timespec *start) {
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    return (end.tv_sec - start->tv_sec) * 1000000000LL + (end.tv_nsec - start->tv_nsec);
}

static void echo(int rounds) {
    struct sockaddr_storage address;
    int listener = listen_on(AF_INET, &address);
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        int fd = connect_to(AF_INET, &address, sizeof(struct sockaddr_in));
        if (fd < 0)
            die("connect");
        struct timespec start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (int i = 0; i < rounds; i++) {
            send_all(fd, 1);
            receive_exactly(fd, 1);
        }
        printf("%lld\n", elapsed_ns(&start));
        exit(0);
    }
    int fd = accept(listener, NULL, NULL);
    if (fd < 0)
        die("accept");
    while (recv(fd, buffer, 1, 0) == 1)
        send_all(fd, 1);
    waitpid(child, NULL, 0);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "--echo") == 0) {
        echo(atoi(argv[2]));
        return 0;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: tcp_pairs CONNECTIONS | tcp_pairs --echo ROUNDS\n");
        return 2;
    }
    int connections = atoi(argv[1]);
    struct sockaddr_storage v4_address, v6_address;
    int v4 = listen_on(AF_INET, &v4_address), v6 = listen_on(AF_INET6, &v6_address);
    printf("ready\n");
    if (!fgets(buffer, sizeof(buffer), stdin))
        die("stdin");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        close(v4);
        close(v6);
        client(connections, &v4_address, &v6_address);
        return 0;
    }
    server(connections, v4, v6);
    int status;
    if (waitpid(child, &status, 0) != child || status != 0)
        die("client");
    printf("done\n");
    return 0;
}
