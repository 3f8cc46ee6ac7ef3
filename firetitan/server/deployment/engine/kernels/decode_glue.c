/* The work between a forward's matmuls, float32, as one call per need instead of dozens of tensor ops:
 * RMSNorm fused with the residual add before it, and one layer's attention for a set of token rows
 * (head norms, rotary embedding, the KV-cache write, softmax attention over each row's own prefix in its
 * sequence's KV row): one new token per sequence in a decode step, every prompt position in a prefill.
 *
 * Eager torch spends ~45 ops per layer on this (a few microseconds of dispatch each, plus an SDPA
 * call that pads every sequence to the longest and masks); here each sequence attends to exactly its
 * own positions. Written with GCC vector extensions (one 16-float vector is one AVX-512 register, two
 * AVX2 ones, ...), built with -O3 -march=native; (sequence, KV head) pairs are split across torch's
 * OpenMP threads (the process's libgomp). The math is the model's own; results differ from torch's by
 * float rounding only (another summation order, a polynomial exp within 2 ulp).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

static inline v16 lanes_where(v16i mask, v16 yes, v16 no) {
    return (v16)(((v16i)yes & mask) | ((v16i)no & ~mask));
}

/* exp(x) for 16 floats: x = k ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial, 2^k by
 * the exponent bits. Below -87 (e^-87 is near the smallest normal float) the result is 0. */
static inline v16 v16_exp(v16 x) {
    const v16 zero = {0};
    const v16i under = x < -87.0f;
    x = lanes_where(under, zero - 87.0f, x);
    x = lanes_where(x > 88.0f, zero + 88.0f, x);
    const v16 magic = zero + 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const v16 k = (x * 1.44269504088896341f + magic) - magic;
    const v16 r = x - k * 0.693359375f + k * 2.12194440e-4f;
    v16 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v16i bits = (__builtin_convertvector(k, v16i) + 127) << 23;
    return lanes_where(under, zero, p * (v16)bits);
}

/* x[0..n) = exp(x[0..n)); x has room for n rounded up to 16 (the extra lanes are scratch). */
static void exp_inplace(float *x, long n) {
    for (long i = 0; i < n; i += 16) {
        v16 v;
        memcpy(&v, x + i, sizeof v);
        v = v16_exp(v);
        memcpy(x + i, &v, sizeof v);
    }
}

static float dot(const float *restrict a, const float *restrict b, long n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (long i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* RMSNorm of `x` into `out` (may alias x): out = x * rsqrt(mean(x^2) + eps) * w, as the modules do. */
static void rms_norm_row(const float *x, const float *restrict w, float *out, long dim, float eps) {
    float ss = dot(x, x, dim);
    float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (long i = 0; i < dim; i++) out[i] = (x[i] * scale) * w[i];
}

/* hidden[r] += delta[r] (when delta is not NULL), then out[r] = RMSNorm(hidden[r]) * weight, per row.
 * All rows contiguous [rows][dim]. Rows are split across `threads` when there are enough of them to pay
 * for the team (a prefill's). */
void ft_add_rms_norm(float *restrict hidden, const float *restrict delta, const float *restrict weight,
                     float *restrict out, long rows, long dim, float eps, int threads) {
    const int team = rows * dim >= 1L << 16 && threads > 1 ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (long r = 0; r < rows; r++) {
        float *h = hidden + r * dim;
        if (delta) {
            const float *d = delta + r * dim;
#pragma omp simd
            for (long i = 0; i < dim; i++) h[i] += d[i];
        }
        rms_norm_row(h, weight, out + r * dim, dim, eps);
    }
}

/* Rotary embedding of one head in place: x * cos + roll(x, D/2) * sin, `sin` with its first half negated
 * (so rotate_half needs no sign flips). */
static void rope(float *restrict x, const float *restrict cos_row, const float *restrict sin_row, long dim,
                 float *restrict scratch) {
    long half = dim / 2;
    memcpy(scratch, x + half, half * sizeof(float));
    memcpy(scratch + half, x, half * sizeof(float));
    for (long i = 0; i < dim; i++) x[i] = x[i] * cos_row[i] + scratch[i] * sin_row[i];
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum16(v16 x) {
    v8 lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (const char *)&x + sizeof lo, sizeof hi);
    v8 s8 = lo + hi;
    v4 l4, h4;
    memcpy(&l4, &s8, sizeof l4);
    memcpy(&h4, (const char *)&s8 + sizeof l4, sizeof h4);
    v4 s4 = l4 + h4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* exp(s - top) over s[0..span) in place (the lanes up to the next 16 are scratch); returns their sum. */
static float softmax_numerators(float *s, long span, float top) {
    for (long t = 0; t < span; t++) s[t] -= top;
    for (long t = span; t < (span + 15) / 16 * 16; t++) s[t] = -INFINITY;
    exp_inplace(s, span);
    float total = 0.0f;
    for (long t = 0; t < span; t++) total += s[t];
    return total;
}

/* One query head `q` (normed, rotated) over `span` cached keys/values [span][dim]: out = softmax(q.K * scale) V.
 * Head sizes of 2, 4 or 8 vectors (dim 32, 64, 128) keep the query and the output sum in registers. */
#define DEFINE_HEAD_ATTENTION(ND)                                                                       \
    static void head_attention_##ND(const float *q, const float *keys, const float *values, long span,  \
                                    float scale, float *s, float *out, const float *pf_k,               \
                                    const float *pf_v, long pf_span) {                                  \
        v16 qv[ND], o[ND];                                                                              \
        for (int j = 0; j < ND; j++) {                                                                  \
            memcpy(&qv[j], q + 16 * j, sizeof(v16));                                                    \
            qv[j] *= scale;                                                                             \
            o[j] = (v16){0};                                                                            \
        }                                                                                               \
        float top = -INFINITY;                                                                          \
        for (long t = 0; t < span; t++) {                                                               \
            if (t < pf_span)                                                                            \
                for (int j = 0; j < ND; j++) __builtin_prefetch(pf_k + (t * ND + j) * 16, 0, 2);        \
            v16 acc = {0};                                                                              \
            for (int j = 0; j < ND; j++) {                                                              \
                v16 kv;                                                                                 \
                memcpy(&kv, keys + (t * ND + j) * 16, sizeof kv);                                       \
                acc += qv[j] * kv;                                                                      \
            }                                                                                           \
            s[t] = hsum16(acc);                                                                         \
            top = s[t] > top ? s[t] : top;                                                              \
        }                                                                                               \
        const float inv = 1.0f / softmax_numerators(s, span, top);                                      \
        for (long t = 0; t < span; t++) {                                                               \
            if (t < pf_span)                                                                            \
                for (int j = 0; j < ND; j++) __builtin_prefetch(pf_v + (t * ND + j) * 16, 0, 2);        \
            const float w = s[t];                                                                       \
            for (int j = 0; j < ND; j++) {                                                              \
                v16 vv;                                                                                 \
                memcpy(&vv, values + (t * ND + j) * 16, sizeof vv);                                     \
                o[j] += w * vv;                                                                         \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < ND; j++) {                                                                  \
            v16 r = o[j] * inv;                                                                         \
            memcpy(out + 16 * j, &r, sizeof r);                                                         \
        }                                                                                               \
    }

DEFINE_HEAD_ATTENTION(2)
DEFINE_HEAD_ATTENTION(4)
DEFINE_HEAD_ATTENTION(8)

static void head_attention(const float *q, const float *keys, const float *values, long span, long dim,
                           float scale, float *s, float *out, const float *pf_k, const float *pf_v, long pf_span) {
    switch (dim) {
    case 32: head_attention_2(q, keys, values, span, scale, s, out, pf_k, pf_v, pf_span); return;
    case 64: head_attention_4(q, keys, values, span, scale, s, out, pf_k, pf_v, pf_span); return;
    case 128: head_attention_8(q, keys, values, span, scale, s, out, pf_k, pf_v, pf_span); return;
    }
    float top = -INFINITY;
    for (long t = 0; t < span; t++) {
        s[t] = dot(q, keys + t * dim, dim) * scale;
        top = s[t] > top ? s[t] : top;
    }
    const float inv = 1.0f / softmax_numerators(s, span, top);
    for (long d = 0; d < dim; d++) out[d] = 0.0f;
    for (long t = 0; t < span; t++) {
        const float w = s[t], *value = values + t * dim;
#pragma omp simd
        for (long d = 0; d < dim; d++) out[d] += w * value[d];
    }
    for (long d = 0; d < dim; d++) out[d] *= inv;
}

/* One layer's attention for `batch` token rows.
 *
 * q/k/v: token row b at q + b * ldq (heads * dim floats), k + b * ldk, v + b * ldv (kv_heads * dim).
 * q_norm / k_norm: RMSNorm weights over dim applied per head before the rotary embedding, or NULL.
 * cos / sin: rotary tables [table_rows][dim] (sin first half negated); pos[b]: row b's position.
 * slot[b]: the KV row (sequence) row b belongs to, < num_slots; NULL means row b is slot b (decode).
 * k_cache / v_cache: [num_slots][kv_heads][capacity][dim]. Every row's K/V is written at pos[b] of its
 * slot first; then each row attends to positions 0..pos[b] of its slot, so the rows of one prompt (a
 * prefill) see each other's keys causally. out: [batch][heads * dim]. Scale 1/sqrt(dim).
 * Query head h reads KV head h / (heads / kv_heads), as repeat_kv lays them out.
 * Returns 0; -1 for bad shapes, -2 when scratch memory cannot be had.
 */
int ft_decode_attention(const float *q, long ldq, const float *k, long ldk, const float *v, long ldv,
                        const float *q_norm, const float *k_norm, float eps, const float *cos_table,
                        const float *sin_table, long table_rows, const long *pos, const long *slot, long num_slots,
                        float *k_cache, float *v_cache, long capacity,
                        float *out, long batch, int heads, int kv_heads, int dim, int threads) {
    if (batch < 1 || kv_heads < 1 || heads % kv_heads != 0 || dim < 2 || dim % 2 != 0) return -1;
    if (!slot && batch > num_slots) return -1;
    const int group = heads / kv_heads;
    long longest = 0;
    for (long b = 0; b < batch; b++) {
        if (pos[b] < 0 || pos[b] >= capacity || pos[b] >= table_rows) return -1;
        if (slot && (slot[b] < 0 || slot[b] >= num_slots)) return -1;
        if (pos[b] + 1 > longest) longest = pos[b] + 1;
    }
    const long span_pad = (longest + 15) / 16 * 16;
    const float scale = 1.0f / sqrtf((float)dim);
    const long tasks = (long)batch * kv_heads;
    if (threads < 1) threads = 1;
    /* Scratch for every thread up front, so a failed allocation returns before anything is written.
     * Per thread: one head's scores [span_pad], the group's queries [group][dim], one rotary scratch row. */
    const long per_thread = (span_pad + group * dim + dim + 15) / 16 * 16;
    float *scratch = aligned_alloc(64, threads * per_thread * sizeof(float));
    if (!scratch) return -2;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + omp_get_thread_num() * per_thread, *qs = scores + span_pad, *tmp = qs + group * dim;
        /* Every row's key (normed, rotated) and value go into the cache first: a token attends to itself
         * and, in a prefill, to the rows before it. The loop's closing barrier orders the two phases. */
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            const long b = task / kv_heads, kvh = task % kv_heads, p = pos[b];
            const long row = ((slot ? slot[b] : b) * kv_heads + kvh) * capacity + p;
            float *knew = k_cache + row * dim;
            memcpy(knew, k + b * ldk + kvh * dim, dim * sizeof(float));
            if (k_norm) rms_norm_row(knew, k_norm, knew, dim, eps);
            rope(knew, cos_table + p * dim, sin_table + p * dim, dim, tmp);
            memcpy(v_cache + row * dim, v + b * ldv + kvh * dim, dim * sizeof(float));
        }
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            const long b = task / kv_heads, kvh = task % kv_heads, p = pos[b], span = p + 1;
            const float *cos_row = cos_table + p * dim, *sin_row = sin_table + p * dim;
            const long first_row = ((slot ? slot[b] : b) * kv_heads + kvh) * capacity;
            const float *keys = k_cache + first_row * dim, *values = v_cache + first_row * dim;
            for (int g = 0; g < group; g++) {
                float *qh = qs + g * dim;
                memcpy(qh, q + b * ldq + (long)(kvh * group + g) * dim, dim * sizeof(float));
                if (q_norm) rms_norm_row(qh, q_norm, qh, dim, eps);
                rope(qh, cos_row, sin_row, dim, tmp);
            }
            /* While the first head reads this task's keys and values, ask for the next task's (same rows of
             * the next KV row): the short streams of a cold cache then overlap with this task's math. */
            const float *pf_k = keys, *pf_v = values;
            long pf_span = 0;
            if (task + 1 < tasks) {
                const long nb = (task + 1) / kv_heads, nkvh = (task + 1) % kv_heads;
                const long next_row = ((slot ? slot[nb] : nb) * kv_heads + nkvh) * capacity;
                pf_k = k_cache + next_row * dim;
                pf_v = v_cache + next_row * dim;
                pf_span = pos[nb] + 1;
            }
            for (int g = 0; g < group; g++)
                head_attention(qs + g * dim, keys, values, span, dim, scale, scores,
                               out + (long)b * heads * dim + (long)(kvh * group + g) * dim,
                               pf_k, pf_v, g == 0 ? pf_span : 0);
        }
    }
    free(scratch);
    return 0;
}

/* out[r] = silu(gate_up[r][:inter]) * gate_up[r][inter:], silu(g) = g / (1 + exp(-g)), per row of
 * gate_up [rows][2 * inter] (row stride `ld`); out [rows][inter]. Rows are split across `threads` when
 * there are enough of them to pay for the team (a prefill's). */
void ft_silu_mul(const float *gate_up, long ld, float *out, long rows, long inter, int threads) {
    const int team = rows * inter >= 1L << 16 ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (long r = 0; r < rows; r++) {
        const float *gate = gate_up + r * ld, *up = gate + inter;
        float *o = out + r * inter;
        long i = 0;
        for (; i + 16 <= inter; i += 16) {
            v16 g, u;
            memcpy(&g, gate + i, sizeof g);
            memcpy(&u, up + i, sizeof u);
            v16 s = g / (1.0f + v16_exp(-g)) * u;
            memcpy(o + i, &s, sizeof s);
        }
        for (; i < inter; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
