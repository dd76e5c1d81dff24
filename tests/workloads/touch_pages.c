// Memory workload with known page faults, mappings and heap growth.
//
//   touch_pages anon PAGES BRK_BYTES   mmap PAGES fresh anonymous pages and write one
//                                      byte in each; then munmap them and grow the
//                                      heap by BRK_BYTES
//   touch_pages file PAGES PATH        write PAGES pages to PATH, drop them from the
//                                      page cache, then mmap the file and read a byte
//                                      of each page (major faults)
//   touch_pages hog                    touch fresh pages until killed (for the OOM killer)
//   touch_pages time PAGES             touch PAGES fresh pages; print the CPU time it took (ns)
//
// The phases are steered through stdin: at each step the workload prints
// "STEP minflt majflt" from its own getrusage() and waits for a line.  It
// takes no page fault between reading its counters and blocking on stdin
// (every code path involved has run once before), so faults counted while it
// was blocked at one step and the next are exactly the difference of the two
// lines.

#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static long page;

static int counters(const char *name, char *line, size_t size) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return snprintf(line, size, "%s %ld %ld\n", name, ru.ru_minflt, ru.ru_majflt);
}

static void step(const char *name) {
    char line[96];
    int n = counters(name, line, sizeof line);
    if (write(1, line, n) != n)
        exit(1);
    char c;
    do {
        if (read(0, &c, 1) != 1)
            exit(0);  // stdin closed: the test is done with us
    } while (c != '\n');
}

static char *fresh_pages(long pages) {
    char *p = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static void touch(char *p, long pages) {
    for (long i = 0; i < pages; i++)
        p[i * page] = 1;
}

static void anon(long pages, long brk_bytes) {
    char *p = fresh_pages(pages);
    touch(p, pages);
    step("touched");
    munmap(p, pages * page);
    if (sbrk(brk_bytes) == (void *)-1) {
        perror("sbrk");
        exit(1);
    }
}

static void file(long pages, const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char *buf = calloc(1, page);
    if (fd < 0 || !buf) {
        perror(path);
        exit(1);
    }
    for (long i = 0; i < pages; i++)
        if (write(fd, buf, page) != page)
            exit(1);
    fsync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    step("dropped");
    volatile char *p = mmap(NULL, pages * page, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    madvise((void *)p, pages * page, MADV_RANDOM);  // no read-around: one read per page
    long sum = 0;
    for (long i = 0; i < pages; i++)
        sum += p[i * page];
    close(fd);
    if (sum)
        exit(1);
}

static void hog(void) {
    for (;;)
        touch(fresh_pages(256), 256);
}

static void timed(long pages) {
    char *p = fresh_pages(pages);
    struct timespec a, b;
    // CPU time, not wall time: being preempted by other work must not count.
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    touch(p, pages);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    printf("%lld\n", (b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
}

int main(int argc, char **argv) {
    page = sysconf(_SC_PAGESIZE);
    if (argc < 2) {
        fprintf(stderr, "usage: touch_pages anon|file|hog|time ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "time") && argc == 3) {
        timed(atol(argv[2]));
        return 0;
    }
    // A first call runs every code path of a step, so later ones take no fault.
    char line[96];
    if (write(1, line, 0) < 0 || read(0, line, 0) < 0 || counters("warm", line, sizeof line) < 0)
        return 1;
    step("ready");
    if (!strcmp(argv[1], "anon") && argc == 4)
        anon(atol(argv[2]), atol(argv[3]));
    else if (!strcmp(argv[1], "file") && argc == 4)
        file(atol(argv[2]), argv[3]);
    else if (!strcmp(argv[1], "hog"))
        hog();
    else
        return 2;
    step("done");
    return 0;
}
