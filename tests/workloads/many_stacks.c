// Many distinct native stacks: descend(n) recurses n frames deep and spins
// at the bottom, with n cycling through 1..argv[2] (48 by default), so a
// sampler meets that many different stacks a fraction of a millisecond
// apart.  Runs for argv[1] seconds (forever without an argument).
#include "workload.h"

__attribute__((noinline)) unsigned long spin(unsigned long x) {
    for (int i = 0; i < 200000; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    return x;
}

__attribute__((noinline)) unsigned long descend(int n, unsigned long x) {
    return n ? descend(n - 1, x) + 1 : spin(x);
}

int main(int argc, char **argv) {
    int depths = argc > 2 ? atoi(argv[2]) : 48;
    unsigned long x = 1;
    double end = ready(argc, argv);
    while (now() < end)
        for (int n = 1; n <= depths; n++)
            x = descend(n, x);
    printf("%lu\n", x);
    return 0;
}
