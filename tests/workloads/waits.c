// Waits in named functions, in known proportions, for the off-CPU profile:
// each round, the main thread sleeps in in_nanosleep, blocks on a mutex
// another thread holds in in_futex, reads a pipe another thread writes late
// in in_pipe_read, and reads a TCP socket another thread sends to late in
// in_socket_read.  Each calls libc through a helper of its own: a libc
// call has no frame of its own, so unwinding by frame pointers skips its
// caller, which is then the helper.  Prints "ready", waits for a line on
// stdin (so that a profiler can attach first), runs for argv[1] seconds,
// then prints each function's wall time in nanoseconds ("in_nanosleep 1...").
#include "workload.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define NANOSLEEP_MS 4
#define FUTEX_MS 6
#define PIPE_MS 8
#define SOCKET_MS 2

static pthread_mutex_t held = PTHREAD_MUTEX_INITIALIZER;
static sem_t go_futex, locked, go_pipe, go_socket;
static int pipe_fds[2], sock_fds[2];

static void sleep_ms(int ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

static void *holder(void *unused) {
    for (;;) {
        sem_wait(&go_futex);
        pthread_mutex_lock(&held);
        sem_post(&locked);
        sleep_ms(FUTEX_MS);
        pthread_mutex_unlock(&held);
    }
    return unused;
}

static void *pipe_writer(void *unused) {
    for (;;) {
        sem_wait(&go_pipe);
        sleep_ms(PIPE_MS);
        if (write(pipe_fds[1], "x", 1) != 1)
            break;
    }
    return unused;
}

static void *socket_writer(void *unused) {
    for (;;) {
        sem_wait(&go_socket);
        sleep_ms(SOCKET_MS);
        if (send(sock_fds[1], "x", 1, 0) != 1)
            break;
    }
    return unused;
}

__attribute__((noinline)) void do_sleep(void) { sleep_ms(NANOSLEEP_MS); }
__attribute__((noinline)) void do_lock(void) { pthread_mutex_lock(&held); }
__attribute__((noinline)) void do_wait(sem_t *sem) { sem_wait(sem); }
__attribute__((noinline)) void do_read(void) {
    char c;
    if (read(pipe_fds[0], &c, 1) != 1)
        exit(1);
}
// read(2), not recv(2): glibc's recv leaves no frame chain to unwind by.
__attribute__((noinline)) void do_recv(void) {
    char c;
    if (read(sock_fds[0], &c, 1) != 1)
        exit(1);
}

__attribute__((noinline)) void in_nanosleep(void) { do_sleep(); }

__attribute__((noinline)) void in_futex(void) {
    sem_post(&go_futex);
    do_wait(&locked);
    do_lock();  // waits for the holder's sleep
    pthread_mutex_unlock(&held);
}

__attribute__((noinline)) void in_pipe_read(void) {
    sem_post(&go_pipe);
    do_read();
}

__attribute__((noinline)) void in_socket_read(void) {
    sem_post(&go_socket);
    do_recv();
}

// A connected TCP pair on the loopback.
static void tcp_pair(int fds[2]) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, len) || listen(listener, 1)
            || getsockname(listener, (struct sockaddr *)&addr, &len))
        exit(1);
    fds[1] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[1] < 0 || connect(fds[1], (struct sockaddr *)&addr, len))
        exit(1);
    fds[0] = accept(listener, NULL, NULL);
    if (fds[0] < 0)
        exit(1);
    close(listener);
}

static double timed(void (*f)(void)) {
    double start = now();
    f();
    return now() - start;
}

int main(int argc, char **argv) {
    pthread_t threads[3];
    sem_init(&go_futex, 0, 0);
    sem_init(&locked, 0, 0);
    sem_init(&go_pipe, 0, 0);
    sem_init(&go_socket, 0, 0);
    if (pipe(pipe_fds))
        return 1;
    tcp_pair(sock_fds);
    pthread_create(&threads[0], NULL, holder, NULL);
    pthread_create(&threads[1], NULL, pipe_writer, NULL);
    pthread_create(&threads[2], NULL, socket_writer, NULL);
    double spent[4] = {0};
    double end = ready_then_go(argc, argv);
    while (now() < end) {
        spent[0] += timed(in_nanosleep);
        spent[1] += timed(in_futex);
        spent[2] += timed(in_pipe_read);
        spent[3] += timed(in_socket_read);
    }
    const char *names[] = {"in_nanosleep", "in_futex", "in_pipe_read", "in_socket_read"};
    for (int i = 0; i < 4; i++)
        printf("%s %.0f\n", names[i], spent[i] * 1e9);
    return 0;
}
