// TC-FPx mid-M kernel (Hopper, any sm_80+ GPU): out[M, N] = x[M, K] @ W.T for M = 9..128, W in layout 2.
//
// The small-M kernel (fpx_small_m.cu) with three changes, in a source of its own so that the small kernel's
// schedule stays as measured (a parameterized source cost it 3-14 % at M <= 8, 2026-12-02):
// - up to 8 n8 blocks of x rows per CTA (64 rows; grid z covers more), x staged in shared memory by cp.async a K
//   tile ahead (two buffers; the CTA's warps share it), read a k-step pair at a time (one 16-byte LDS per n8
//   block). Reading x through L1 at compute time instead (the first version) ran 2-3x slower than the Triton
//   kernel at M = 32-64 (H200, 2026-12-02): each warp waited on its x loads;
// - ROW_TILES 16-row weight tiles per warp, de-quantized once and multiplied with every n8 block: each read of x
//   from shared memory serves 16 x ROW_TILES rows (x is the larger stream at mid M: M / (8 ROW_TILES) bytes per
//   weight);
// - WARPS warps per CTA over 16 x ROW_TILES x WARPS rows, all on the same K tiles, so one copy of x serves them.
// Lanes, fragments and the k order are the small kernel's: lane 4 g + t holds, after de-quantization, the
// mma.m16n8k16 A fragments of its rows (pair q = 4 ks + r is register r of k-step ks), and reads row g of each n8
// block at columns 32 t .. 32 t + 31 of a 128-column tile.
//
// Grid: (ceil(M / (8 N_BLOCKS_M)), ceil(N / ROWS_PER_CTA), SPLIT). SPLIT > 1: each CTA writes its float32 partial
// [ROWS_PER_CTA x 8 N_BLOCKS_M] to ws at slab (z, split), the last CTA of (row block, z block) to arrive (an arrival counter,
// reset by that CTA: CUDA-graph safe) sums the slabs in split order, so results do not depend on timing.
//
// Defined by the prepended header: N_BLOCKS_M, ROW_TILES, WARPS, IS_BF16, HAS_BIAS, PLANE_REGS, LOAD_PLANES,
// (inserted after Tile) dequant_tile, and PDL where the grid is launched with programmatic stream serialization.

#define ROWS_PER_CTA (16 * ROW_TILES * WARPS)
// Grid (z blocks, row blocks, splits): the z blocks of one row block are neighbours in launch order, so the CTAs that
// read the same weight tiles for other rows of x run together and the second reads are L2 hits.
#define Z_BLOCK blockIdx.x
#define ROW_BLOCK blockIdx.y
#define ROW_BLOCKS gridDim.y
#define SPLIT_INDEX blockIdx.z
#define SPLITS gridDim.z
#define M_PER_CTA (8 * N_BLOCKS_M)
// One x row of a K tile in shared memory: 16 chunks of 16 bytes, padded to 17, chunk c stored at c ^ ((c >> 3) << 1):
// the 8 lanes of a quarter-warp's LDS.128 (rows g, g + 1; t = 0..3; chunk 4 t + p) then hit 8 distinct bank groups.
#define X_ROW 17
#define X_BUFFER (M_PER_CTA * X_ROW)

__device__ __forceinline__ int x_chunk(int c) { return c ^ ((c >> 3) << 1); }

__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
    unsigned addr;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(addr), "l"(global));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// The CTA's copy of one K tile of x, rows m0 .. m0 + M_PER_CTA - 1: thread i copies chunk i % 16 of rows
// i / 16 + j THREADS / 16, j < X_COPIES. Rows past M are not copied: their shared memory feeds only the MMA columns
// of outputs for rows >= M, which are never stored, so whatever it holds is harmless.
#define THREADS (WARPS * 32)
#define X_COPIES ((M_PER_CTA * 16 + THREADS - 1) / THREADS)
#define X_ROWS_STEP (THREADS / 16)

struct XCopy {
    const uint4* global;  // chunk c of the thread's first row, column 0 of the tile
    long step;            // X_ROWS_STEP rows of x, in uint4
    int smem;             // in uint4, within a buffer
    int rows;             // rows of this CTA's x from the thread's first: copy j while j X_ROWS_STEP < rows
};

__device__ __forceinline__ XCopy x_copy(const uint4* __restrict__ xq, int ldx_q, int m0, int M) {
    const int row = threadIdx.x / 16, c = threadIdx.x % 16;
    return {xq + (long)(m0 + row) * ldx_q + c, (long)X_ROWS_STEP * ldx_q, row * X_ROW + x_chunk(c),
            min(M - m0, M_PER_CTA) - row};
}

__device__ __forceinline__ void stage_x(uint4* xs, const XCopy& copy, int kt) {
#pragma unroll
    for (int j = 0; j < X_COPIES; ++j)
        if (j * X_ROWS_STEP < copy.rows)
            cp_async16(xs + copy.smem + j * X_ROWS_STEP * X_ROW, copy.global + j * copy.step + kt * 16);
    cp_async_commit();
}

struct Tile {
    PLANE_REGS  // u32 w0[2 * W0]; u32 w1[2 * W1]; ...
};

struct Group {  // a warp's ROW_TILES tiles of one K tile
    Tile t[ROW_TILES];
};

__device__ __forceinline__ void load_tile(Tile& tile, const u32* __restrict__ p0, const u32* __restrict__ p1,
                                          const u32* __restrict__ p2, long tile_index, int lane) {
    LOAD_PLANES  // fills tile.w0 ... from plane tile `tile_index`
}

__device__ __forceinline__ void load_group(Group& group, const u32* __restrict__ p0, const u32* __restrict__ p1,
                                           const u32* __restrict__ p2, const long (&base)[ROW_TILES], int kt,
                                           int lane) {
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r) load_tile(group.t[r], p0, p1, p2, base[r] + kt, lane);
}

__device__ __forceinline__ void compute_group(const Group& group, const Powers& pw, const uint4* xs, int lane,
                                              float (&acc)[ROW_TILES][N_BLOCKS_M][4]) {
    u32 a[ROW_TILES][32];
#pragma unroll
    for (int r = 0; r < ROW_TILES; ++r) dequant_tile(group.t[r], pw, a[r]);
    // Row g, chunk x_chunk(4 t + p) = 4 t + (p ^ sw), sw = 2 (t >> 1): chunks p = 0, 1 from base + sw, p = 2, 3 from
    // base + 2 - sw, so every load is a lane base plus an immediate.
    const int t = lane % 4, sw = (t >> 1) << 1;
    const uint4* low = xs + (lane / 4) * X_ROW + 4 * t + sw;
    const uint4* high = xs + (lane / 4) * X_ROW + 4 * t + 2 - sw;
#pragma unroll
    for (int p = 0; p < 4; ++p) {  // k-steps 2 p and 2 p + 1: columns 32 t + 8 p .. + 7 of each row
        uint4 xv[N_BLOCKS_M];
#pragma unroll
        for (int b = 0; b < N_BLOCKS_M; ++b) xv[b] = (p < 2 ? low : high)[8 * b * X_ROW + (p & 1)];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int ks = 2 * p + h;
#pragma unroll
            for (int r = 0; r < ROW_TILES; ++r) {
                u32 frag[4] = {a[r][4 * ks], a[r][4 * ks + 1], a[r][4 * ks + 2], a[r][4 * ks + 3]};
#if IS_BF16
#pragma unroll
                for (int i = 0; i < 4; ++i) frag[i] = to_bf16x2(frag[i]);
#endif
#pragma unroll
                for (int b = 0; b < N_BLOCKS_M; ++b)
                    mma(acc[r][b], frag, h ? xv[b].z : xv[b].x, h ? xv[b].w : xv[b].y);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
fpx_mid_m(const u16* __restrict__ x, int ldx, const u32* __restrict__ p0, const u32* __restrict__ p1,
          const u32* __restrict__ p2, const float* __restrict__ scales, const u16* __restrict__ bias,
          u16* __restrict__ out, int ldo, float* __restrict__ ws, int* __restrict__ counts,
          int M, int N, int K, double scale_factor_d, int kps) {
    const Powers pw = {};
    const float scale_factor = (float)scale_factor_d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int k_tiles = (K + 127) / 128;
    const int n_tiles = (N + 15) / 16;
    const int first_tile = (ROW_BLOCK * WARPS + warp) * ROW_TILES;  // this warp's first 16-row tile
    const int m0 = Z_BLOCK * M_PER_CTA;
    const int kt0 = SPLIT_INDEX * kps, kt1 = min(kt0 + kps, k_tiles);

#ifdef PDL
    griddep_wait();  // launched early (programmatic stream serialization): x is the previous kernel's output
#endif
    float acc[ROW_TILES][N_BLOCKS_M][4] = {};
    __shared__ uint4 xs[2][X_BUFFER];
    if (kt0 < kt1) {  // every warp of the CTA stages x and passes the barriers, also one without rows
        // Tiles past the last row read the last tile again (their outputs are never stored); rows past the last
        // row of x repeat row M - 1 in the MMA columns of outputs for rows >= M, never stored.
        const bool rows = first_tile < n_tiles;
        long base[ROW_TILES];
#pragma unroll
        for (int r = 0; r < ROW_TILES; ++r) base[r] = (long)min(first_tile + r, n_tiles - 1) * k_tiles;
        const XCopy copy = x_copy(reinterpret_cast<const uint4*>(x), ldx / 8, m0, M);
        // x: two shared buffers, the next K tile's copy in flight while this one is computed; weights: two
        // register buffers in ping-pong, likewise.
        stage_x(xs[0], copy, kt0);
        Group even, odd;
        if (rows) load_group(even, p0, p1, p2, base, kt0, lane);
        for (int kt = kt0; kt < kt1; kt += 2) {
            cp_async_wait_all();
            __syncthreads();  // x of kt is in; every warp is done with the buffer the next copy overwrites
            if (kt + 1 < kt1) stage_x(xs[1], copy, kt + 1);
            if (rows && kt + 1 < kt1) load_group(odd, p0, p1, p2, base, kt + 1, lane);
            if (rows) compute_group(even, pw, xs[0], lane, acc);
            if (kt + 1 >= kt1) break;
            cp_async_wait_all();
            __syncthreads();
            if (kt + 2 < kt1) stage_x(xs[0], copy, kt + 2);
            if (rows && kt + 2 < kt1) load_group(even, p0, p1, p2, base, kt + 2, lane);
            if (rows) compute_group(odd, pw, xs[1], lane, acc);
        }
    }
#ifdef PDL
    griddep_launch_dependents();  // the next grid may launch while this one stores its outputs
#endif

    // acc[r][b][i] (flat: e = (r N_BLOCKS_M + b) 4 + i): weight row 16 (first_tile + r) + g + 8 (i / 2), x row
    // m0 + 8 b + 2 t + i % 2.
    const float* flat = &acc[0][0][0];
#define ROW_OF(e) (16 * (first_tile + (e) / (4 * N_BLOCKS_M)) + g + 8 * ((e) % 4 / 2))
#define X_ROW_OF(e) (8 * ((e) / 4 % N_BLOCKS_M) + 2 * t + (e) % 2)  // from m0
    if (SPLITS == 1) {
#pragma unroll
        for (int e = 0; e < ROW_TILES * N_BLOCKS_M * 4; ++e) {
            const int n = ROW_OF(e), m = m0 + X_ROW_OF(e);
            if (n < N && m < M) out[(long)m * ldo + n] = finish(flat[e], n, scales, scale_factor, bias);
        }
        return;
    }
    // Split-K: publish this CTA's partial, count arrivals, the last one reduces. (fpx_common's store_outputs does
    // the same; calling it here changed this kernel's main loop, 1023 -> 1076 instructions and 190 -> 194 registers
    // at 64 rows, 2 row tiles, 8 warps, so the measured code stays until a device run times the change.)
    const long slab = (long)ROW_BLOCKS * ROWS_PER_CTA * M_PER_CTA;  // one (z, split) partial, row-major [n][m - m0]
    float* part = ws + ((long)Z_BLOCK * SPLITS + SPLIT_INDEX) * slab;
#pragma unroll
    for (int e = 0; e < ROW_TILES * N_BLOCKS_M * 4; ++e)
        if (m0 + X_ROW_OF(e) < M) part[(long)ROW_OF(e) * M_PER_CTA + X_ROW_OF(e)] = flat[e];
    __threadfence();
    __syncthreads();
    __shared__ int arrived;
    int* count = counts + Z_BLOCK * ROW_BLOCKS + ROW_BLOCK;
    if (threadIdx.x == 0) arrived = atomicAdd(count, 1);
    __syncthreads();
    if (arrived != SPLITS - 1) return;
    __threadfence();
    sum_splits<ROW_TILES * N_BLOCKS_M * 4>(  // the partials in split order: results independent of timing
        ws + (long)Z_BLOCK * SPLITS * slab, slab, SPLITS,
        [&](int e) { return (long)ROW_OF(e) * M_PER_CTA + X_ROW_OF(e); },
        [&](int e) { return m0 + X_ROW_OF(e) < M && ROW_OF(e) < N; },
        [&](int e, float sum) {
            out[(long)(m0 + X_ROW_OF(e)) * ldo + ROW_OF(e)] = finish(sum, ROW_OF(e), scales, scale_factor, bias);
        });
#undef ROW_OF
#undef X_ROW_OF
    if (threadIdx.x == 0) *count = 0;  // ready for the next launch or graph replay
}
