// Spends most of its time in the kernel: large reads from /dev/zero.
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 20];

__attribute__((noinline)) void copy_from_kernel(int fd) {
    if (read(fd, buf, sizeof(buf)) < 0)
        perror("read");
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1e300;
    struct timespec start, t;
    int fd = open("/dev/zero", O_RDONLY);
    clock_gettime(CLOCK_MONOTONIC, &start);
    printf("ready\n");
    fflush(stdout);
    do {
        copy_from_kernel(fd);
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - start.tv_sec) + (t.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
