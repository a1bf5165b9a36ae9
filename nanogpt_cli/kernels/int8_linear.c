/* y = x @ (w * scale[:, None]).T + bias for float32 x (rows, in) and int8 w (out, in): weight-only int8 on a CPU.
 *
 * At batch 1 a decoding step reads every weight once, so this product should run at the speed of memory. torch's
 * own weight-only kernel (_weight_int8pack_mm) is compute-bound on a 2-core Xeon (it scales with cores: 6.8 GB/s
 * of weights on one, 12.4 on two) and takes bf16 activations. Here each weight row is one sequential stream, read
 * once for all rows of x, converted to float32 sixteen (AVX512) or eight (AVX2) at a time and multiplied in float32,
 * with a software prefetch far enough ahead that the stream stays ahead of the arithmetic. Output channels are
 * split between OpenMP threads; torch's own OpenMP runtime is the one already loaded, so both share one pool.
 * Built by nanogpt_cli/native.py with -O3 -march=native -fopenmp, once per CPU; docs/performance.md has figures.
 * Also here, for the same decoding step: float32 products of a few rows, a query's attention, the MLP's activation,
 * the norms, and the draw of the next token.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>

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
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VMIN(a, b) _mm512_min_ps(a, b)
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VSELECT_GE(u, limit, yes, no) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, limit, _CMP_GE_OQ), no, yes)
#define VANY_ABOVE(a, limit) (_mm512_cmp_ps_mask(a, limit, _CMP_NLE_UQ) != 0) /* a lane > limit, or NaN */
#define VANY_GE(a, limit) (_mm512_cmp_ps_mask(a, limit, _CMP_GE_OQ) != 0)
#define VSET1(a) _mm512_set1_ps(a)
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#define VROUND(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), \
                                                                          _mm512_set1_epi32(127)), 23))
static float vsum(__m512 a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VLEN 8
#define VEC __m256
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VCVT(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VMIN(a, b) _mm256_min_ps(a, b)
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VSELECT_GE(u, limit, yes, no) _mm256_blendv_ps(no, yes, _mm256_cmp_ps(u, limit, _CMP_GE_OQ))
#define VANY_ABOVE(a, limit) (_mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_NLE_UQ)) != 0)
#define VANY_GE(a, limit) (_mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_GE_OQ)) != 0)
#define VSET1(a) _mm256_set1_ps(a)
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#define VROUND(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), \
                                                                          _mm256_set1_epi32(127)), 23))
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

/* e^x for x <= 88 (below -87, e^-87 = 1.6e-38: nothing a sum of ones notices), NaN kept: Cephes' expf (its range reduction and polynomial, within 2
 * ulp), eight or sixteen at a time, and one at a time in the same operations (fmaf is the vectors' FMA), so that a
 * value's exponential does not depend on where in a vector it falls. */
#define EXP_STEPS(MAX, ROUND, FMA, MUL, ADD, SET, POW2)                                     \
  x = MAX(SET(-87.0f), x); /* max(a, b) is b when either is NaN */                            \
  T n = ROUND(MUL(x, SET(1.44269504088896341f)));                                           \
  T r = FMA(n, SET(-0.693359375f), x);                                                       \
  r = FMA(n, SET(2.12194440e-4f), r);                                                        \
  T p = SET(1.9875691500e-4f);                                                               \
  p = FMA(p, r, SET(1.3981999507e-3f));                                                      \
  p = FMA(p, r, SET(8.3334519073e-3f));                                                      \
  p = FMA(p, r, SET(4.1665795894e-2f));                                                      \
  p = FMA(p, r, SET(1.6666665459e-1f));                                                      \
  p = FMA(p, r, SET(5.0000001201e-1f));                                                      \
  p = FMA(p, MUL(r, r), ADD(r, SET(1.0f)));                                                  \
  return MUL(p, POW2(n));

#define SMAX(a, b) ((a) > (b) ? (a) : (b))
#define SMUL(a, b) ((a) * (b))
#define SADD(a, b) ((a) + (b))
#define SSET(a) (a)
static inline float spow2(float n) {
  union { int32_t i; float f; } u = {.i = ((int32_t)n + 127) << 23};
  return u.f;
}
static inline float sexp(float x) {
  typedef float T;
  if (x != x) return x;
  EXP_STEPS(SMAX, rintf, fmaf, SMUL, SADD, SSET, spow2)
}
#ifdef VLEN
static inline VEC vexp(VEC x) {
  typedef VEC T;
  EXP_STEPS(VMAX, VROUND, VFMA, VMUL, VADD, VSET1, VPOW2)
}
#endif

/* The MLP's activation in place over n floats: act 1 GELU's tanh form, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
 * x^3))), written x / (1 + e^(-2u)) (the same function, without 1 + tanh's cancellation for negative x), and x * 0
 * where e^(-2u) would pass e^88 (-0 for a finite x, NaN for -inf: torch's values there); act 2 ReLU squared (NaN
 * kept, as torch's relu keeps it); anything else nothing. */
#define GELU_K -1.5957691216057308f /* -2 sqrt(2 / pi) */
static void activate(float *y, int64_t n, int act) {
  int64_t j = 0;
  if (act == 1) {
#ifdef VLEN
    for (; j + VLEN <= n; j += VLEN) {
      VEC a = VLOAD(y + j);
      VEC u = VMUL(VMUL(a, VSET1(GELU_K)), VFMA(VMUL(a, a), VSET1(0.044715f), VSET1(1.0f)));
      VEC g = VDIV(a, VADD(VSET1(1.0f), vexp(VMIN(u, VSET1(88.0f)))));  /* a NaN a stays NaN */
      VSTORE(y + j, VSELECT_GE(u, VSET1(88.0f), VMUL(a, VZERO()), g));
    }
#endif
    for (; j < n; j++) {
      float a = y[j], u = SMUL(SMUL(a, GELU_K), fmaf(SMUL(a, a), 0.044715f, 1.0f));
      y[j] = u >= 88.0f ? a * 0.0f : a / (1.0f + sexp(u < 88.0f ? u : 88.0f));
    }
  } else if (act == 2) {
    #pragma omp simd
    for (j = 0; j < n; j++) {
      float r = y[j] > 0.0f ? y[j] : 0.0f;
      y[j] = y[j] != y[j] ? y[j] : r * r;
    }
  }
}

/* The activation alone (`ops.activation`): y = act(x), one thread (a decoding step's 3072 values take a few us). */
void ngpt_activation(const float *x, float *y, int64_t n, int act) {
  for (int64_t j = 0; j < n; j++) y[j] = x[j];
  activate(y, n, act);
}

/* The sum of n floats, and of their squares less `centre`, in VLEN lanes (four chains) then the tail in order. */
static float row_sum(const float *x, int64_t n, float centre, int squares) {
  int64_t j = 0;
  float sum = 0.0f;
#ifdef VLEN
  VEC a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0, c = VSET1(-centre);  /* x + -centre: x - centre, exactly */
  if (squares) {
    for (; j + 4 * VLEN <= n; j += 4 * VLEN) {
      VEC d0 = VADD(VLOAD(x + j), c), d1 = VADD(VLOAD(x + j + VLEN), c);
      VEC d2 = VADD(VLOAD(x + j + 2 * VLEN), c), d3 = VADD(VLOAD(x + j + 3 * VLEN), c);
      a0 = VFMA(d0, d0, a0), a1 = VFMA(d1, d1, a1), a2 = VFMA(d2, d2, a2), a3 = VFMA(d3, d3, a3);
    }
  } else {
    for (; j + 4 * VLEN <= n; j += 4 * VLEN) {
      a0 = VADD(VLOAD(x + j), a0), a1 = VADD(VLOAD(x + j + VLEN), a1);
      a2 = VADD(VLOAD(x + j + 2 * VLEN), a2), a3 = VADD(VLOAD(x + j + 3 * VLEN), a3);
    }
  }
  sum = vsum(VADD(VADD(a0, a1), VADD(a2, a3)));
#endif
  for (; j < n; j++) {
    float d = x[j] - centre;
    sum += squares ? d * d : x[j];
  }
  return sum;
}

/* One row of a norm, kind 1: LayerNorm, (x - mean) / sqrt(var + eps) * w + b (the biased variance, two passes);
 * kind 2: RMSNorm, x / sqrt(mean(x^2) + eps) * w. w or b may be NULL (no gain, no bias). In float32 throughout,
 * within float32's rounding of torch's. Not inlined: the standalone call and the one inside a product run the same
 * instructions, so they agree bit for bit. */
__attribute__((noinline)) static void norm_row(const float *x, const float *w, const float *b, float *y, int64_t n,
                                               int kind, float eps) {
  float mean = kind == 1 ? row_sum(x, n, 0.0f, 0) / (float)n : 0.0f;
  float rstd = 1.0f / sqrtf(row_sum(x, n, mean, 1) / (float)n + eps);
  for (int64_t j = 0; j < n; j++) {
    float v = (x[j] - mean) * rstd;
    if (w) v *= w[j];
    if (b) v += b[j];
    y[j] = v;
  }
}

/* y = the norm `kind` (see norm_row) of each of the rows of x (rows, n); one thread. */
void ngpt_norm(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t n, int kind,
               float eps) {
  for (int64_t m = 0; m < rows; m++) norm_row(x + m * n, w, b, y + m * n, n, kind, eps);
}

#define NORM_STACK 4096  /* floats of normalised input on the stack (a batch-1 step's 768-3072); more: malloc */

/* With a residual (rows, out), y = residual + the product, rounded as the product and then the sum would be one
 * after the other: a block's x + c_proj(...) of a decoding step in the pass that writes the product, one torch op
 * fewer between two weight streams (`model.bound_residual`). With act (1 or 2, see `activate`; then no residual),
 * y = act(the product), each thread's outputs activated while they are in its cache: the MLP's c_fc and its
 * activation in one call, bit for bit the two calls (`ngpt_activation`). With norm (1 or 2, see norm_row), x's
 * rows are first normalised (norm_w, norm_b, eps): the norm before the product in the same call, bit for bit
 * `ngpt_norm` and then the product. Returns 0, or -1 where the normalised rows' memory cannot be had. */
int ngpt_int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, const float *residual,
                     float *y, int64_t rows, int64_t out, int64_t in, int threads, int act, const float *norm_w,
                     const float *norm_b, int norm, float eps) {
  float stack[NORM_STACK], *normed = stack;
  if (norm) {
    if (rows * in > NORM_STACK && !(normed = malloc(sizeof(float) * rows * in))) return -1;
    ngpt_norm(x, norm_w, norm_b, normed, rows, in, norm, eps);
    x = normed;
  }
  #pragma omp parallel num_threads(threads)
  {
    int64_t teams = omp_get_num_threads(), team = omp_get_thread_num();
    int64_t lo = out * team / teams, hi = out * (team + 1) / teams;  /* this thread's output channels */
    for (int64_t n = lo; n < hi; n++) {
      const int8_t *wn = w + n * in;
      for (int64_t m = 0; m < rows; m++) {
        float v = dot(x + m * in, wn, in) * scale[n] + (bias ? bias[n] : 0.0f);
        y[m * out + n] = residual ? residual[m * out + n] + v : v;
      }
    }
    if (act)
      for (int64_t m = 0; m < rows; m++) activate(y + m * out + lo, hi - lo, act);
  }
  if (normed != stack) free(normed);
  return 0;
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

/* One query per row against its keys and values: F.scaled_dot_product_attention(q, k, v) of a decoding step,
 * softmax(q . k / sqrt(hs)) @ v for each of rows x heads, where torch's CPU attention spends 60-80 us a call
 * on a 2-core EPYC choosing and setting up its kernel for a product this small (GPT-2 124M's twelve layers:
 * 0.9 ms of an int8 step of 10). q (rows, heads, hs) and k, v (rows, heads, keys, hs) at any strides but a
 * contiguous last dimension; y (rows, heads, hs) contiguous. Row r sees its first counts[r] keys (counts NULL:
 * all of them; rows at different lengths in one batch). With new_k and new_v (q's strides), each head's new key and
 * value are first written at position at of k and v: the step's cache write, one torch copy fewer a layer. The exponentials eight or sixteen at a time (`vexp`),
 * the rest in float32 as torch's math. */

static void attend(const float *q, const float *k, const float *v, float *y, float *s, int64_t n, int64_t hs,
                   int64_t kv_step, float scale) {
  if (n <= 0) {  /* no key to see: torch's softmax of nothing */
    for (int64_t j = 0; j < hs; j++) y[j] = NAN;
    return;
  }
  int64_t t = 0;
#ifdef VLEN
  if (hs % VLEN == 0)  /* four keys at a time, four independent chains: the same sums as one key at a time below */
    for (; t + 4 <= n; t += 4) {
      const float *k0 = k + t * kv_step, *k1 = k0 + kv_step, *k2 = k1 + kv_step, *k3 = k2 + kv_step;
      VEC a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < hs; j += VLEN) {
        VEC qj = VLOAD(q + j);
        a0 = VFMA(qj, VLOAD(k0 + j), a0);
        a1 = VFMA(qj, VLOAD(k1 + j), a1);
        a2 = VFMA(qj, VLOAD(k2 + j), a2);
        a3 = VFMA(qj, VLOAD(k3 + j), a3);
      }
      s[t] = vsum(a0) * scale;
      s[t + 1] = vsum(a1) * scale;
      s[t + 2] = vsum(a2) * scale;
      s[t + 3] = vsum(a3) * scale;
    }
#endif
  for (; t < n; t++) {
    const float *kt = k + t * kv_step;
    float dotp = 0.0f;
    int64_t j = 0;
#ifdef VLEN
    if (hs >= VLEN) {
      VEC a = VZERO();
      for (; j + VLEN <= hs; j += VLEN) a = VFMA(VLOAD(q + j), VLOAD(kt + j), a);
      dotp = vsum(a);
    }
#endif
    for (; j < hs; j++) dotp += q[j] * kt[j];
    s[t] = dotp * scale;
  }
  float largest = -INFINITY;
  for (t = 0; t < n; t++) largest = s[t] > largest ? s[t] : largest;
  float total = 0.0f;
  t = 0;
#ifdef VLEN
  VEC m = VSET1(largest), acc = VZERO();
  for (; t + VLEN <= n; t += VLEN) {
    VEC e = vexp(VADD(VLOAD(s + t), VMUL(m, VSET1(-1.0f))));
    VSTORE(s + t, e);
    acc = VADD(acc, e);
  }
  total = vsum(acc);
#endif
  for (; t < n; t++) {
    s[t] = sexp(s[t] - largest);
    total += s[t];
  }
  float inverse = 1.0f / total;
  int64_t j = 0;
#ifdef VLEN
  for (; j + 4 * VLEN <= hs; j += 4 * VLEN) {  /* GPT-2's 64 floats: four (AVX512) or eight (AVX2) registers */
    VEC a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t u = 0; u < n; u++) {
      const float *vt = v + u * kv_step + j;
      VEC p = VSET1(s[u]);
      a0 = VFMA(p, VLOAD(vt), a0);
      a1 = VFMA(p, VLOAD(vt + VLEN), a1);
      a2 = VFMA(p, VLOAD(vt + 2 * VLEN), a2);
      a3 = VFMA(p, VLOAD(vt + 3 * VLEN), a3);
    }
    VEC w = VSET1(inverse);
    VSTORE(y + j, VMUL(a0, w));
    VSTORE(y + j + VLEN, VMUL(a1, w));
    VSTORE(y + j + 2 * VLEN, VMUL(a2, w));
    VSTORE(y + j + 3 * VLEN, VMUL(a3, w));
  }
  for (; j + VLEN <= hs; j += VLEN) {
    VEC a = VZERO();
    for (int64_t u = 0; u < n; u++) a = VFMA(VSET1(s[u]), VLOAD(v + u * kv_step + j), a);
    VSTORE(y + j, VMUL(a, VSET1(inverse)));
  }
#endif
  for (; j < hs; j++) {
    float a = 0.0f;
    for (int64_t u = 0; u < n; u++) a += s[u] * v[u * kv_step + j];
    y[j] = a * inverse;
  }
}

void ngpt_attention_step(const float *q, float *k, float *v, float *y, const int64_t *counts, const float *new_k,
                         const float *new_v, int64_t at, int64_t rows, int64_t heads, int64_t keys, int64_t hs,
                         int64_t q_row, int64_t q_head, int64_t kv_row, int64_t kv_head, int64_t kv_step,
                         int threads) {
  float scale = 1.0f / sqrtf((float)hs);
  #pragma omp parallel num_threads(threads)
  {
    float local[4096];  /* each thread's scores: on its stack up to 4096 keys, beyond that on the heap */
    float *s = keys <= 4096 ? local : malloc((size_t)keys * sizeof(float));
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * heads; task++) {
      int64_t r = task / heads, h = task % heads;
      if (new_k && at >= 0 && at < keys)  /* the step's own key and value first, at position at of its cache */
        for (int64_t j = 0; j < hs; j++) {
          k[r * kv_row + h * kv_head + at * kv_step + j] = new_k[r * q_row + h * q_head + j];
          v[r * kv_row + h * kv_head + at * kv_step + j] = new_v[r * q_row + h * q_head + j];
        }
      int64_t n = counts ? counts[r] : keys;
      n = n < keys ? n : keys;
      attend(q + r * q_row + h * q_head, k + r * kv_row + h * kv_head, v + r * kv_row + h * kv_head,
             y + task * hs, s, s ? n : 0, hs, kv_step, scale);  /* no memory for the scores: NaN, not a crash */
    }
    if (s != local) free(s);
  }
}

/* The draw of a decoding step's next token (`ops.sample`): torch's top-k, the temperature's division, softmax and
 * multinomial over GPT-2's 50304 logits took 0.7-0.8 ms of a 12 ms int8 step on a 2-core EPYC, each op a pass
 * that runs cold after the head's weight stream. Here one call makes three passes over each row, most of them
 * comparisons of eight or sixteen values at a time against a threshold:
 * 1. the k-th largest value (a min-heap of the k largest so far; a vector with nothing above the heap's least is
 *    skipped) and the largest; NaN anywhere returns 1 (the caller's torch ops then say what they say of it);
 * 2. the mass of the candidates, every value >= the k-th (the k largest and those tied with the k-th: what masking
 *    the others to -inf keeps), e^(x / temperature - the largest's), summed one value at a time in double;
 * 3. the same sums again, up to the first candidate where they pass u times the mass.
 * That is the inverse CDF of the candidates' softmax at u, in index order: the distribution torch's ops draw
 * from, with one uniform u per row (from the caller's generator). Values whose exponent is below -87 weigh 0 (e^-87
 * is 1.6e-38 of the largest's 1). temperature 0 is greedy: the first index of the largest, torch's argmax. k 0 (or
 * >= n): every value is a candidate. A +inf, every value -inf or an overflowing x / temperature also return 1. */
#define HEAP_STACK 4096  /* the heap of a top-k on the stack up to this k; beyond it on the heap */

static void sift_down(float *heap, int64_t k, int64_t i) {  /* a min-heap: heap[0] is the least */
  float v = heap[i];
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= k) break;
    if (c + 1 < k && heap[c + 1] < heap[c]) c++;
    if (heap[c] >= v) break;
    heap[i] = heap[c];
    i = c;
  }
  heap[i] = v;
}

/* The k-th largest of x's n values (1 <= k <= n) in *kth and the largest in *top; 1 where a value is NaN. */
static int kth_largest(const float *x, int64_t n, int64_t k, float *heap, float *kth, float *top) {
  float largest = -INFINITY;
  for (int64_t i = 0; i < k; i++) {
    if (x[i] != x[i]) return 1;
    heap[i] = x[i];
    largest = x[i] > largest ? x[i] : largest;
  }
  for (int64_t i = k / 2; i-- > 0;) sift_down(heap, k, i);
  int64_t i = k;
#ifdef VLEN
  for (; i + VLEN <= n; i += VLEN) {
    if (!VANY_ABOVE(VLOAD(x + i), VSET1(heap[0]))) continue;
    for (int64_t j = i; j < i + VLEN; j++) {
      if (x[j] != x[j]) return 1;
      if (x[j] > heap[0]) {
        heap[0] = x[j];
        sift_down(heap, k, 0);
        largest = x[j] > largest ? x[j] : largest;
      }
    }
  }
#endif
  for (; i < n; i++) {
    if (x[i] != x[i]) return 1;
    if (x[i] > heap[0]) {
      heap[0] = x[i];
      sift_down(heap, k, 0);
      largest = x[i] > largest ? x[i] : largest;
    }
  }
  *kth = heap[0];
  *top = largest;
  return 0;
}

/* The candidates' weights of x[i..i+m) into e (m values, m <= VLEN or 1): e^(x / temperature - zmax) where x >= kth
 * and the exponent is at least -87, else 0. Vectors and single values give the same weight to the same value. */
static void weights(const float *x, int64_t m, float kth, float temperature, float zmax, float *e) {
#ifdef VLEN
  if (m == VLEN) {
    VEC v = VLOAD(x), d = VADD(VDIV(v, VSET1(temperature)), VSET1(-zmax));
    d = VSELECT_GE(v, VSET1(kth), d, VSET1(-INFINITY));
    VSTORE(e, VSELECT_GE(d, VSET1(-87.0f), vexp(d), VZERO()));
    return;
  }
#endif
  for (int64_t j = 0; j < m; j++) {
    float d = x[j] / temperature + -zmax;
    e[j] = x[j] >= kth && d >= -87.0f ? sexp(d) : 0.0f;
  }
}

/* Pass 2 (target < 0: the candidates' mass) or 3 (the index where the running mass passes target). */
static double walk(const float *x, int64_t n, float kth, float temperature, float zmax, double target,
                   int64_t *pick) {
  double mass = 0.0;
  int64_t last = -1, i = 0;
  float e[16];
  while (i < n) {
    int64_t m = 1;
#ifdef VLEN
    if (i + VLEN <= n) {
      m = VLEN;
      if (!VANY_GE(VLOAD(x + i), VSET1(kth))) {  /* no candidate here: they weigh 0 */
        i += m;
        continue;
      }
    }
#endif
    weights(x + i, m, kth, temperature, zmax, e);
    for (int64_t j = 0; j < m; j++) {
      if (e[j] > 0.0f) last = i + j;
      mass += e[j];
      if (target >= 0.0 && mass > target) {
        *pick = i + j;
        return mass;
      }
    }
    i += m;
  }
  *pick = last;  /* target rounded up to the whole mass: the last candidate that weighs anything */
  return mass;
}

/* out[r] = the next token of each of the rows of logits (rows, n), row r at logits + r * stride: see above. u holds
 * a uniform in [0, 1) per row (unused at temperature 0). Returns 0; 1 for a row with a NaN, a +inf or nothing
 * finite (see above); -1 where the heap's memory cannot be had. */
int ngpt_sample(const float *logits, int64_t rows, int64_t n, int64_t stride, int64_t k, float temperature,
                const double *u, int64_t *out) {
  int all = k <= 0 || k >= n;
  int64_t size = all ? 1 : k;
  float stack[HEAP_STACK], *heap = size <= HEAP_STACK ? stack : malloc(sizeof(float) * size);
  int status = 0;
  if (!heap) return -1;
  for (int64_t r = 0; r < rows && !status; r++) {
    const float *x = logits + r * stride;
    float kth, top;
    if (n <= 0 || kth_largest(x, n, size, heap, &kth, &top) || !(top < INFINITY)) {
      status = 1;
      break;
    }
    if (temperature == 0.0f) {  /* greedy: the first index of the largest */
      int64_t i = 0;
      while (x[i] != top) i++;
      out[r] = i;
      continue;
    }
    float zmax = top / temperature;
    if (!(zmax > -INFINITY && zmax < INFINITY)) {
      status = 1;
      break;
    }
    if (all) kth = -INFINITY;
    int64_t pick;
    double mass = walk(x, n, kth, temperature, zmax, -1.0, &pick);
    walk(x, n, kth, temperature, zmax, u[r] * mass, &pick);
    out[r] = pick;
  }
  if (heap != stack) free(heap);
  return status;
}
