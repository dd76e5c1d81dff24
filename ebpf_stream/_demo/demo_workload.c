// The demo workload: a few distinct hot paths, so its flame graph is easy to read.
//   hash_blocks   pure computation (about half the CPU)
//   sort_records  a recursive quicksort, for some stack depth
//   read_zeros    syscalls that copy in the kernel, so kernel frames show up
// Usage: demo_workload [seconds]
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v;
    h *= 0x100000001b3ULL;
    return h ^ (h >> 29);
}

__attribute__((noinline)) static uint64_t hash_blocks(int rounds) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int r = 0; r < rounds; r++)
        for (uint64_t i = 0; i < 4096; i++)
            h = mix(h, i * r);
    return h;
}

__attribute__((noinline)) static size_t partition(uint32_t *v, size_t n) {
    uint32_t pivot = v[(n - 1) / 2];
    size_t i = (size_t)-1, j = n;
    for (;;) {
        do
            i++;
        while (v[i] < pivot);
        do
            j--;
        while (v[j] > pivot);
        if (i >= j)
            return j;
        uint32_t t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

__attribute__((noinline)) static void quicksort(uint32_t *v, size_t n) {
    if (n < 2)
        return;
    size_t p = partition(v, n);
    quicksort(v, p + 1);
    quicksort(v + p + 1, n - p - 1);
}

__attribute__((noinline)) static void sort_records(uint32_t *buf, size_t n, uint32_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        buf[i] = seed;
    }
    quicksort(buf, n);
}

__attribute__((noinline)) static void read_zeros(int fd, char *block, int times) {
    for (int i = 0; i < times; i++)
        if (read(fd, block, 65536) < 0)
            perror("read");
}

__attribute__((noinline)) static uint64_t serve_request(uint32_t *buf, int fd, char *block,
                                                        uint32_t i) {
    uint64_t h = hash_blocks(24);
    sort_records(buf, 4096, i);
    read_zeros(fd, block, 96);
    return h;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    static uint32_t buf[4096];
    static char block[65536];
    int fd = open("/dev/zero", O_RDONLY);
    uint64_t h = 0;
    double end = now() + seconds;
    for (uint32_t i = 0; now() < end; i++)
        h ^= serve_request(buf, fd, block, i);
    printf("demo workload done (%llx)\n", (unsigned long long)h);
    return 0;
}
