/* maskserve's CPU products for int8 weights (Int8Linear, service/engine/precision.py), x86-64 with AVX-512:
 *
 * - maskserve_int8_mm: float32 rows times int8 weights (weight-only), for decode steps of a few rows. torch's
 *   CPU kernel for this (_weight_int8pack_mm) is vectorised for bfloat16 activations only; on a CPU that
 *   emulates bfloat16 the engine's activations are float32, and every call paid two casts and read the weights
 *   at about a third of the memory bound. This one reads them once, with software prefetch, in float32.
 * - maskserve_int8_gemm: int8 rows (a scale each) times int8 weights with VNNI, for decode batches of many
 *   rows and the fill-mask model's forwards: the same integer sums and the same float rescaling as
 *   Int8Linear.int8_product's torch._int_mm path.
 *
 * service/engine/int8_kernels.py builds and loads this file; docs/generation.md ("Issue 13's eighth round") has
 * the measurements.
 *
 * Exactness: every output is one row of x against one row of q, summed in the same order whatever the number of
 * rows M (float32: 16 lanes along K, then the lanes; int8: exact integer sums), so a row's output never depends
 * on the rows beside it.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* What this CPU can run (compiled for the baseline ISA: safe to call anywhere). */
int maskserve_int8_mm_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

int maskserve_int8_gemm_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

/* Read ahead this many bytes of the weight stream: measured best of 0 / 2048 / 4096 / 8192 for one row on the
 * Intel Xeon VM (a 134 MB stream of weights per token; without it the kernel reached ~70% of a plain read). */
#define PREFETCH_BYTES 8192

static inline __m512 int8_to_float(const int8_t* p) { /* 16 int8 -> 16 float32 */
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

static inline float bfloat16_to_float(uint16_t bits) {
  uint32_t word = (uint32_t)bits << 16;
  float out;
  memcpy(&out, &word, sizeof out);
  return out;
}

/* `rows` rows of x (stride K) against `cols` rows of q (stride K), into y (stride N). Called with constants, so
 * the rows x cols accumulators (at most 4 x 4) stay in registers; each weight vector is converted once and used
 * for every row. */
static inline __attribute__((always_inline)) void tile(const float* x, const int8_t* q, const uint16_t* scale,
                                                       float* y, int64_t N, int64_t K, int rows, int cols) {
  __m512 acc[4][4];
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 w[4];
    for (int j = 0; j < cols; j++) {
      _mm_prefetch((const char*)(q + j * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
      w[j] = int8_to_float(q + j * K + k);
    }
    for (int i = 0; i < rows; i++) {
      __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < cols; j++) acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) y[i * N + j] = _mm512_reduce_add_ps(acc[i][j]) * bfloat16_to_float(scale[j]);
}

/* x (M, K) float32, q (N, K) int8, scale (N,) bfloat16 bits -> y (M, N) float32; all contiguous, K % 16 == 0.
 * Output channels are split into blocks of 4 over `threads` OpenMP threads (torch's own runtime: the library
 * links libgomp.so.1, which torch has loaded already). */
void maskserve_int8_mm(const float* x, const int8_t* q, const uint16_t* scale, float* y, int64_t M, int64_t N,
                       int64_t K, int threads) {
  int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    int64_t n0 = b * 4;
    if (N - n0 >= 4) {
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) tile(x + m0 * K, q + n0 * K, scale + n0, y + m0 * N + n0, N, K, 4, 4);
      const float* xr = x + m0 * K;
      float* yr = y + m0 * N + n0;
      switch (M - m0) {
        case 3: tile(xr, q + n0 * K, scale + n0, yr, N, K, 3, 4); break;
        case 2: tile(xr, q + n0 * K, scale + n0, yr, N, K, 2, 4); break;
        case 1: tile(xr, q + n0 * K, scale + n0, yr, N, K, 1, 4); break;
        default: break;
      }
    } else { /* the last N % 4 channels, one at a time */
      for (int64_t n = n0; n < N; n++)
        for (int64_t m = 0; m < M; m++) tile(x + m * K, q + n * K, scale + n, y + m * N + n, N, K, 1, 1);
    }
  }
}

#pragma GCC pop_options
/* ---- int8 GEMM (VNNI), for decode batches of many rows and every fill-mask forward ----------------------------
 *
 * Int8Linear.int8_product's numbers exactly, in one call: each row times the smoothing's reciprocals (where
 * calibrated), quantized with its own scale (absmax / 127, round half to even, as precision.quantize_rows),
 * multiplied by the int8 weights into exact int32 sums, and rescaled as (sum * row scale) * channel scale.
 *
 * The weights are packed once (maskserve_int8_pack) so that one 64-byte vector holds 4 consecutive k of 16
 * output channels: vpdpbusd then adds 16 channels' dot products at once, with no horizontal sum per output.
 * vpdpbusd multiplies unsigned bytes by signed ones: the rows go in as x + 128 (their sign bit flipped), and
 * 128 * sum_k q[n, k] comes back off each sum. */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

/* packed (ceil(N / 16), K / 4, 16, 4) <- q (N, K); channels past N are zeros. */
void maskserve_int8_pack(const int8_t* q, int8_t* packed, int64_t N, int64_t K) {
  int64_t blocks = (N + 15) / 16, groups = K / 4;
  for (int64_t b = 0; b < blocks; b++)
    for (int64_t g = 0; g < groups; g++)
      for (int64_t c = 0; c < 16; c++) {
        int64_t n = b * 16 + c;
        int8_t* out = packed + ((b * groups + g) * 16 + c) * 4;
        if (n < N) memcpy(out, q + n * K + g * 4, 4);
        else memset(out, 0, 4);
      }
}

/* acc + x (unsigned bytes) . w (signed bytes), as _mm512_dpbusd_epi32, in place: with GCC 12's intrinsic every
 * accumulator was copied out and back around each vpdpbusd (two register moves per product in the objdump), and
 * the loop was bound by issuing them (1.2-1.4x slower at 512 rows). */
static inline __attribute__((always_inline)) __m512i dpbusd(__m512i acc, __m512i x, __m512i w) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

/* A tile: up to GEMM_ROWS rows x 4 blocks of 16 channels. 20 accumulators, 4 weight vectors and a broadcast
 * fit the 32 vector registers; each 64-byte weight vector loaded serves 5 rows. Rows are taken in chunks of
 * GEMM_ROW_CHUNK, so that a few channel blocks (9 for 576 channels) still split evenly over the threads. At 512
 * rows 5 x 4 tiles in chunks of 60 measured 1.14-1.24x 4 x 4 tiles unchunked (a throwaway A/B of the library). */
#define GEMM_ROWS 5
#define GEMM_ROW_CHUNK 60

/* `rows` rows of the shifted int8 x against `cols` blocks of 16 packed channels from channel n0. */
static inline __attribute__((always_inline)) void gemm_tile(const uint8_t* x, const float* row_scale,
                                                            const int8_t* packed, const int32_t* qsum,
                                                            const uint16_t* scale, float* y, int64_t N,
                                                            int64_t K, int64_t n0, int rows, int cols) {
  __m512i acc[GEMM_ROWS][4];
  int64_t groups = K / 4;
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < cols; j++) acc[i][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; g++) {
    __m512i w[4];
    for (int j = 0; j < cols; j++) {
      const int8_t* p = packed + (j * groups + g) * 64;
      _mm_prefetch((const char*)p + PREFETCH_BYTES, _MM_HINT_T0);
      w[j] = _mm512_loadu_si512((const void*)p);
    }
    for (int i = 0; i < rows; i++) {
      int32_t word;
      memcpy(&word, x + i * K + g * 4, 4);
      __m512i xb = _mm512_set1_epi32(word); /* the row's 4 bytes at k = 4g, in every lane */
      for (int j = 0; j < cols; j++) acc[i][j] = dpbusd(acc[i][j], xb, w[j]);
    }
  }
  for (int j = 0; j < cols; j++) {
    int64_t n = n0 + j * 16;
    __mmask16 valid = (__mmask16)(N - n >= 16 ? 0xFFFF : (1u << (N - n)) - 1);
    __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(valid, qsum + n), 7); /* 128 * sum_k q */
    __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, scale + n));
    __m512 channel = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); /* bfloat16 -> float32 */
    for (int i = 0; i < rows; i++) {
      __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], shift));
      __m512 out = _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(row_scale[i])), channel);
      _mm512_mask_storeu_ps(y + i * N + n, valid, out);
    }
  }
}

/* One row as precision.quantize_rows computes it, bit for bit: x * inv_smoothing (the smoothing's reciprocals),
 * the absmax, s = max(absmax, 1e-12) / 127, round(x * (1 / s)) half to even, clamped to +-127; stored as
 * q + 128. Multiplies by reciprocals rather than dividing (as quantize_rows does too): a vector division costs
 * ~10 multiplies, and with two per value the rows' quantization took ~20% of a 512-row product. */
static void quantize_row(const float* x, const float* inv_smoothing, uint8_t* out, float* row_scale, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    if (inv_smoothing) v = _mm512_mul_ps(v, _mm512_loadu_ps(inv_smoothing + k));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  float s = fmaxf(_mm512_reduce_max_ps(amax), 1e-12f) / 127.0f;
  *row_scale = s;
  const __m512 inv = _mm512_set1_ps(1.0f / s), low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  for (int64_t k = 0; k < K; k += 16) {
    __m512 v = _mm512_loadu_ps(x + k);
    if (inv_smoothing) v = _mm512_mul_ps(v, _mm512_loadu_ps(inv_smoothing + k));
    v = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, low), high)));
    _mm_storeu_si128((__m128i*)(out + k), _mm_xor_si128(q, _mm_set1_epi8((char)0x80)));
  }
}

#define GEMM_TILE(R, C) gemm_tile(xs, rs, tile_weights, qsum, scale, ys, N, K, n0, R, C)
#define TILE_CASES(R)                                                      \
  case R * 8 + 4: GEMM_TILE(R, 4); break; case R * 8 + 3: GEMM_TILE(R, 3); break; \
  case R * 8 + 2: GEMM_TILE(R, 2); break; case R * 8 + 1: GEMM_TILE(R, 1); break;

/* x (M, K) float32 (times inv_smoothing (K,) first, where not NULL); packed, qsum (N,) int32 and scale (N,)
 * bfloat16 bits of the weights -> y (M, N) float32. K % 64 == 0. Returns 0, or -1 where memory ran out. */
int maskserve_int8_gemm(const float* x, const float* inv_smoothing, const int8_t* packed, const int32_t* qsum,
                        const uint16_t* scale, float* y, int64_t M, int64_t N, int64_t K, int threads) {
  uint8_t* shifted = malloc((size_t)(M * K));
  float* row_scale = malloc((size_t)M * sizeof(float));
  if (!shifted || !row_scale) {
    free(shifted), free(row_scale);
    return -1;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, inv_smoothing, shifted + m * K, row_scale + m, K);
    /* (the loop's barrier: every row is quantized before any product reads it) */
    int64_t blocks = (N + 15) / 16, tasks = (blocks + 3) / 4; /* a task: 4 blocks, 64 channels, */
    int64_t chunks = (M + GEMM_ROW_CHUNK - 1) / GEMM_ROW_CHUNK;    /* of one chunk of rows */
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
      for (int64_t c = 0; c < chunks; c++) {
        int64_t b0 = t * 4, n0 = b0 * 16;
        int cols = blocks - b0 < 4 ? (int)(blocks - b0) : 4;
        const int8_t* tile_weights = packed + b0 * K * 16;
        int64_t m_end = (c + 1) * GEMM_ROW_CHUNK < M ? (c + 1) * GEMM_ROW_CHUNK : M;
        for (int64_t m0 = c * GEMM_ROW_CHUNK; m0 < m_end; m0 += GEMM_ROWS) {
          int rows = m_end - m0 < GEMM_ROWS ? (int)(m_end - m0) : GEMM_ROWS;
          const uint8_t* xs = shifted + m0 * K;
          const float* rs = row_scale + m0;
          float* ys = y + m0 * N;
          switch (rows * 8 + cols) { /* constant tile sizes: accumulators in registers */
            TILE_CASES(5) TILE_CASES(4) TILE_CASES(3) TILE_CASES(2) TILE_CASES(1)
            default: break;
          }
        }
      }
    }
  }
  free(shifted), free(row_scale);
  return 0;
}

#pragma GCC pop_options
