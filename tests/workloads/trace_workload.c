// Ground truth for the tracing features: a process tree whose syscalls, TCP
// connections and page faults are known exactly, printed as one JSON line.
//
//   trace_workload [--wait] [--hold] [N M C K S W]
//
// The parent makes N getppid() calls and M close(-1) calls (each fails with
// EBADF), opens C TCP connections to its server child on 127.0.0.1 (request
// and response sizes below, different per connection), then writes one byte
// to each of K fresh anonymous pages.  The server child, forked first, answers
// the connections, then makes S getppid() calls.  A worker child, forked once
// the work starts, makes W getppid() calls.  No other code here calls
// getppid or close(-1), so those counts are exact for every process.
//
// --wait prints "ready" (with the server already forked) and waits for a line
// on stdin before working, so a tracer can attach to a running process tree.
// The page faults counted in the ground truth are the kernel's own count
// (getrusage): minflt at exit, at the start of main and once work began.
// --hold waits for another line after printing the ground truth, so the
// process can be interrupted mid-trace with its work done.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CONNECTIONS 64
#define PAGE 4096

static char buffer[64 * 1024];  // in .bss, touched up front so I/O faults no pages

static long request_size(int i) { return 10000 + 1111L * i; }
static long response_size(int i) { return 30000 + 2222L * i; }

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void call_getppid(long n) {
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
}

static void send_all(int fd, long n) {
    while (n > 0) {
        ssize_t w = write(fd, buffer, n < (long)sizeof buffer ? n : (long)sizeof buffer);
        if (w <= 0)
            die("write");
        n -= w;
    }
}

static void receive_exactly(int fd, long n) {
    while (n > 0) {
        ssize_t r = read(fd, buffer, n < (long)sizeof buffer ? n : (long)sizeof buffer);
        if (r <= 0)
            die("read");
        n -= r;
    }
}

static int port_of(int fd) {
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        die("getsockname");
    return ntohs(addr.sin_port);
}

static void serve(int listener, int connections, long getppids) {
    for (int i = 0; i < connections; i++) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            die("accept");
        receive_exactly(fd, request_size(i));
        send_all(fd, response_size(i));
        if (read(fd, buffer, 1) != 0)  // the client closes first
            die("read EOF");
        close(fd);
    }
    call_getppid(getppids);
    _exit(0);
}

static int connect_to(int port, int *client_port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");
    *client_port = port_of(fd);
    return fd;
}

static void wait_for_line(void) {
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        exit(1);
}

int main(int argc, char **argv) {
    int wait_first = 0, hold = 0, arg = 1;
    for (; arg < argc && argv[arg][0] == '-'; arg++) {
        if (!strcmp(argv[arg], "--wait"))
            wait_first = 1;
        else if (!strcmp(argv[arg], "--hold"))
            hold = 1;
    }
    long n = 1000, m = 300, s = 700, w = 500;
    int c = 5, k = 2000;
    if (argc - arg == 6) {
        n = atol(argv[arg]);
        m = atol(argv[arg + 1]);
        c = atoi(argv[arg + 2]);
        k = atoi(argv[arg + 3]);
        s = atol(argv[arg + 4]);
        w = atol(argv[arg + 5]);
    }
    if (c > MAX_CONNECTIONS)
        c = MAX_CONNECTIONS;
    memset(buffer, 'x', sizeof buffer);

    struct rusage start;
    getrusage(RUSAGE_SELF, &start);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, MAX_CONNECTIONS) < 0)
        die("listen");
    int server_port = port_of(listener);
    fflush(stdout);
    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0)
        serve(listener, c, s);
    close(listener);

    struct rusage go = start;
    if (wait_first) {
        printf("ready\n");
        fflush(stdout);
        wait_for_line();
        getrusage(RUSAGE_SELF, &go);
    }
    pid_t worker = fork();
    if (worker < 0)
        die("fork");
    if (worker == 0) {
        call_getppid(w);
        _exit(0);
    }

    call_getppid(n);
    for (long i = 0; i < m; i++)
        close(-1);

    int client_ports[MAX_CONNECTIONS];
    for (int i = 0; i < c; i++) {
        int fd = connect_to(server_port, &client_ports[i]);
        send_all(fd, request_size(i));
        receive_exactly(fd, response_size(i));
        close(fd);
    }

    char *pages = mmap(NULL, (size_t)k * PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == MAP_FAILED)
        die("mmap");
    for (int i = 0; i < k; i++)
        pages[(size_t)i * PAGE] = 1;

    int status;
    if (waitpid(worker, &status, 0) < 0 || waitpid(server, &status, 0) < 0)
        die("waitpid");
    struct rusage end;
    getrusage(RUSAGE_SELF, &end);

    printf("{\"pid\": %d, \"getppid\": %ld, \"close_ebadf\": %ld, \"pages\": %d, "
           "\"minflt\": %ld, \"majflt\": %ld, \"minflt_at_start\": %ld, \"minflt_at_go\": %ld, "
           "\"server\": {\"pid\": %d, \"port\": %d, \"getppid\": %ld}, "
           "\"worker\": {\"pid\": %d, \"getppid\": %ld}, \"connections\": [",
           getpid(), n, m, k, end.ru_minflt, end.ru_majflt, start.ru_minflt, go.ru_minflt,
           server, server_port, s, worker, w);
    for (int i = 0; i < c; i++)
        printf("%s{\"client_port\": %d, \"sent\": %ld, \"received\": %ld}", i ? ", " : "",
               client_ports[i], request_size(i), response_size(i));
    printf("]}\n");
    fflush(stdout);
    if (hold)
        wait_for_line();
    return 0;
}
