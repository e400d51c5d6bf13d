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
 *
 * The work is split into tasks of query rows (token, head) that read the same KV head of the same cache row, so that
 * each task reads those keys and values once (the step's tokens are 1 query each, the heads of a group share K/V):
 * - a decoding token (the only token of its row in the step): a tile of its group's query heads (TILE_ROWS at most),
 *   `attend_tile`. Keys and values are read KEY_BLOCK at a time, and every row of the tile passes over a block while
 *   it is in L1 (3 rows x 4 keys of scores, 3 rows x 32 features of output, 12 accumulators each). Scores are kept,
 *   one buffer of rows x the longest length, then a softmax per row.
 * - a prompt chunk (consecutive tokens of one row): QUERY_GROUP tokens with all their group's heads, `attend_blocked`
 *   (below): keys packed transposed a block at a time, register tiles with no horizontal sums, online softmax. */

#define TILE_ROWS 12
#define KEY_BLOCK 64
#define QUERY_GROUP 32  /* prompt tokens per task of the blocked path */
#define PACK 64         /* keys per block of the blocked path */

typedef struct {
    int64_t first, tokens;  /* tokens[first .. first + tokens - 1], all in one cache row */
    int64_t g, h0, heads;   /* KV head g, query heads h0 .. h0 + heads - 1 of it */
    int64_t blocked;        /* a prompt chunk's (attend_blocked), else a decoding token's (attend_tile) */
} Tile;

static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The 4 sums of a0..a3, in order. */
static inline __m128 sums4(const __m256 *a) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
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

/* s[r][j .. j + 3] = scale * q[r] . k_(j .. j + 3) for rows r < nr (at most 3); k points at key j. */
static inline __attribute__((always_inline)) void scores_3x4(const float *const *q, const float *k, int64_t d,
                                                              float scale, float *const *s, int64_t j, int nr) {
    __m256 acc[3][4];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
        __m256 k0 = _mm256_loadu_ps(k + c), k1 = _mm256_loadu_ps(k + d + c);
        __m256 k2 = _mm256_loadu_ps(k + 2 * d + c), k3 = _mm256_loadu_ps(k + 3 * d + c);
        for (int r = 0; r < 3; r++)
            if (r < nr) {
                __m256 qc = _mm256_loadu_ps(q[r] + c);
                acc[r][0] = _mm256_fmadd_ps(qc, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qc, k1, acc[r][1]);
                acc[r][2] = _mm256_fmadd_ps(qc, k2, acc[r][2]);
                acc[r][3] = _mm256_fmadd_ps(qc, k3, acc[r][3]);
            }
    }
    for (int r = 0; r < nr; r++) _mm_storeu_ps(s[r] + j, _mm_mul_ps(sums4(acc[r]), _mm_set1_ps(scale)));
}

/* o[r][c0 .. c0 + 8 * width) += sum_j p[r][j] v_j for keys j0 <= j < j1, rows r < nr (at most 3), width <= 4 vectors. */
static inline __attribute__((always_inline)) void values_3x32(const float *const *p, const float *v, int64_t j0,
                                                               int64_t j1, int64_t d, int64_t c0, int width,
                                                               float *const *o, int nr) {
    __m256 acc[3][4];
    for (int r = 0; r < 3; r++)
        for (int u = 0; u < 4; u++)
            acc[r][u] = r < nr && u < width ? _mm256_loadu_ps(o[r] + c0 + 8 * u) : _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        const float *vj = v + j * d + c0;
        __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_setzero_ps(), v2 = v1, v3 = v1;
        if (width > 1) v1 = _mm256_loadu_ps(vj + 8);
        if (width > 2) v2 = _mm256_loadu_ps(vj + 16);
        if (width > 3) v3 = _mm256_loadu_ps(vj + 24);
        for (int r = 0; r < 3; r++)
            if (r < nr) {
                __m256 pj = _mm256_broadcast_ss(p[r] + j);
                acc[r][0] = _mm256_fmadd_ps(pj, v0, acc[r][0]);
                if (width > 1) acc[r][1] = _mm256_fmadd_ps(pj, v1, acc[r][1]);
                if (width > 2) acc[r][2] = _mm256_fmadd_ps(pj, v2, acc[r][2]);
                if (width > 3) acc[r][3] = _mm256_fmadd_ps(pj, v3, acc[r][3]);
            }
    }
    for (int r = 0; r < nr; r++)
        for (int u = 0; u < 4; u++)
            if (u < width) _mm256_storeu_ps(o[r] + c0 + 8 * u, acc[r][u]);
}

/* max(start, s[0 .. n)). */
static float row_max(const float *s, int64_t n, float start) {
    __m256 max8 = _mm256_set1_ps(start);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) max8 = _mm256_max_ps(max8, _mm256_loadu_ps(s + j));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(max8), _mm256_extractf128_ps(max8, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    float top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
    for (; j < n; j++) top = s[j] > top ? s[j] : top;
    return top;
}

/* s[j] = e^(s[j] - top) for j < n, in place; returns their sum. */
static float exp_sum(float *s, int64_t n, float top) {
    __m256 top8 = _mm256_set1_ps(top), sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), top8));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = sum8(sum);
    for (; j < n; j++) total += (s[j] = expf(s[j] - top));
    return total;
}

/* s[j] = e^(s[j] - max s) / sum for j < len, in place. */
static void softmax_in_place(float *s, int64_t len) {
    float inverse = 1.0f / exp_sum(s, len, row_max(s, len, -INFINITY));
    for (int64_t j = 0; j < len; j++) s[j] *= inverse;
}

/* The query heads of one decoding token over its `longest` keys: scores block by block, a softmax per row, then the
 * values block by block. `s_buffer` holds rows x longest floats. */
static void attend_tile(const float *const *q, const float *k, const float *v, int64_t longest, int64_t nrows,
                        int64_t d, float scale, float *const *o, float *s_buffer) {
    float *s[TILE_ROWS];
    for (int64_t r = 0; r < nrows; r++) {
        s[r] = s_buffer + r * longest;
        memset(o[r], 0, (size_t)d * sizeof(float));
    }
    for (int64_t j0 = 0; j0 < longest; j0 += KEY_BLOCK) {
        int64_t j1 = j0 + KEY_BLOCK < longest ? j0 + KEY_BLOCK : longest;
        for (int64_t r0 = 0; r0 < nrows; r0 += 3) {
            int nr = nrows - r0 < 3 ? (int)(nrows - r0) : 3;
            int64_t j = j0;
            for (; j + 4 <= j1; j += 4) {
                switch (nr) {
                    case 3: scores_3x4(q + r0, k + j * d, d, scale, s + r0, j, 3); break;
                    case 2: scores_3x4(q + r0, k + j * d, d, scale, s + r0, j, 2); break;
                    default: scores_3x4(q + r0, k + j * d, d, scale, s + r0, j, 1);
                }
            }
            for (; j < j1; j++)
                for (int r = 0; r < nr; r++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t c = 0; c < d; c += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q[r0 + r] + c), _mm256_loadu_ps(k + j * d + c), acc);
                    s[r0 + r][j] = sum8(acc) * scale;
                }
        }
    }
    for (int64_t r = 0; r < nrows; r++) softmax_in_place(s[r], longest);
    for (int64_t j0 = 0; j0 < longest; j0 += KEY_BLOCK) {
        int64_t j1 = j0 + KEY_BLOCK < longest ? j0 + KEY_BLOCK : longest;
        for (int64_t r0 = 0; r0 < nrows; r0 += 3) {
            int nr = nrows - r0 < 3 ? (int)(nrows - r0) : 3;
            for (int64_t c0 = 0; c0 < d; c0 += 32) {
                int width = d - c0 < 32 ? (int)((d - c0) / 8) : 4;
                const float *const *p = (const float *const *)(s + r0);
                switch (nr) {
                    case 3: values_3x32(p, v, j0, j1, d, c0, width, o + r0, 3); break;
                    case 2: values_3x32(p, v, j0, j1, d, c0, width, o + r0, 2); break;
                    default: values_3x32(p, v, j0, j1, d, c0, width, o + r0, 1);
                }
            }
        }
    }
}

/* The blocked path for a prompt chunk's queries (flash-attention order): per block of PACK keys, packed transposed
 * once ([d][PACK]) and shared by every row of the task, each group of 6 rows gets its scores from a 6 x 16 register
 * tile (no horizontal sums), an online-softmax update (running max and sum per row) and its output from another
 * 6 x 16 tile over the block's values. A block past a whole group's lengths (the causal upper triangle) is skipped. */

/* s[r][j .. j + 16) = scale * q[r] . kt[:, j .. j + 16) for rows r < nr (at most 6); kt is [d][PACK]. */
static inline __attribute__((always_inline)) void qk_6x16(const float *const *q, const float *kt, int64_t d,
                                                           int64_t j, float scale, float *s, int nr) {
    __m256 lo[6], hi[6];
    for (int r = 0; r < 6; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i++) {
        __m256 a = _mm256_loadu_ps(kt + i * PACK + j), b = _mm256_loadu_ps(kt + i * PACK + j + 8);
        for (int r = 0; r < 6; r++)
            if (r < nr) {
                __m256 x = _mm256_broadcast_ss(q[r] + i);
                lo[r] = _mm256_fmadd_ps(x, a, lo[r]);
                hi[r] = _mm256_fmadd_ps(x, b, hi[r]);
            }
    }
    __m256 sc = _mm256_set1_ps(scale);
    for (int r = 0; r < nr; r++) {
        _mm256_storeu_ps(s + r * PACK + j, _mm256_mul_ps(lo[r], sc));
        _mm256_storeu_ps(s + r * PACK + j + 8, _mm256_mul_ps(hi[r], sc));
    }
}

/* o[r][c .. c + 8 * width) += sum_{j < valid[r]} p[r][j] v_j[c ..] for rows r < nr (at most 6), width 1 or 2
 * vectors; p is [6][PACK], v_j at v + j * d. A row never reads a value past its own keys (0 * inf would be NaN). */
static inline __attribute__((always_inline)) void pv_6x16(const float *p, const float *v, const int64_t *valid,
                                                           int64_t d, int64_t c, int width, float *const *o, int nr) {
    __m256 lo[6], hi[6];
    int64_t fewest = valid[0], most = valid[0];
    for (int r = 0; r < 6; r++) {
        lo[r] = r < nr ? _mm256_loadu_ps(o[r] + c) : _mm256_setzero_ps();
        hi[r] = r < nr && width > 1 ? _mm256_loadu_ps(o[r] + c + 8) : _mm256_setzero_ps();
        if (r < nr) {
            fewest = valid[r] < fewest ? valid[r] : fewest;
            most = valid[r] > most ? valid[r] : most;
        }
    }
    for (int64_t j = 0; j < most; j++) {
        __m256 a = _mm256_loadu_ps(v + j * d + c), b = width > 1 ? _mm256_loadu_ps(v + j * d + c + 8) : a;
        if (j < fewest) {
            for (int r = 0; r < 6; r++)
                if (r < nr) {
                    __m256 x = _mm256_broadcast_ss(p + r * PACK + j);
                    lo[r] = _mm256_fmadd_ps(x, a, lo[r]);
                    if (width > 1) hi[r] = _mm256_fmadd_ps(x, b, hi[r]);
                }
        } else {  /* the rows' last keys differ: each row up to its own */
            for (int r = 0; r < 6; r++)
                if (r < nr && j < valid[r]) {
                    __m256 x = _mm256_broadcast_ss(p + r * PACK + j);
                    lo[r] = _mm256_fmadd_ps(x, a, lo[r]);
                    if (width > 1) hi[r] = _mm256_fmadd_ps(x, b, hi[r]);
                }
        }
    }
    for (int r = 0; r < nr; r++) {
        _mm256_storeu_ps(o[r] + c, lo[r]);
        if (width > 1) _mm256_storeu_ps(o[r] + c + 8, hi[r]);
    }
}

#define BY_ROWS(CALL) switch (nr) { case 6: CALL(6); break; case 5: CALL(5); break; case 4: CALL(4); break; \
                                    case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); }

/* Row r's running max m and sum l take the block's scores s[0 .. valid): they become the weights e^(s - new max)
 * (pv_6x16 reads no further), and o is rescaled to the new max. A row with no keys in the block (valid <= 0) keeps
 * its state. */
static void online_softmax_row(float *s, int64_t valid, float *m, float *l, float *o, int64_t d) {
    if (valid <= 0) return;
    float top = row_max(s, valid, *m), total = exp_sum(s, valid, top);
    if (top != *m) {
        float correction = expf(*m - top);  /* 0 on the first block (m = -inf), when l and o are 0 */
        __m256 c8 = _mm256_set1_ps(correction);
        for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), c8));
        *l *= correction;
        *m = top;
    }
    *l += total;
}

/* kt[i][j] = k[j][i] for keys j < nk (k's rows d floats apart), 0 for nk <= j < padded; kt's rows PACK apart. Full
 * groups of 8 keys x 8 features move as an 8 x 8 transpose in registers. */
static void pack_transposed(const float *k, int64_t nk, int64_t padded, int64_t d, float *kt) {
    int64_t full = nk / 8 * 8;
    for (int64_t j = 0; j < full; j += 8)
        for (int64_t i = 0; i < d; i += 8) {
            __m256 r[8], t[8];
            for (int u = 0; u < 8; u++) r[u] = _mm256_loadu_ps(k + (j + u) * d + i);
            for (int u = 0; u < 8; u += 2) {
                t[u] = _mm256_unpacklo_ps(r[u], r[u + 1]);
                t[u + 1] = _mm256_unpackhi_ps(r[u], r[u + 1]);
            }
            for (int u = 0; u < 8; u += 4) {
                r[u] = _mm256_shuffle_ps(t[u], t[u + 2], 0x44);
                r[u + 1] = _mm256_shuffle_ps(t[u], t[u + 2], 0xEE);
                r[u + 2] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0x44);
                r[u + 3] = _mm256_shuffle_ps(t[u + 1], t[u + 3], 0xEE);
            }
            for (int u = 0; u < 4; u++) {
                _mm256_storeu_ps(kt + (i + u) * PACK + j, _mm256_permute2f128_ps(r[u], r[u + 4], 0x20));
                _mm256_storeu_ps(kt + (i + u + 4) * PACK + j, _mm256_permute2f128_ps(r[u], r[u + 4], 0x31));
            }
        }
    for (int64_t i = 0; i < d; i++) {
        for (int64_t j = full; j < nk; j++) kt[i * PACK + j] = k[j * d + i];
        for (int64_t j = nk; j < padded; j++) kt[i * PACK + j] = 0.0f;
    }
}

/* nrows rows (position-major: a token's heads, then the next token's) over the keys k, v of one KV head of one cache
 * row. Scratch: kt [d * PACK], s [6 * PACK], ml [2 * nrows]. */
static void attend_blocked(const float *const *q, const float *k, const float *v, const int64_t *len, int64_t nrows,
                           int64_t d, float scale, float *const *o, float *kt, float *s, float *ml) {
    int64_t longest = 0;
    float *m = ml, *l = ml + nrows;
    for (int64_t r = 0; r < nrows; r++) {
        longest = len[r] > longest ? len[r] : longest;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        memset(o[r], 0, (size_t)d * sizeof(float));
    }
    for (int64_t j0 = 0; j0 < longest; j0 += PACK) {
        int64_t nk = longest - j0 < PACK ? longest - j0 : PACK, padded = (nk + 15) / 16 * 16;
        pack_transposed(k + j0 * d, nk, padded, d, kt);
        for (int64_t r0 = 0; r0 < nrows; r0 += 6) {
            int nr = nrows - r0 < 6 ? (int)(nrows - r0) : 6;
            int64_t reach = 0;
            for (int r = 0; r < nr; r++) reach = len[r0 + r] > reach ? len[r0 + r] : reach;
            if (reach <= j0) continue;
            for (int64_t j = 0; j < padded; j += 16) {
#define QK(R) qk_6x16(q + r0, kt, d, j, scale, s, R)
                BY_ROWS(QK)
#undef QK
            }
            int64_t valid[6];
            for (int r = 0; r < nr; r++) {
                valid[r] = len[r0 + r] - j0 < nk ? len[r0 + r] - j0 : nk;
                online_softmax_row(s + r * PACK, valid[r], m + r0 + r, l + r0 + r, o[r0 + r], d);
            }
            for (int64_t c = 0; c < d; c += 16) {
                int width = d - c < 16 ? 1 : 2;
#define PV(R) pv_6x16(s, v + j0 * d, valid, d, c, width, o + r0, R)
                BY_ROWS(PV)
#undef PV
            }
        }
    }
    for (int64_t r = 0; r < nrows; r++) {
        __m256 inverse = _mm256_set1_ps(1.0f / l[r]);
        for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(o[r] + c, _mm256_mul_ps(_mm256_loadu_ps(o[r] + c), inverse));
    }
}

/* A single token (a decoding sequence) is a tile of its group's heads (TILE_ROWS at most; attend_tile). Consecutive
 * tokens in one cache row (a prompt chunk) go to the blocked path, QUERY_GROUP tokens and all their heads per task.
 * Returns the number of tasks written to `tiles` (or counted, when it is NULL). */
static int64_t make_tiles(const int64_t *rows, int64_t n, int64_t kv_heads, int64_t group, Tile *tiles) {
    int64_t heads = group <= TILE_ROWS ? group : TILE_ROWS, count = 0;
    for (int64_t i = 0; i < n;) {
        int64_t run = 1;
        while (i + run < n && rows[i + run] == rows[i]) run++;
        if (run == 1) {
            for (int64_t g = 0; g < kv_heads; g++)
                for (int64_t h = 0; h < group; h += heads) {
                    if (tiles) tiles[count] = (Tile){i, 1, g, g * group + h, group - h < heads ? group - h : heads, 0};
                    count++;
                }
        } else {
            for (int64_t t0 = 0; t0 < run; t0 += QUERY_GROUP)
                for (int64_t g = 0; g < kv_heads; g++) {
                    int64_t t = run - t0 < QUERY_GROUP ? run - t0 : QUERY_GROUP;
                    if (tiles) tiles[count] = (Tile){i + t0, t, g, g * group, group, 1};
                    count++;
                }
        }
        i += run;
    }
    return count;
}

void bdlora_cache_attention_f32(const float *q, int64_t q_stride, const float *k, const float *v, int64_t row_stride,
                                 int64_t head_stride, const int64_t *tokens, const int64_t *rows,
                                 const int64_t *lengths, int64_t n, int64_t heads, int64_t kv_heads, int64_t d,
                                 float scale, float *out, int64_t out_stride, int threads) {
    int64_t group = heads / kv_heads, longest = 0, most_rows = TILE_ROWS > QUERY_GROUP * group ? TILE_ROWS
                                                                                               : QUERY_GROUP * group;
    for (int64_t i = 0; i < n; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    int64_t count = make_tiles(rows, n, kv_heads, group, NULL);
    Tile *tiles = malloc((size_t)(count ? count : 1) * sizeof(Tile));
    make_tiles(rows, n, kv_heads, group, tiles);
    #pragma omp parallel num_threads(threads)
    {
        float *s_buffer = malloc((size_t)(TILE_ROWS * (longest ? longest : 1)) * sizeof(float));
        float *kt = malloc((size_t)(d * PACK + 6 * PACK + 2 * most_rows) * sizeof(float));
        const float **qr = malloc((size_t)most_rows * sizeof(float *));
        float **orow = malloc((size_t)most_rows * sizeof(float *));
        int64_t *len = malloc((size_t)most_rows * sizeof(int64_t));
        #pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < count; task++) {
            Tile tile = tiles[task];
            int64_t nrows = 0, row = rows[tile.first];
            for (int64_t t = tile.first; t < tile.first + tile.tokens; t++)
                for (int64_t h = tile.h0; h < tile.h0 + tile.heads; h++) {
                    qr[nrows] = q + tokens[t] * q_stride + h * d;
                    orow[nrows] = out + tokens[t] * out_stride + h * d;
                    len[nrows++] = lengths[t];
                }
            const float *kr = k + row * row_stride + tile.g * head_stride;
            const float *vr = v + row * row_stride + tile.g * head_stride;
            if (!tile.blocked)
                attend_tile(qr, kr, vr, lengths[tile.first], nrows, d, scale, orow, s_buffer);
            else
                attend_blocked(qr, kr, vr, len, nrows, d, scale, orow, kt, kt + d * PACK, kt + d * PACK + 6 * PACK);
        }
        free(s_buffer);
        free(kt);
        free(qr);
        free(orow);
        free(len);
    }
    free(tiles);
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
