/* The engine's float32 CPU kernels for AVX2 + FMA (kernels/avx2.py builds and calls them): the base GEMM, the
 * attention of a step's tokens over their KV-cache rows, and the small per-layer ops around them (RoPE with the
 * cache write, the residual add with RMSNorm, SiLU-and-multiply), each one call instead of several torch ops.
 *
 * GEMM: y[m, n] = x[m, k] @ W[n, k]^T, W packed once into panels of 8 output features:
 * packed[p][i][j] = W[p * 8 + j][i] (zero past n), so a panel streams from memory in order, 32 bytes per input feature.
 * - Decode-sized x (5 to 8 rows): one pass per panel, rows x 8 outputs in up to 8 ymm accumulators (per input
 *   feature 1 weight load, a broadcast and an FMA per row): every weight byte is read once, while later lines are
 *   prefetched, so the step runs near the speed of streaming the weights rather than of two passes over them.
 * - Otherwise: pairs of panels, groups of at most 6 rows x 16 outputs in 12 accumulators (per input feature 2 weight
 *   loads, 6 broadcasts, 12 FMAs); a pair (16 x k floats) stays in L1/L2 while the row groups pass over it.
 * Panels (or pairs) are split across OpenMP threads. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 8
#define MAX_ROWS 6          /* rows of a pair pass */
#define MAX_ONE_PASS 8      /* rows of a single-panel pass */
#define AHEAD_SMALL 32      /* lines prefetched ahead when the rows are few (memory-bound) */
#define AHEAD_LARGE 16

void bdlora_pack_f32(const float *w, float *packed, int64_t n, int64_t k) {
    for (int64_t p = 0; p < (n + PANEL - 1) / PANEL; p++)
        for (int64_t i = 0; i < k; i++)
            for (int64_t j = 0; j < PANEL; j++) {
                int64_t row = p * PANEL + j;
                packed[(p * k + i) * PANEL + j] = row < n ? w[row * k + i] : 0.0f;
            }
}

static inline void store_columns(float *y, __m256 v, int cols) {
    if (cols == PANEL) {
        _mm256_storeu_ps(y, v);
    } else {
        float tail[PANEL];
        _mm256_storeu_ps(tail, v);
        memcpy(y, tail, (size_t)cols * sizeof(float));
    }
}

/* rows (at most 8) x the 8 outputs of one panel, in one pass. A line holds two input features. */
static inline __attribute__((always_inline)) void rows_times_panel(const float *x, const float *panel, float *y,
                                                                    int64_t n, int64_t k, int rows, int cols) {
    __m256 acc[MAX_ONE_PASS];
    for (int r = 0; r < MAX_ONE_PASS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        if ((i & 1) == 0) _mm_prefetch((const char *)(panel + (i + 2 * AHEAD_SMALL) * PANEL), _MM_HINT_T0);
        __m256 w = _mm256_loadu_ps(panel + i * PANEL);
        for (int r = 0; r < MAX_ONE_PASS; r++)
            if (r < rows) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * k + i), w, acc[r]);
    }
    for (int r = 0; r < rows; r++) store_columns(y + r * n, acc[r], cols);
}

/* rows (at most 6) x the 16 outputs of panels a and b (b's first cols_b are real). */
static inline __attribute__((always_inline)) void rows_times_pair(const float *x, const float *a, const float *b,
                                                                   float *y, int64_t n, int64_t k, int rows,
                                                                   int cols_b, int ahead) {
    __m256 lo[MAX_ROWS], hi[MAX_ROWS];
    for (int r = 0; r < MAX_ROWS; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        if ((i & 1) == 0) {
            _mm_prefetch((const char *)(a + (i + 2 * ahead) * PANEL), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + (i + 2 * ahead) * PANEL), _MM_HINT_T0);
        }
        __m256 w_lo = _mm256_loadu_ps(a + i * PANEL), w_hi = _mm256_loadu_ps(b + i * PANEL);
        for (int r = 0; r < MAX_ROWS; r++)
            if (r < rows) {
                __m256 xi = _mm256_broadcast_ss(x + r * k + i);
                lo[r] = _mm256_fmadd_ps(xi, w_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(xi, w_hi, hi[r]);
            }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(y + r * n, lo[r]);
        store_columns(y + r * n + PANEL, hi[r], cols_b);
    }
}

#define ONE_CASE(R) case R: rows_times_panel(x + r0 * k, panel, y + r0 * n + p * PANEL, n, k, R, cols); break;
#define PAIR_CASE(R) case R: rows_times_pair(x + r0 * k, a, a + k * PANEL, y + r0 * n + p * PANEL, n, k, R, cols_b, \
                                             ahead); break;

/* All rows against panel p alone, at most 8 at a time. */
static void rows_times_one_panel(const float *x, const float *packed, float *y, int64_t m, int64_t n, int64_t k,
                                 int64_t p) {
    const float *panel = packed + p * k * PANEL;
    int cols = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
    for (int64_t r0 = 0; r0 < m; r0 += MAX_ONE_PASS) {
        switch (m - r0 < MAX_ONE_PASS ? (int)(m - r0) : MAX_ONE_PASS) {
            ONE_CASE(1) ONE_CASE(2) ONE_CASE(3) ONE_CASE(4) ONE_CASE(5) ONE_CASE(6) ONE_CASE(7) ONE_CASE(8)
        }
    }
}

void bdlora_gemm_f32(const float *x, const float *packed, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    int64_t panels = (n + PANEL - 1) / PANEL;
    if (m > 4 && m <= MAX_ONE_PASS) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < panels; p++) rows_times_one_panel(x, packed, y, m, n, k, p);
        return;
    }
    int ahead = m <= 4 ? AHEAD_SMALL : AHEAD_LARGE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < (panels + 1) / 2; q++) {
        int64_t p = 2 * q;
        if (p + 1 == panels) {
            rows_times_one_panel(x, packed, y, m, n, k, p);
            continue;
        }
        const float *a = packed + p * k * PANEL;
        int cols_b = n - (p + 1) * PANEL < PANEL ? (int)(n - (p + 1) * PANEL) : PANEL;
        for (int64_t r0 = 0; r0 < m;) {
            int64_t left = m - r0, groups = (left + MAX_ROWS - 1) / MAX_ROWS;
            int rows = (int)((left + groups - 1) / groups);  /* 10 rows as 5 + 5, not 6 + 4 */
            switch (rows) { PAIR_CASE(1) PAIR_CASE(2) PAIR_CASE(3) PAIR_CASE(4) PAIR_CASE(5) PAIR_CASE(6) }
            r0 += rows;
        }
    }
}

/* Attention of a step's tokens (one query each) against their rows of the KV cache, GQA without repeating K/V.
 * q: token t's head h at q + t * q_stride + h * d. K and V: row r's KV head g, key j at
 * base + r * row_stride + g * head_stride + j * d. Token i (of n) is the step's token tokens[i], in cache row
 * rows[i], with lengths[i] keys; its output head h goes to out + tokens[i] * out_stride + h * d. d is a multiple of 8.
 * Scores are kept (not an online softmax): one buffer of lengths[i] floats per query head. */

static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The 8 sums of a0..a7, in order. */
static inline __m256 sums8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* e^x for x <= 0 (here x - max): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative error ~2e-7);
 * below -87 it is 0. */
static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

/* s[j] = scale * q . k_j for j < len, 8 keys at a time. */
static void scores_of(const float *q, const float *k, int64_t len, int64_t d, float scale, float *s) {
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        __m256 acc[8];
        for (int64_t c = 0; c < 8 * d; c += 16) _mm_prefetch((const char *)(k + (j + 16) * d + c), _MM_HINT_T0);
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int64_t c = 0; c < d; c += 8) {
            __m256 qc = _mm256_loadu_ps(q + c);
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + (j + u) * d + c), acc[u]);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale)));
    }
    for (; j < len; j++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + j * d + c), acc);
        s[j] = sum8(acc) * scale;
    }
}

/* s[j] = e^(s[j] - max s) / sum, in place. */
static void softmax_in_place(float *s, int64_t len) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < len; j++) top = s[j] > top ? s[j] : top;
    int64_t j = 0;
    __m256 sum = _mm256_setzero_ps(), max8 = _mm256_set1_ps(top);
    for (; j + 8 <= len; j += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), max8));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    total = sum8(sum);
    for (; j < len; j++) total += (s[j] = expf(s[j] - top));
    float inverse = 1.0f / total;
    for (j = 0; j < len; j++) s[j] *= inverse;
}

/* o = sum_j p[j] v_j (d floats), the output kept in registers 64 floats at a time. */
static void weighted_values(const float *p, const float *v, int64_t len, int64_t d, float *o) {
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
        int64_t width = d - c0 < 64 ? d - c0 : 64;
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; j++) {
            for (int64_t c = 0; c < width; c += 16) _mm_prefetch((const char *)(v + (j + 16) * d + c0 + c), _MM_HINT_T0);
            __m256 pj = _mm256_broadcast_ss(p + j);
            for (int u = 0; u < 8; u++)
                if (u * 8 < width) acc[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * d + c0 + u * 8), acc[u]);
        }
        for (int u = 0; u < 8; u++)
            if (u * 8 < width) _mm256_storeu_ps(o + c0 + u * 8, acc[u]);
    }
}

void bdlora_cache_attention_f32(const float *q, int64_t q_stride, const float *k, const float *v, int64_t row_stride,
                                 int64_t head_stride, const int64_t *tokens, const int64_t *rows,
                                 const int64_t *lengths, int64_t n, int64_t heads, int64_t kv_heads, int64_t d,
                                 float scale, float *out, int64_t out_stride, int threads) {
    int64_t group = heads / kv_heads;
    #pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t task = 0; task < n * kv_heads; task++) {
        int64_t i = task / kv_heads, g = task % kv_heads, len = lengths[i];
        const float *kr = k + rows[i] * row_stride + g * head_stride;
        const float *vr = v + rows[i] * row_stride + g * head_stride;
        float *s = malloc((size_t)len * sizeof(float));
        for (int64_t h = g * group; h < (g + 1) * group; h++) {
            scores_of(q + tokens[i] * q_stride + h * d, kr, len, d, scale, s);
            softmax_in_place(s, len);
            weighted_values(s, vr, len, d, out + tokens[i] * out_stride + h * d);
        }
        free(s);
    }
}

/* RoPE (transformers' rotate_half form) on the step's q and k heads, q in place in qkv, k and v stored into the
 * cache. qkv: token i's row at qkv + i * qkv_stride, heads q heads then kv_heads k heads then kv_heads v heads, d
 * floats each (d a multiple of 16); cos, sin [t, d]. Token i's kv head g goes to k_cache + slots[i * kv_heads + g] * d
 * (v likewise). Multiplies and adds stay separate (built with -ffp-contract=off): the bits equal torch's
 * x * cos + rotate_half(x) * sin. */
static inline void rotate(const float *x, const float *c, const float *s, int64_t d, float *out) {
    int64_t half = d / 2;
    for (int64_t j = 0; j < half; j += 8) {
        __m256 lo = _mm256_loadu_ps(x + j), hi = _mm256_loadu_ps(x + half + j);
        __m256 new_lo = _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + j)), _mm256_mul_ps(hi, _mm256_loadu_ps(s + j)));
        __m256 new_hi = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + half + j)),
                                      _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + j)));
        _mm256_storeu_ps(out + j, new_lo);
        _mm256_storeu_ps(out + half + j, new_hi);
    }
}

void bdlora_rope_store_f32(float *qkv, int64_t qkv_stride, const float *cos, const float *sin, int64_t t,
                           int64_t heads, int64_t kv_heads, int64_t d, const int64_t *slots, float *k_cache,
                           float *v_cache) {
    for (int64_t i = 0; i < t; i++) {
        float *row = qkv + i * qkv_stride;
        const float *c = cos + i * d, *s = sin + i * d;
        for (int64_t h = 0; h < heads; h++) rotate(row + h * d, c, s, d, row + h * d);
        for (int64_t g = 0; g < kv_heads; g++) {
            int64_t slot = slots[i * kv_heads + g];
            rotate(row + (heads + g) * d, c, s, d, k_cache + slot * d);
            memcpy(v_cache + slot * d, row + (heads + kv_heads + g) * d, (size_t)d * sizeof(float));
        }
    }
}

/* x += o (o may be NULL), then h = w * x / sqrt(mean(x^2) + eps), row by row; x and h [t, n], n a multiple of 8. */
void bdlora_add_rms_norm_f32(float *x, const float *o, const float *w, float *h, int64_t t, int64_t n, float eps) {
    for (int64_t i = 0; i < t; i++) {
        float *xr = x + i * n, *hr = h + i * n;
        __m256 squares = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j += 8) {
            __m256 v = _mm256_loadu_ps(xr + j);
            if (o) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(o + i * n + j));
                _mm256_storeu_ps(xr + j, v);
            }
            squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
        }
        __m256 scale = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / (float)n + eps));
        for (int64_t j = 0; j < n; j += 8)
            _mm256_storeu_ps(hr + j, _mm256_mul_ps(_mm256_loadu_ps(w + j),
                                                   _mm256_mul_ps(_mm256_loadu_ps(xr + j), scale)));
    }
}

/* out[i, j] = silu(gu[i, j]) * gu[i, inter + j]; gu's rows gu_stride apart, out [t, inter], inter a multiple of 8.
 * sigmoid(g) from e = e^-|g|: 1 / (1 + e) for g >= 0, e / (1 + e) below. */
void bdlora_silu_mul_f32(const float *gu, int64_t gu_stride, float *out, int64_t t, int64_t inter) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < t; i++) {
        const float *g = gu + i * gu_stride, *u = g + inter;
        for (int64_t j = 0; j < inter; j += 8) {
            __m256 x = _mm256_loadu_ps(g + j);
            __m256 e = exp_nonpositive(_mm256_or_ps(x, sign));  /* e^-|x| */
            __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
            __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
            _mm256_storeu_ps(out + i * inter + j, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(u + j)));
        }
    }
}
