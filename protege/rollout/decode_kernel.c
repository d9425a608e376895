/* protege's decode-step linear layer for x86-64 CPUs with AVX2 + FMA (protege/rollout/decode_kernel.py).

   y (M, N) = x (M, K) @ W (N, K)^T (+ b), float32, row-major, any M >= 1.

   A decode step multiplies a few rows by every weight matrix once, so its speed is how fast W streams
   from memory. For each row of W this loads 8 floats of W at a time and multiplies them into the 8 rows
   of x (which stay in L1), with one accumulator per x row, then reduces the 8 accumulators into 8
   outputs with one hadd tree; more than 8 rows of x are taken 8 at a time while W's row is in L1, so
   W is read from memory once whatever M. A last block of fewer than 8 rows reads its last row again
   in the missing slots and does not store them. The next W rows are prefetched. Rows of W are split over nthreads threads.
   Summation order differs from BLAS: results agree to float32 rounding, not bit for bit. */
#include <immintrin.h>
#include <pthread.h>

#define FMA8(acc, wv, p) acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p), acc)

typedef struct {
  const float *x, *w, *b;
  float *y;
  long m, k, n, n0, n1;
} job_t;

static inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
  __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

static void run(const job_t *j) {
  const long K = j->k, M = j->m, N = j->n;
  for (long n = j->n0; n < j->n1; n++) {  /* W's row n is read from memory once, then from L1 for every block */
    const float *wr = j->w + n * K;
    for (long mb = 0; mb < M; mb += 8) {
      const int live = M - mb < 8 ? (int)(M - mb) : 8;
      const float *xr[8];
      for (int i = 0; i < 8; i++) xr[i] = j->x + (mb + (i < live ? i : live - 1)) * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      long k = 0;
      for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(wr + k + 2 * K), _MM_HINT_T0);
        __m256 wv = _mm256_loadu_ps(wr + k);
        FMA8(a0, wv, xr[0] + k);
        FMA8(a1, wv, xr[1] + k);
        FMA8(a2, wv, xr[2] + k);
        FMA8(a3, wv, xr[3] + k);
        FMA8(a4, wv, xr[4] + k);
        FMA8(a5, wv, xr[5] + k);
        FMA8(a6, wv, xr[6] + k);
        FMA8(a7, wv, xr[7] + k);
      }
      __m256 r = reduce8(a0, a1, a2, a3, a4, a5, a6, a7);
      if (j->b) r = _mm256_add_ps(r, _mm256_set1_ps(j->b[n]));
      float out[8];
      _mm256_storeu_ps(out, r);
      for (; k < K; k++)
        for (int i = 0; i < 8; i++) out[i] += wr[k] * xr[i][k];
      for (int i = 0; i < live; i++) j->y[(mb + i) * N + n] = out[i];
    }
  }
}

static void *run_thread(void *arg) {
  run((const job_t *)arg);
  return 0;
}

int protege_decode_kernel_version(void) { return 2; }

/* Returns 0, or -1 when a thread could not be started (its rows were then computed on this thread). */
int protege_xwt(const float *x, const float *w, const float *b, float *y, long m, long k, long n, int nthreads) {
  enum { MAX_THREADS = 64 };
  if (nthreads < 1) nthreads = 1;
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  if (n < 64 * nthreads) nthreads = 1;
  job_t jobs[MAX_THREADS];
  pthread_t tids[MAX_THREADS];
  int started[MAX_THREADS] = {0}, rc = 0;
  long per = (n + nthreads - 1) / nthreads;
  for (int t = 0; t < nthreads; t++) {
    long n0 = t * per, n1 = n0 + per < n ? n0 + per : n;
    jobs[t] = (job_t){x, w, b, y, m, k, n, n0, n1};
  }
  for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&tids[t], 0, run_thread, &jobs[t]) == 0;
  run(&jobs[0]);
  for (int t = 1; t < nthreads; t++) {
    if (started[t]) pthread_join(tids[t], 0);
    else { run(&jobs[t]); rc = -1; }
  }
  return rc;
}
