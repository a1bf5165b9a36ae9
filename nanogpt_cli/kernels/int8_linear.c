/* y = x @ (w * scale[:, None]).T + bias for float32 x (rows, in) and int8 w (out, in): weight-only int8 on a CPU.
 *
 * At batch 1 a decoding step reads every weight once, so this product should run at the speed of memory. torch's
 * own weight-only kernel (_weight_int8pack_mm) is compute-bound on a 2-core Xeon (it scales with cores: 6.8 GB/s
 * of weights on one, 12.4 on two) and takes bf16 activations. Here each weight row is one sequential stream, read
 * once for all rows of x, converted to float32 sixteen (AVX512) or eight (AVX2) at a time and multiplied in float32,
 * with a software prefetch far enough ahead that the stream stays ahead of the arithmetic. Output channels are
 * split between OpenMP threads; torch's own OpenMP runtime is the one already loaded, so both share one pool.
 * Built by nanogpt_cli/native.py with -O3 -march=native -fopenmp, once per CPU; docs/performance.md has figures.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Prefetch 6 KB ahead into L2 (prefetcht1): GPT-2 124M's 49 matrices in 5.5-5.8 ms on a 2-core Xeon where a read
 * of their bytes takes 4.3-4.5 ms; 6.3 ms 2 KB ahead, 6.6-7.0 ms into L1 at 2-4 KB, 9.5 ms without a prefetch. */
#define PREFETCH_BYTES 6144
#define PREFETCH(p, ahead) __builtin_prefetch((const void *)((uintptr_t)(p) + (ahead)), 0, 2)

/* Whether this CPU runs what the library was built for: a cache moved to another machine must not crash. */
int ngpt_int8_supported(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f");
#elif defined(__AVX2__) && defined(__FMA__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#endif
  return 1;
}

const char *ngpt_int8_path(void) {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

/* One vector step of the two SIMD paths: VLEN floats, VCVT(p) the VLEN int8 at p as floats. */
#if defined(__AVX512F__)
#define VLEN 16
#define VEC __m512
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VCVT(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
static float vsum(__m512 a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VLEN 8
#define VEC __m256
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VCVT(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
static float vsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

static float dot(const float *x, const int8_t *w, int64_t in) {
  int64_t k = 0;
  float sum = 0.0f;
#ifdef VLEN
  VEC a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0;  /* four chains: the FMA's latency hidden */
  for (; k + 4 * VLEN <= in; k += 4 * VLEN) {
    PREFETCH(w + k, PREFETCH_BYTES);  /* one cache line of weights per iteration on AVX512, half of one on AVX2 */
    a0 = VFMA(VLOAD(x + k), VCVT(w + k), a0);
    a1 = VFMA(VLOAD(x + k + VLEN), VCVT(w + k + VLEN), a1);
    a2 = VFMA(VLOAD(x + k + 2 * VLEN), VCVT(w + k + 2 * VLEN), a2);
    a3 = VFMA(VLOAD(x + k + 3 * VLEN), VCVT(w + k + 3 * VLEN), a3);
  }
  for (; k + VLEN <= in; k += VLEN) a0 = VFMA(VLOAD(x + k), VCVT(w + k), a0);
  sum = vsum(VADD(VADD(a0, a1), VADD(a2, a3)));
#else
  int64_t whole = in - in % 16;
  #pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < whole; j++) sum += x[j] * (float)w[j];
  k = whole;
#endif
  for (; k < in; k++) sum += x[k] * (float)w[k];
  return sum;
}

/* With a residual (rows, out), y = residual + the product, rounded as the product and then the sum would be one
 * after the other: a block's x + c_proj(...) of a decoding step in the pass that writes the product, one torch op
 * fewer between two weight streams (`model.bound_residual`). */
void ngpt_int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, const float *residual,
                      float *y, int64_t rows, int64_t out, int64_t in, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < out; n++) {
    const int8_t *wn = w + n * in;
    for (int64_t m = 0; m < rows; m++) {
      float v = dot(x + m * in, wn, in) * scale[n] + (bias ? bias[n] : 0.0f);
      y[m * out + n] = residual ? residual[m * out + n] + v : v;
    }
  }
}

/* q, scale = precision.quantize_rows(w) for a float32 w (out, in), bit for bit: each row's largest |w| over 127
 * (1 for an all-zero row), then w / scale rounded to the nearest integer, ties to even, clamped to +-127. One pass
 * over the weights instead of five over cached chunks: GPT-2 124M's matrices in 0.09-0.12 s at load against
 * 0.155 s in torch's ops. A row with a NaN gets a NaN scale and zeros, as there. */
void ngpt_int8_quantize(const float *w, int8_t *q, float *scale, int64_t out, int64_t in, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < out; n++) {
    const float *row = w + n * in;
    int8_t *qrow = q + n * in;
    float largest = 0.0f;
    int nan = 0;
    #pragma omp simd reduction(max : largest) reduction(| : nan)
    for (int64_t k = 0; k < in; k++) {
      float a = fabsf(row[k]);
      largest = a > largest ? a : largest;
      nan |= a != a;
    }
    float s = nan ? NAN : largest / 127.0f;  /* torch's amax carries a NaN into the scale */
    if (s == 0.0f) s = 1.0f;
    scale[n] = s;
    #pragma omp simd
    for (int64_t k = 0; k < in; k++) {  /* clamped first (the same result: the bounds are integers), then rounded */
      float v = row[k] / s;
      v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
      qrow[k] = v == v ? (int8_t)rintf(v) : 0;  /* rintf: to the nearest, ties to even; NaN -> 0, as torch's cast */
    }
  }
}

/* y = x @ w.T + bias for float32 x (rows, in) and w (out, in), for the few rows of a batched decoding step.
 *
 * A step of 2-16 rows reads every weight once and does rows multiply-adds with each, so it should cost little
 * more than a step of one. oneDNN's and MKL's products of such short, wide matrices do not get there on an AVX2
 * EPYC (Zen 3, 2 cores: GPT-2 124M's 49 matrices for 8 rows in 43-46 ms and 72-78 ms, against 17-21 ms for one).
 * Here a tile of 3 output channels by 4 rows keeps 12 accumulators in registers: each weight vector loaded is
 * used for 4 rows, each row's vector for 3 channels, and the weight rows stream in order with the prefetch above.
 */
#ifdef VLEN
__attribute__((always_inline)) static inline void f32_tile(const float *x, const float *w, const float *bias,
                                                           float *y, int64_t in, int64_t out, int no, int nr) {
  VEC acc[3][4];
  for (int o = 0; o < 3; o++)
    for (int r = 0; r < 4; r++) acc[o][r] = VZERO();
  int64_t k = 0;
  for (; k + VLEN <= in; k += VLEN) {
    VEC wv[3];
    for (int o = 0; o < no; o++) {
      if ((k & 15) == 0) PREFETCH(w + o * in + k, 4 * PREFETCH_BYTES);
      wv[o] = VLOAD(w + o * in + k);
    }
    for (int r = 0; r < nr; r++) {
      VEC xv = VLOAD(x + r * in + k);
      for (int o = 0; o < no; o++) acc[o][r] = VFMA(xv, wv[o], acc[o][r]);
    }
  }
  for (int o = 0; o < no; o++)
    for (int r = 0; r < nr; r++) {
      float sum = vsum(acc[o][r]);
      for (int64_t j = k; j < in; j++) sum += x[r * in + j] * w[o * in + j];
      y[r * out + o] = sum + (bias ? bias[o] : 0.0f);
    }
}
#endif

void ngpt_f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t rows, int64_t out,
                     int64_t in, int threads) {
  int64_t groups = (out + 2) / 3;
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; g++) {
    int64_t n = 3 * g;
    int no = out - n < 3 ? (int)(out - n) : 3;
    for (int64_t m = 0; m < rows; m += 4) {
      int nr = rows - m < 4 ? (int)(rows - m) : 4;
      const float *xm = x + m * in, *wn = w + n * in, *bn = bias ? bias + n : 0;
      float *ym = y + m * out + n;
#ifdef VLEN
      if (no == 3 && nr == 4) f32_tile(xm, wn, bn, ym, in, out, 3, 4);  /* the constant shapes unrolled */
      else if (no == 3) f32_tile(xm, wn, bn, ym, in, out, 3, nr);
      else f32_tile(xm, wn, bn, ym, in, out, no, nr);
#else
      for (int o = 0; o < no; o++)
        for (int r = 0; r < nr; r++) {
          float sum = 0.0f;
          #pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < in; j++) sum += xm[r * in + j] * wn[o * in + j];
          ym[r * out + o] = sum + (bn ? bn[o] : 0.0f);
        }
#endif
    }
  }
}
