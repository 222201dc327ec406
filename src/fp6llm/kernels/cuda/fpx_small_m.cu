// TC-FPx small-M kernel for Hopper (and any sm_80+ GPU): out[M, N] = x[M, K] @ W.T, M <= 16, W in layout 2.
//
// Compiled at run time through NVRTC (kernels/fpx_cuda.py prepends the format's constants and the generated
// de-quantization function `dequant_tile`, both derived from packing.placement). Reads exactly the planes the
// Triton kernel reads (packing.py, docs/layout.md): one 16 x 128 tile of a plane is 64 w contiguous words, lane l's
// 2 w words at (j / G) * 32 G + l G + j % G (G = min(4, 2 w)), so a warp's loads are 128-bit and contiguous, and
// after de-quantization lane l holds exactly its mma.m16n8k16 A fragments (pair q = 4 ks + r is register r of k-step
// ks). The weight is the A operand (16 rows per warp), x^T the B operand (8 rows of x per n8 block; lane 4 g + t
// loads row g's 32 contiguous columns 32 t .. 32 t + 31 of the tile: the k order both operands agree on).
//
// Grid: (ceil(N / 64), SPLIT). A CTA of 4 / ROW_TILES warps covers 64 rows (ROW_TILES 16-row tiles per warp, each
// load of x feeding all of them; the warps share x through L1) and
// K tiles [blockIdx.y * kps, ...). SPLIT > 1: each CTA writes its float32 partial to ws, the last CTA of a row block
// to arrive (an arrival counter, reset by that CTA: CUDA-graph safe) sums the partials in split order, so results do
// not depend on timing; or (CLUSTER_SPLIT, sm_90, SPLIT <= 8) the row block's CTAs are a cluster and sum each
// other's partials from shared memory.
//
// Defined by the prepended header: N_BLOCKS_M (1: M <= 8, 2: M <= 16), PREFETCH_X, IS_BF16, HAS_BIAS,
// PLANE_WIDTHS...,
// Powers / POWER_PARAMS / POWERS (the multipliers dequant_tile uses, passed as kernel parameters),
// LOAD_PLANES(kt) and dequant_tile().

#ifndef ROW_TILES
#define ROW_TILES 1  // 16-row weight tiles per warp, all fed by each load of x (2: x read at compute time)
#endif
#define WARPS (4 / ROW_TILES)  // a CTA covers 64 rows either way
#if ROW_TILES > 1 && PREFETCH_X
#error "ROW_TILES > 1 reads x at compute time (PREFETCH_X 0)"
#endif
#ifndef W_AHEAD
#define W_AHEAD 2  // K tiles of weights in register buffers: W_AHEAD - 1 in flight while one is computed
#endif
#if W_AHEAD < 2 || W_AHEAD > 4
#error "W_AHEAD is 2, 3 or 4"
#endif
#ifndef CLUSTER_SPLIT
#define CLUSTER_SPLIT 0  // > 0 (sm_90): the SPLIT = CLUSTER_SPLIT CTAs of a row block are a cluster (see the epilogue)
#endif
#ifndef PDL
#define PDL 0  // 1 (sm_90): a grid that may start before the previous kernel of its stream completed (see the kernel)
#endif
#ifndef EARLY_WEIGHTS
#define EARLY_WEIGHTS 0  // 1 (with PDL): the first weight tile is loaded before the wait
#endif
#if CLUSTER_SPLIT
#define CLUSTER_DIMS __cluster_dims__(1, CLUSTER_SPLIT, 1)
#else
#define CLUSTER_DIMS
#endif

// PREFETCH_X 1: a tile's x columns are loaded with its weights, a tile ahead (registers: 16 per n8 block per
// buffer); 0: at the start of its compute (an L1 hit, hidden behind the de-quantization), which frees 32 registers
// at M > 8.
struct Tile {
    PLANE_REGS  // u32 w0[2 * W0]; u32 w1[2 * W1]; ...
#if PREFETCH_X
    uint4 x[N_BLOCKS_M][4];
#endif
};

struct XRows {  // lane 4 g + t's rows of x: g (n8 block 0) and g + 8 (block 1)
    const uint4* __restrict__ row0;
    const uint4* __restrict__ row1;
};

__device__ __forceinline__ void load_x(uint4 (&x)[N_BLOCKS_M][4], const XRows& rows, int kt, int lane) {
    const int col = kt * 16 + (lane & 3) * 4;  // in uint4 (8 halves): 128 columns = 16 uint4 per row
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        x[0][i] = __ldg(rows.row0 + col + i);
#if N_BLOCKS_M > 1
        x[1][i] = __ldg(rows.row1 + col + i);
#endif
    }
}

__device__ __forceinline__ void load_planes(Tile& tile, const u32* __restrict__ p0, const u32* __restrict__ p1,
                                            const u32* __restrict__ p2, long tile_index, int lane) {
    LOAD_PLANES  // fills tile.w0 ... from plane tile `tile_index`
}

__device__ __forceinline__ void load_tile(Tile& tile, const u32* __restrict__ p0, const u32* __restrict__ p1,
                                          const u32* __restrict__ p2, const XRows& rows, long tile_index, int kt,
                                          int lane) {
    load_planes(tile, p0, p1, p2, tile_index, lane);
#if PREFETCH_X
    load_x(tile.x, rows, kt, lane);
#endif
}

// Independent accumulator chains per n8 block: consecutive k-steps' MMAs go to different chains, so the tensor
// core's latency (~30 cycles per dependent mma.sync) is not paid 8 times in a row per tile.
// measured on an H200 (2026-12-01): 1 chain 1.05-1.2x slower, 2 = 4 within noise (per row tile: the sums are the
// same, bit for bit, at any ROW_TILES)
#define CHAINS (4 / N_BLOCKS_M)

// A warp's ROW_TILES tiles of one K tile, all multiplied with the same registers of x.
__device__ __forceinline__ void compute_group(const Tile (&tiles)[ROW_TILES], const Powers& pw, const XRows& rows,
                                              int kt, int lane, float (&acc)[ROW_TILES][N_BLOCKS_M][CHAINS][4]) {
#if PREFETCH_X
    const uint4 (&x)[N_BLOCKS_M][4] = tiles[0].x;
#else
    uint4 x[N_BLOCKS_M][4];
    load_x(x, rows, kt, lane);
#endif
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        u32 a[32];
        dequant_tile(tiles[rt], pw, a);
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
            u32 frag[4] = {a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3]};
#if IS_BF16
#pragma unroll
            for (int r = 0; r < 4; ++r) frag[r] = to_bf16x2(frag[r]);
#endif
#pragma unroll
            for (int b = 0; b < N_BLOCKS_M; ++b) {
                const u32* xs = reinterpret_cast<const u32*>(&x[b][0]);  // 16 words = 32 columns of row g
                mma(acc[rt][b][ks % CHAINS], frag, xs[2 * ks], xs[2 * ks + 1]);
            }
        }
    }
}

__device__ __forceinline__ void load_group(Tile (&tiles)[ROW_TILES], const u32* __restrict__ p0,
                                           const u32* __restrict__ p1, const u32* __restrict__ p2, const XRows& rows,
                                           const long (&base)[ROW_TILES], int kt, int ahead, int lane) {
    // K tile kt + ahead, its index summed as base + kt + ahead: the one-tile kernel's arithmetic, instruction for
    // instruction (base + (kt + ahead) costs it 7 more per loop pass and, at M = 16, 8 registers).
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt)
        load_tile(tiles[rt], p0, p1, p2, rows, base[rt] + kt + ahead, kt + ahead, lane);
}

// Every accumulator of a thread: row tile rt, n8 block b, element i (weight row 16 (row_tile + rt) + g + 8 (i / 2),
// x row 8 b + 2 t + i % 2), unrolled.
#define FOR_EACH_OUTPUT(rt, b, i)                                  \
    _Pragma("unroll") for (int rt = 0; rt < ROW_TILES; ++rt)       \
        _Pragma("unroll") for (int b = 0; b < N_BLOCKS_M; ++b)     \
            _Pragma("unroll") for (int i = 0; i < 4; ++i)

extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(WARPS * 32)
fpx_small_m(const u16* __restrict__ x, int ldx, const u32* __restrict__ p0, const u32* __restrict__ p1,
            const u32* __restrict__ p2, const float* __restrict__ scales, const u16* __restrict__ bias,
            u16* __restrict__ out, int ldo, float* __restrict__ ws, int* __restrict__ counts,
            int M, int N, int K, double scale_factor_d, int kps POWER_PARAMS) {
    const Powers pw = POWERS;  // the multipliers 2^r of dequant_tile, one u32 parameter each
    const float scale_factor = (float)scale_factor_d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int k_tiles = (K + 127) / 128;
    const int row_tile = (blockIdx.x * WARPS + warp) * ROW_TILES;  // the first 16-row tile of this warp
    const int n_tiles = (N + 15) / 16;
    const int kt0 = blockIdx.y * kps, kt1 = min(kt0 + kps, k_tiles);

    const bool work = row_tile < n_tiles && kt0 < kt1;
    long base[ROW_TILES];  // a warp's tiles past the last one read the last one again (their rows are not stored)
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt)
        base[rt] = (long)(ROW_TILES == 1 ? row_tile : min(row_tile + rt, n_tiles - 1)) * k_tiles;
    // W_AHEAD register buffers in a ring: the next W_AHEAD - 1 tiles' loads are in flight while one is computed
    // (2: the ping-pong of the measured kernel, instruction for instruction).
    Tile tiles[W_AHEAD][ROW_TILES];
#if PDL
    // Launched with programmatic stream serialization, this grid may run while the previous kernel (the one that
    // writes x, or may still read memory that becomes out or ws) drains. Before the wait nothing is touched but,
    // with EARLY_WEIGHTS (weights that no kernel of the stream writes: the caller's promise), the first weight tile
    // (a ring's first W_AHEAD - 1): the wait is made to depend on their words, or ptxas would sink the loads below it.
#if EARLY_WEIGHTS
    u32 dep = 0;
#pragma unroll
    for (int rt = 0; rt < ROW_TILES; ++rt) {
        if (work) load_planes(tiles[0][rt], p0, p1, p2, base[rt] + kt0, lane);
        dep ^= TILE_WORDS_XOR(tiles[0][rt]);
    }
#pragma unroll
    for (int i = 1; i < W_AHEAD - 1; ++i)  // a ring's other early tiles too (none in the ping-pong)
#pragma unroll
        for (int rt = 0; rt < ROW_TILES; ++rt)
            if (work && kt0 + i < kt1) {
                load_planes(tiles[i][rt], p0, p1, p2, base[rt] + kt0 + i, lane);
                dep ^= TILE_WORDS_XOR(tiles[i][rt]);
            }
    griddep_wait_after(dep);
#else
    griddep_wait();
#endif
#endif
    float chains[ROW_TILES][N_BLOCKS_M][CHAINS][4] = {};
    if (work) {
        // Lanes past the last row of x read row M - 1 again (an L1 hit): the MMA columns they feed are outputs for
        // rows >= M, which are never stored, so they need no zeroing.
        const XRows rows = {reinterpret_cast<const uint4*>(x + (long)min(g, M - 1) * ldx),
                            reinterpret_cast<const uint4*>(x + (long)min(g + 8, M - 1) * ldx)};
#if PDL && EARLY_WEIGHTS
#if PREFETCH_X
        load_x(tiles[0][0].x, rows, kt0, lane);
#endif
#else
        load_group(tiles[0], p0, p1, p2, rows, base, kt0, 0, lane);
#endif
#if W_AHEAD == 2
        // (the measured ping-pong, as written then: the ring's loop below compiles 4-6 instructions longer)
        for (int kt = kt0; kt < kt1; kt += 2) {
            if (kt + 1 < kt1) load_group(tiles[1], p0, p1, p2, rows, base, kt, 1, lane);
            compute_group(tiles[0], pw, rows, kt, lane, chains);
            if (kt + 1 >= kt1) break;
            if (kt + 2 < kt1) load_group(tiles[0], p0, p1, p2, rows, base, kt, 2, lane);
            compute_group(tiles[1], pw, rows, kt + 1, lane, chains);
        }
#else
#pragma unroll
        for (int i = 1; i < W_AHEAD - 1; ++i)
            if (kt0 + i < kt1) {
#if PDL && EARLY_WEIGHTS
#if PREFETCH_X
                load_x(tiles[i][0].x, rows, kt0 + i, lane);  // its weights were loaded before the wait
#endif
#else
                load_group(tiles[i], p0, p1, p2, rows, base, kt0, i, lane);
#endif
            }
        // Unrolled over the ring, so that each buffer is named at compile time: tile kt + i is computed from
        // buffer i, after the loads of tile kt + i + W_AHEAD - 1 into the buffer computed just before it.
        for (int kt = kt0; kt < kt1; kt += W_AHEAD) {
#pragma unroll
            for (int i = 0; i < W_AHEAD; ++i) {
                if (kt + i >= kt1) break;
                if (kt + i + W_AHEAD - 1 < kt1)
                    load_group(tiles[(i + W_AHEAD - 1) % W_AHEAD], p0, p1, p2, rows, base, kt, i + W_AHEAD - 1, lane);
                compute_group(tiles[i], pw, rows, kt + i, lane, chains);
            }
        }
#endif
    }

#if PDL
    griddep_launch_dependents();  // the next grid's CTAs may start while this one finishes
#endif
    float acc[ROW_TILES][N_BLOCKS_M][4];
    FOR_EACH_OUTPUT(rt, b, i) {
        acc[rt][b][i] = chains[rt][b][0][i];
#pragma unroll
        for (int c = 1; c < CHAINS; ++c) acc[rt][b][i] += chains[rt][b][c][i];
    }
    const int n0 = row_tile * 16 + g;
    if (gridDim.y == 1) {
        FOR_EACH_OUTPUT(rt, b, i) {
            const int n = n0 + 16 * rt + 8 * (i / 2), m = 8 * b + 2 * t + i % 2;
            if (n < N && m < M) out[(long)m * ldo + n] = finish(acc[rt][b][i], n, scales, scale_factor, bias);
        }
        return;
    }
#if CLUSTER_SPLIT
    // Split-K in the cluster of the row block's CLUSTER_SPLIT CTAs: each leaves its partial [64 rows x 8 N_BLOCKS_M]
    // in its shared memory, and CTA r sums rows r, r + SPLIT, ... of every CTA's (distributed shared memory) in
    // split order (the same sums, bit for bit, as the workspace path below): no global partials, fences, counters.
    __shared__ float partial[64 * 8 * N_BLOCKS_M];
    FOR_EACH_OUTPUT(rt, b, i)
        partial[(16 * (warp * ROW_TILES + rt) + g + 8 * (i / 2)) * 8 * N_BLOCKS_M + 8 * b + 2 * t + i % 2] =
            acc[rt][b][i];
    cluster_sync();
    const int rank = blockIdx.y;  // the cluster's rank: its CTAs are (x, 0 .. SPLIT - 1)
    const int rows = (64 - rank + CLUSTER_SPLIT - 1) / CLUSTER_SPLIT;
    for (int e = threadIdx.x; e < rows * M; e += WARPS * 32) {
        const int row = rank + CLUSTER_SPLIT * (e / M), m = e % M, n = blockIdx.x * 64 + row;
        const u32 addr = smem_address(&partial[row * 8 * N_BLOCKS_M + m]);
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < CLUSTER_SPLIT; ++s) v += load_cluster(addr, s);
        if (n < N) out[(long)m * ldo + n] = finish(v, n, scales, scale_factor, bias);
    }
    cluster_sync();  // no CTA leaves while another may still read its partial
#else
    // Split-K: publish this CTA's partial [64 rows x M], count arrivals, the last one reduces.
    const int n_pad = gridDim.x * 64;
    float* part = ws + (long)blockIdx.y * n_pad * M;
    FOR_EACH_OUTPUT(rt, b, i) {
        const int m = 8 * b + 2 * t + i % 2;
        if (m < M) part[(long)(n0 + 16 * rt + 8 * (i / 2)) * M + m] = acc[rt][b][i];
    }
    __threadfence();
    __syncthreads();
    __shared__ int arrived;
    if (threadIdx.x == 0) arrived = atomicAdd(counts + blockIdx.x, 1);
    __syncthreads();
    if (arrived != gridDim.y - 1) return;
    __threadfence();
    FOR_EACH_OUTPUT(rt, b, i) {
        const int n = n0 + 16 * rt + 8 * (i / 2), m = 8 * b + 2 * t + i % 2;
        if (m >= M) continue;
        // The partials in split order (results independent of timing).
        const float v = sum_partials(ws + (long)n * M + m, (long)n_pad * M, gridDim.y);
        if (n < N) out[(long)m * ldo + n] = finish(v, n, scales, scale_factor, bias);
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = 0;  // ready for the next launch or graph replay
#endif
}
