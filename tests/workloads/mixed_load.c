// A fixed mix of what the tracing features observe, for overhead benchmarks:
// each round makes SYSCALLS getppid calls, one loopback TCP connection that
// carries BYTES each way, and touches PAGES fresh anonymous pages.
//
// usage: mixed_load ROUNDS; prints "ready", waits for a line on stdin, runs,
// then prints the elapsed wall time in ns.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SYSCALLS 20000
#define BYTES (64 * 1024)
#define PAGES 256
#define PAGE 4096

static char buffer[BYTES];

static void transfer(int fd, int sending) {
    for (size_t done = 0; done < BYTES;) {
        ssize_t n = sending ? write(fd, buffer + done, BYTES - done)
                            : read(fd, buffer + done, BYTES - done);
        if (n <= 0) {
            perror(sending ? "write" : "read");
            exit(1);
        }
        done += (size_t)n;
    }
}

static void *serve(void *arg) {
    int listener = *(int *)arg;
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            return NULL;
        transfer(fd, 0);
        transfer(fd, 1);
        close(fd);
    }
}

static void one_connection(const struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (const struct sockaddr *)addr, sizeof(*addr)) != 0) {
        perror("connect");
        exit(1);
    }
    transfer(fd, 1);
    transfer(fd, 0);
    close(fd);
}

static void touch_pages(void) {
    char *p = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < PAGES; i++)
        p[i * PAGE] = 1;
    munmap(p, PAGES * PAGE);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 100;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(addr);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(listener, 16) != 0 ||
        getsockname(listener, (struct sockaddr *)&addr, &len) != 0) {
        perror("listen");
        return 1;
    }
    pthread_t server;
    pthread_create(&server, NULL, serve, &listener);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof(line), stdin))
        return 1;

    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < SYSCALLS; i++)
            syscall(SYS_getppid);
        one_connection(&addr);
        touch_pages();
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("%lld\n", (long long)(end.tv_sec - start.tv_sec) * 1000000000LL +
                         (end.tv_nsec - start.tv_nsec));
    return 0;
}
