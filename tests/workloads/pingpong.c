// Two threads bounce a byte over two pipes: every round is two blocking
// reads and two wakeups, so the process switches hundreds of thousands of
// times a second.  Prints "ready", waits for a line on stdin (so that a
// profiler can attach first), runs for argv[1] seconds, then prints rounds
// a second.
#include "workload.h"
#include <pthread.h>
#include <unistd.h>

static int there[2], back[2];

static void *echo(void *unused) {
    char c;
    while (read(there[0], &c, 1) == 1 && write(back[1], &c, 1) == 1)
        ;
    return unused;
}

int main(int argc, char **argv) {
    pthread_t thread;
    if (pipe(there) || pipe(back) || pthread_create(&thread, NULL, echo, NULL))
        return 1;
    double end = ready_then_go(argc, argv), start = now();
    long rounds = 0;
    char c = 'x';
    while (now() < end) {
        for (int i = 0; i < 1000; i++)
            if (write(there[1], &c, 1) != 1 || read(back[0], &c, 1) != 1)
                return 1;
        rounds += 1000;
    }
    printf("%.0f\n", rounds / (now() - start));
    return 0;
}
