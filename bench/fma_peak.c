// The CPU's float32 multiply-add peak: each of N threads (argv[1]) runs 12 independent
// chains of vector FMAs for a fixed count; prints the GFLOP/s of all threads together.
// Built by bench.py with -O3 -march=native, so the vectors are the widest the CPU has.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
enum { kLanes = 16 };
#else
enum { kLanes = 8 };
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
enum { kChains = 12 };
static const long kIters = 100000000;

static void* chains(void* out) {
  vec a0 = {0}, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5;
  vec a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11;
  vec m = a0 + 0.999999f, c = a0 + 1e-7f;
  for (long i = 0; i < kIters; ++i) {
    a0 = a0 * m + c, a1 = a1 * m + c, a2 = a2 * m + c, a3 = a3 * m + c, a4 = a4 * m + c, a5 = a5 * m + c;
    a6 = a6 * m + c, a7 = a7 * m + c, a8 = a8 * m + c, a9 = a9 * m + c, a10 = a10 * m + c, a11 = a11 * m + c;
    __asm__("" : "+x"(m));  // m is opaque: no folding of the chains
  }
  vec s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  *(float*)out = s[0];
  return NULL;
}

int main(int argc, char** argv) {
  const int n = argc > 1 ? atoi(argv[1]) : 1;
  if (n < 1 || n > 1024) return 2;
  pthread_t t[1024];
  float sink[1024];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; ++i) pthread_create(&t[i], NULL, chains, &sink[i]);
  for (int i = 0; i < n; ++i) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  printf("%.3f %g\n", 2.0 * kChains * kLanes * kIters * n / s / 1e9, (double)sink[0]);
  return 0;
}
