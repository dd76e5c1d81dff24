// What the timed C workloads share: a clock, and the "ready" line the tests
// wait for before they start measuring.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

// The end of a run of argv[1] seconds (forever without it), once "ready" is out.
__attribute__((unused)) static double ready(int argc, char **argv) {
    double end = argc > 1 ? now() + atof(argv[1]) : 1e300;
    printf("ready\n");
    fflush(stdout);
    return end;
}

// The same, from a line on stdin after "ready": a profiler attaches
// meanwhile, and its figures then cover the whole timed run.
__attribute__((unused)) static double ready_then_go(int argc, char **argv) {
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        exit(1);
    return argc > 1 ? now() + atof(argv[1]) : 1e300;
}
