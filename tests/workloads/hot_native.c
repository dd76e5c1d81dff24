// A busy, single-threaded native process: outer -> middle -> hot_leaf burns
// CPU for argv[1] seconds (forever without an argument).
#include "workload.h"

__attribute__((noinline)) unsigned long hot_leaf(unsigned long x) {
    for (int i = 0; i < 10000; i++)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
    return x;
}

__attribute__((noinline)) unsigned long middle(unsigned long x) { return hot_leaf(x) ^ 1; }

__attribute__((noinline)) unsigned long outer(unsigned long x) { return middle(x) + 1; }

int main(int argc, char **argv) {
    unsigned long x = 1;
    double end = ready(argc, argv);
    while (now() < end)
        for (int i = 0; i < 100; i++)
            x = outer(x);
    printf("%lu\n", x);
    return 0;
}
