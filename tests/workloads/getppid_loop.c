// Makes a known number of syscalls, for exact counts and for load.
//
//   getppid_loop CALLS [FAILING [SLOW [SLOW_MS]]]
//
// Prints "ready", waits for a line on stdin, then makes CALLS getppid()
// calls (one core flat out), FAILING close(-1) calls (each fails with
// EBADF) and SLOW nanosleeps of SLOW_MS ms (default 20), prints "done
// NS_PER_GETPPID" (the thread's CPU time per call, so that time spent waiting
// for a CPU other processes hold does not count) and waits for a last line (or EOF) before exiting, so that
// its memory map stays readable until the tracer is done with it.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void wait_for_line(void) {
    char line[64];
    if (!fgets(line, sizeof(line), stdin))
        return;
}

static double cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

__attribute__((noinline)) void call_getppid(long calls) {
    for (long i = 0; i < calls; i++)
        getppid();
}

__attribute__((noinline)) void fail_close(long calls) {
    for (long i = 0; i < calls; i++)
        close(-1);
}

// libc's nanosleep keeps no frame of its own, so the stack walk skips its
// caller (nap); sleep_slowly is the frame a stack shows.
__attribute__((noinline)) void nap(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

__attribute__((noinline)) void sleep_slowly(long calls, long ms) {
    for (long i = 0; i < calls; i++)
        nap(ms);
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 1000000;
    long failing = argc > 2 ? atol(argv[2]) : 0;
    long slow = argc > 3 ? atol(argv[3]) : 0;
    long slow_ms = argc > 4 ? atol(argv[4]) : 20;
    printf("ready\n");
    fflush(stdout);
    wait_for_line();
    double start = cpu_ns();
    call_getppid(calls);
    double elapsed = cpu_ns() - start;
    fail_close(failing);
    sleep_slowly(slow, slow_ms);
    printf("done %.3f\n", calls ? elapsed / calls : 0.0);
    fflush(stdout);
    wait_for_line();
    return 0;
}
