/* y[b][n] = sum_i w[n][i] * x[b][i] for any number of input rows b, float32: the decode step's and
 * prefill's projections.
 *
 * The weight is stored row-blocked: [n / 16][k][16], i.e. for each block of 16 output rows, column i of
 * those rows is 16 consecutive floats. A block is one sequential stream of memory, and each step is a
 * 16-wide multiply-add with x[b][i] broadcast: no horizontal sums, no packing of x.
 *
 * The work is cut into tiles of TILE_ROWS input rows x TILE_BLOCKS blocks (8 x 48 outputs): 24 vector
 * accumulators stay in registers over the whole k, and each step loads 3 weight vectors and 8 scalars of
 * x for 24 multiply-adds. Threads split the column groups (TILE_BLOCKS blocks each); within a group the
 * row tiles run one after another, so the group's weights (48 x k floats, 110 KB at k = 576) come from
 * memory once and from the core's L2 cache for every further tile of 8 rows. Measured on a 2-core Zen 4
 * (SmolLM2-135M's projections, weights cold, best of 12): 25 ms at 16 rows and 85 ms at 64 rows against
 * 36 / 104 ms for oneDNN's prepacked weights, 200 GFLOP/s from 64 rows up (the machine's matmul limit);
 * 12 ms at 1-2 rows, as fast as a kernel streaming one block for all rows at once.
 *
 * Written with GCC vector extensions rather than intrinsics: built with -march=native, one 16-float
 * vector is one AVX-512 register, two AVX2 registers, or four SSE registers (where the 24 accumulators
 * no longer fit in registers and the compiler spills).
 * Column groups are split across threads with OpenMP; linked against the process's libgomp (torch's),
 * so it shares torch's thread pool instead of starting a second one.
 */
#include <stddef.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4)));

#define TILE_ROWS 8
#define TILE_BLOCKS 3
#define BLOCK 16

/* R rows of x (row stride ldx) times C consecutive blocks (block stride bstride floats) into y. */
#define DEFINE_TILE(R, C)                                                                          \
    static void tile_##R##_##C(const float *restrict p, long bstride, const float *restrict x,    \
                               long ldx, float *restrict y, long ldy, long k) {                   \
        v16 acc[R][C];                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 3") for (int c = 0; c < C; c++) acc[r][c] = (v16){0};              \
        for (long i = 0; i < k; i++) {                                                             \
            v16 w[C];                                                                              \
            _Pragma("GCC unroll 3") for (int c = 0; c < C; c++)                                    \
                w[c] = *(const v16 *)(p + c * bstride + i * BLOCK);                                \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                  \
                float xv = x[r * ldx + i];                                                         \
                _Pragma("GCC unroll 3") for (int c = 0; c < C; c++) acc[r][c] += w[c] * xv;        \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                        \
            _Pragma("GCC unroll 3") for (int c = 0; c < C; c++)                                    \
                *(v16_unaligned *)(y + r * ldy + c * BLOCK) = acc[r][c];                           \
    }

#define DEFINE_TILES(C)                                                                            \
    DEFINE_TILE(1, C) DEFINE_TILE(2, C) DEFINE_TILE(3, C) DEFINE_TILE(4, C)                        \
    DEFINE_TILE(5, C) DEFINE_TILE(6, C) DEFINE_TILE(7, C) DEFINE_TILE(8, C)
DEFINE_TILES(1)
DEFINE_TILES(2)
DEFINE_TILES(3)

typedef void (*tile_fn)(const float *, long, const float *, long, float *, long, long);
#define TILE_ROW(C) {0, tile_1_##C, tile_2_##C, tile_3_##C, tile_4_##C, tile_5_##C, tile_6_##C, tile_7_##C, tile_8_##C}
/* tiles[c][r]: a tile of r rows and c blocks (the last group and the last rows may be narrower). */
static const tile_fn tiles[TILE_BLOCKS + 1][TILE_ROWS + 1] = {{0}, TILE_ROW(1), TILE_ROW(2), TILE_ROW(3)};

/* w: [nb][k][16] (64-byte aligned), x: [rows][k], y: [rows][nb * 16]. Returns 0, or -1 for bad rows. */
int ft_row_blocked_matmul(const float *w, const float *x, float *y, long nb, long k, long rows, int threads) {
    if (rows < 1) return -1;
    long ldy = nb * BLOCK;
    long groups = (nb + TILE_BLOCKS - 1) / TILE_BLOCKS;
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (long g = 0; g < groups; g++) {
        long first = g * TILE_BLOCKS;
        int blocks = (int)(nb - first < TILE_BLOCKS ? nb - first : TILE_BLOCKS);
        for (long r0 = 0; r0 < rows; r0 += TILE_ROWS) {
            int r = (int)(rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS);
            tiles[blocks][r](w + first * k * BLOCK, k * BLOCK, x + r0 * k, k, y + r0 * ldy + first * BLOCK, ldy, k);
        }
    }
    return 0;
}
