// TC-FPx wgmma kernel (Hopper, sm_90a only): out[M, N] = x[M, K] @ W.T for mid M, W in layout 2.
//
// The weight is wgmma's register A operand: a warpgroup's four warps each de-quantize one 16 x 128 tile exactly as
// the small-M kernel does, and the lane registers that come out (pair q = 4 ks + r is register r of k-step ks) are
// the A fragments of wgmma.m64nN_Xk16 for rows 16 w .. 16 w + 15 of the warpgroup's 64 rows. x^T is the B operand,
// N_X rows of x per CTA, from shared memory. Each weight tile is de-quantized once per CTA and multiplied with all
// N_X rows (the mma.sync kernels re-issue one MMA per n8 block; here one instruction covers them all).
//
// x: the weight fragments use the small kernel's k order (logical k 8 h + 2 t + j of k-step ks is column
// 32 t + 4 ks + 2 h + j of a 128-column tile), so the launcher passes x with each tile's columns permuted into that
// logical order (x_order.wgmma_x_order: one copy of x, M K 4 bytes moved); a K tile of a row is then 16 chunks of 16
// bytes in wgmma's order, copied by cp.async into the canonical 128-byte-swizzled K-major layout (two atoms of 64
// columns, N_X rows of 128 bytes each, chunk c of row n at c ^ (n & 7)): coalesced 16-byte reads, conflict-free
// writes. Copying 4-byte words of unpermuted x instead (the first version) cost ~4 shared-memory wavefronts per
// word and bound the kernel (ncu, H200, 2026-12-02: 1.1 of 1.4 us per K tile).
// x X_AHEAD K tiles ahead in X_AHEAD + 1 buffers; weights two tiles ahead in two register buffers. A tile's wgmma
// are waited for before the next tile (the other CTAs of the SM overlap them): leaving them running while the
// next tile is de-quantized into the other A buffer makes ptxas serialize every wgmma (C7513: an input register
// of a wgmma written inside its pipeline stage), and de-quantizing into plain registers moved after the wait
// measured no faster (bench/results/wgmma-h200-2026-12-02/, runs 3-4); nor did four weight tiles in flight.
//
// Grid: (ceil(M / N_X), ceil(N / ROWS_PER_CTA), SPLIT), split-K as in fpx_mid_m.cu (slabs per (z, split), the last
// CTA of (row block, z block) to arrive sums them in split order; arrival counters reset by that CTA).
//
// PRODUCER 1 (warp specialization): a fifth warpgroup copies x into a ring of X_STAGES buffers guarded by mbarriers
// (full: the tile landed; empty: every consumer's wgmma on it completed), and the WGS consumer warpgroups
// de-quantize and multiply without a CTA barrier, so one warpgroup's de-quantization can run beside the other's
// wgmma and WGS x 64 weight rows share each copy of x. (Also de-quantizing the next tile into spare registers while
// this tile's wgmma run, moved into A after the wait, was measured 3-16 % slower on every case, H200, 2026-12-04, and
// taken out. ptxas had first put the next tile into the in-flight A registers, which the tensor cores read until the
// wait: NaNs; a use of A after the wait kept them. tests/test_sass.py checks every variant for such writes.)
//
// CONSUMER_REGS (with PRODUCER: three consumers, 512 threads at 128 registers each at launch, LAUNCH_REGS; or two
// on more than 128 rows of x, 384 threads at 168): the producer warpgroup gives registers back for the loop
// (setmaxnreg.dec to PRODUCER_REGS) and the consumers take them (setmaxnreg.inc to CONSUMER_REGS: their
// accumulators, A and the weight tiles do not fit in the launch's share); both return to LAUNCH_REGS for the
// split-K epilogue, which every thread takes part in.
//
// x arrives permuted (fpx_cuda.wgmma_x_order, a launch of its own). Copying it as it is instead was measured twice
// and taken out (H200, 2026-12-04): 16-byte chunks loaded into registers and stored transposed were 6-19 % slower
// than the copy plus its launch (ptxas issued the loads after the de-quantization, at the barrier, for want of
// registers); one 4-byte cp.async per word to its permuted place was 3-15 % slower at 16-64 rows of x and even at 8.
//
// Defined by the prepended header: N_X (8..256, a multiple of 8), WGS (warpgroups per CTA), IS_BF16, HAS_BIAS,
// WGMMA_ASM / WGMMA_OUTS (the wgmma instruction for N_X), PLANE_REGS, LOAD_PLANES, (after Tile) dequant_tile, and
// PDL where the grid is launched with programmatic stream serialization.

#ifndef PRODUCER
#define PRODUCER 0
#endif
#define WARPS (4 * WGS)                        // the consumer warps: 16 weight rows each
#define THREADS (WARPS * 32 + 128 * PRODUCER)  // and the producer warpgroup, last
#define COPY_THREADS (PRODUCER ? 128 : THREADS)
#define ROWS_PER_CTA (64 * WGS)
#define Z_BLOCK blockIdx.x
#define ROW_BLOCK blockIdx.y
#define ROW_BLOCKS gridDim.y
#define SPLIT_INDEX blockIdx.z
#define SPLITS gridDim.z
#define ACC (N_X / 2)
#ifndef W_AHEAD
#define W_AHEAD 2                        // K tiles of weights in flight (register buffers)
#endif
#ifndef X_AHEAD
#define X_AHEAD 2                        // K tiles of x in flight
#endif
#ifndef INTERLEAVE
#define INTERLEAVE 0                     // each k-step de-quantized beside the wgmma of the ones before it
#endif
// the tiles in flight and this one; interleaved without a producer also the previous one, whose last wgmma may
// still run when the next copy is staged
#define X_STAGES (X_AHEAD + 1 + (INTERLEAVE && !PRODUCER))
#ifndef MIN_CTAS
#define MIN_CTAS 1                       // __launch_bounds__: resident CTAs per SM ptxas must allow by registers
#endif
#define ATOM_BYTES (N_X * 128)           // 64 columns of the CTA's x rows, 128-byte swizzled
#define X_STAGE_BYTES (2 * ATOM_BYTES)   // one K tile of x
#define X_COPIES ((N_X * 16 + COPY_THREADS - 1) / COPY_THREADS)  // 16-byte chunks per copier per K tile
#define X_ROWS_STEP (COPY_THREADS / 16)  // copier c copies chunk c % 16 of rows c / 16 + X_ROWS_STEP j

__device__ __forceinline__ void cp_async16(u32 smem, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem), "l"(global) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }

// mbarriers (PRODUCER): init with the arrivals a phase takes; wait until the phase of the given parity completed.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}" :: "r"(bar), "r"(parity) : "memory");
}

// Keeps the compiler from moving reads or writes of the accumulators across the asynchronous MMAs.
__device__ __forceinline__ void fence_accumulators(float (&d)[ACC]) {
#pragma unroll
    for (int i = 0; i < ACC; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

// Matrix descriptor of shared address addr (no swizzle; leading offset 128 bytes: the next core matrix along K;
// stride offset 256 bytes: the next 8 rows along N).
// Matrix descriptor of shared address addr in a 128-byte-swizzled K-major atom (layout type 1, bits 62-63; stride
// offset 1024 bytes: the next 8 rows; the leading offset is unused for this layout, 1 by convention).
__device__ __forceinline__ unsigned long long x_descriptor(u32 addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wgmma_k16(float (&d)[ACC], u32 a0, u32 a1, u32 a2, u32 a3,
                                          unsigned long long desc) {
    asm volatile(WGMMA_ASM : WGMMA_OUTS(d) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
}

struct Tile {
    PLANE_REGS  // u32 w0[2 * W0]; u32 w1[2 * W1]; ...
};

__device__ __forceinline__ void load_tile(Tile& tile, const u32* __restrict__ p0, const u32* __restrict__ p1,
                                          const u32* __restrict__ p2, long tile_index, int lane) {
    LOAD_PLANES  // fills tile.w0 ... from plane tile `tile_index`
}

// The thread's share of one K tile's copy: chunk c = tid % 16 (atom c / 8, chunk c % 8) of rows n = tid / 16 +
// X_ROWS_STEP j, to atom offset n 128 + ((c % 8) ^ (n % 8)) 16; X_ROWS_STEP is a multiple of 8, so every row of
// the thread has the same swizzle and the offsets are immediates.
struct XCopy {
    const uint4* src;  // permuted x row m0 + n, chunk c of K tile 0
    u32 step;          // X_ROWS_STEP rows of x, in uint4
    u32 dst;           // shared offset of the thread's first chunk in a buffer
    int rows;          // x rows from the thread's first to the CTA's last: copy j while X_ROWS_STEP j < rows
};

__device__ __forceinline__ XCopy x_copy(const uint4* __restrict__ xq, int ldx_q, int m0, int M, int copier) {
    const int n = copier / 16, c = copier % 16;
    return {xq + (long)(m0 + n) * ldx_q + c, (u32)(X_ROWS_STEP * ldx_q),
            (u32)((c / 8) * ATOM_BYTES + n * 128 + (((c % 8) ^ (n % 8)) * 16)), min(M - m0, N_X) - n};
}

__device__ __forceinline__ void stage_x(u32 buffer, const XCopy& copy, int kt) {
    const uint4* p = copy.src + kt * 16;
    const u32 dst = buffer + copy.dst;
    if (copy.rows > X_ROWS_STEP * (X_COPIES - 1)) {  // every z block but a last partial one
#pragma unroll
        for (int j = 0; j < X_COPIES; ++j, p += copy.step) cp_async16(dst + j * X_ROWS_STEP * 128, p);
    } else {
#pragma unroll
        for (int j = 0; j < X_COPIES; ++j, p += copy.step)
            if (X_ROWS_STEP * j < copy.rows) cp_async16(dst + j * X_ROWS_STEP * 128, p);
    }
}

__device__ __forceinline__ void mma_tile(float (&d)[ACC], const u32 (&a)[32], u32 buffer) {
#if ABLATE == 2
    // A folded into an accumulator (three-input XORs, one add): an empty asm sink left ptxas free to drop the
    // de-quantization and the weight loads, which it did (no LDG in the loop; 2026-12-04)
    u32 fold = 0;
#pragma unroll
    for (int i = 0; i < 32; i += 2) fold ^= a[i] ^ a[i + 1];
    d[0] += __uint_as_float(fold & 0x3FFFFFFFu);
    return;
#endif
    // k-step ks: atom ks / 4, bytes 32 (ks % 4) of each row (the hardware applies the swizzle). The descriptors are
    // made before the fence: a register of a wgmma defined inside its pipeline stage makes ptxas serialize every
    // wgmma of the stage (C7513).
    // Only the address field (bits 0-13: address / 16) differs between them, and it cannot carry: the
    // descriptor of buffer + offset is the buffer's plus offset / 16 (one add, not the mask, shift and or).
    const u32 base = (u32)x_descriptor(buffer);
    u32 lo[8];
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        lo[ks] = base + (((ks / 4) * ATOM_BYTES + (ks % 4) * 32) >> 4);
        asm volatile("" : "+r"(lo[ks]));
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 8; ++ks)
        wgmma_k16(d, a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3],
                  (x_descriptor(0) & 0xFFFFFFFF00000000ull) | lo[ks]);
    wgmma_commit();
}

#if INTERLEAVE
// Before k-step ks is de-quantized: wait until at most 7 k-steps are in flight (the previous tile's k-step ks has
// completed, so its four A registers are free), and keep their old values live up to the wait (an empty asm that
// reads and writes them): without a use after the wait ptxas may put other values into registers the tensor cores
// still read (the tenth session's NaNs).
__device__ __forceinline__ void await_k16(u32 (&a)[32], int ks) {
    wgmma_wait<7>();
    asm volatile("" : "+r"(a[4 * ks]), "+r"(a[4 * ks + 1]), "+r"(a[4 * ks + 2]), "+r"(a[4 * ks + 3]));
}

// k-step ks of a K tile: one wgmma of its four A registers, its own commit group.
__device__ __forceinline__ void mma_k16(float (&d)[ACC], const u32 (&a)[32], u32 buffer, int ks) {
    u32 lo = (u32)x_descriptor(buffer) + (((ks / 4) * ATOM_BYTES + (ks % 4) * 32) >> 4);
    asm volatile("" : "+r"(lo));  // made before the fence (C7513), as in mma_tile
    wgmma_fence();
    wgmma_k16(d, a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3],
              (x_descriptor(0) & 0xFFFFFFFF00000000ull) | lo);
    wgmma_commit();
}
#endif

#ifndef ABLATE
#define ABLATE 0  // bench only: 1 skips the de-quantization (A = raw plane words), 2 skips the wgmma
#endif

__device__ __forceinline__ void dequant(const Tile& tile, const Powers& pw, u32 (&a)[32]) {
#if ABLATE == 1
    const u32* raw = reinterpret_cast<const u32*>(&tile);
#pragma unroll
    for (int i = 0; i < 32; ++i) a[i] = raw[i % (sizeof(Tile) / 4)];
    return;
#endif
    dequant_tile(tile, pw, a);
#if IS_BF16
#pragma unroll
    for (int i = 0; i < 32; ++i) a[i] = to_bf16x2(a[i]);
#endif
}

#if INTERLEAVE
__device__ __forceinline__ void dequant_step(const Tile& tile, const Powers& pw, u32 (&a)[32], int ks) {
    dequant_k16(tile, pw, a, ks);
#if IS_BF16
#pragma unroll
    for (int i = 4 * ks; i < 4 * ks + 4; ++i) a[i] = to_bf16x2(a[i]);
#endif
}
#endif

#if PRODUCER
// The producer warpgroup: K tile i of x into stage i % X_STAGES once every consumer released the stage's previous
// tile; tile i - 1 is announced (full) once this thread's copies of it landed, made visible to the async proxy
// that wgmma reads through (the fence by the writing thread, as in the plain loop).
__device__ __forceinline__ void produce_x(const XCopy& copy, u32 smem, u32 full, u32 empty, int kt0, int n_k) {
    for (int i = 0; i < n_k; ++i) {
        const int s = i % X_STAGES;
        if (i >= X_STAGES) mbar_wait(empty + 8 * s, ((i / X_STAGES) - 1) & 1);
        stage_x(smem + s * X_STAGE_BYTES, copy, kt0 + i);
        cp_async_commit();
        if (i >= 1) {
            cp_async_wait<1>();
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mbar_arrive(full + 8 * ((i - 1) % X_STAGES));
        }
    }
    cp_async_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mbar_arrive(full + 8 * ((n_k - 1) % X_STAGES));
}

// A consumer warp: its 16 weight rows' tiles de-quantized from registers (weights W_AHEAD tiles ahead), each tile's
// 8 wgmma issued once its x landed, the stage released once they completed.
__device__ __forceinline__ void consume(float (&d)[ACC], const u32* __restrict__ p0, const u32* __restrict__ p1,
                                        const u32* __restrict__ p2, long base, int lane, const Powers& pw, u32 smem,
                                        u32 full, u32 empty, int kt0, int kt1) {
    Tile w[W_AHEAD];
    u32 a[32] = {};  // (zeros: the interleaved loop's empty asm reads them before the first tile)
#pragma unroll
    for (int i = 0; i < W_AHEAD; ++i)
        if (kt0 + i < kt1) load_tile(w[i], p0, p1, p2, base + kt0 + i, lane);
#define STEP(KT, TILE)                                                                   \
    {                                                                                    \
        const int kt_ = (KT), i_ = kt_ - kt0, s_ = i_ % X_STAGES;                        \
        dequant(TILE, pw, a);                                                            \
        if (kt_ + W_AHEAD < kt1) load_tile(TILE, p0, p1, p2, base + kt_ + W_AHEAD, lane); \
        mbar_wait(full + 8 * s_, (i_ / X_STAGES) & 1);                                   \
        mma_tile(d, a, smem + s_ * X_STAGE_BYTES);                                       \
        wgmma_wait<0>();                                                                 \
        mbar_arrive(empty + 8 * s_);                                                     \
    }
#if INTERLEAVE
    // k-step ks of tile i: wait until tile i - 1's k-step ks is done (await_k16), de-quantize k-step ks into its
    // four A registers and issue its wgmma: the tensor cores keep 7 k-steps queued while the warp de-quantizes.
    // Tile i - 1's stage is released once its last k-step is done (before k-step 7 of tile i).
#undef STEP
#define STEP(KT, TILE)                                                                           \
    {                                                                                            \
        const int kt_ = (KT), i_ = kt_ - kt0, s_ = i_ % X_STAGES;                                \
        _Pragma("unroll") for (int ks = 0; ks < 8; ++ks) {                                       \
            await_k16(a, ks);                                                                    \
            if (ks == 7 && i_ > 0) mbar_arrive(empty + 8 * ((i_ - 1) % X_STAGES));               \
            dequant_step(TILE, pw, a, ks);                                                       \
            if (ks == 7 && kt_ + W_AHEAD < kt1) load_tile(TILE, p0, p1, p2, base + kt_ + W_AHEAD, lane); \
            if (ks == 0) mbar_wait(full + 8 * s_, (i_ / X_STAGES) & 1);                          \
            mma_k16(d, a, smem + s_ * X_STAGE_BYTES, ks);                                        \
        }                                                                                        \
    }
#endif
    for (int kt = kt0; kt < kt1; kt += W_AHEAD) {
#pragma unroll
        for (int i = 0; i < W_AHEAD; ++i) {
            if (kt + i >= kt1) break;
            STEP(kt + i, w[i])
        }
    }
#undef STEP
#if INTERLEAVE
    wgmma_wait<0>();  // the last tile's stage: released for the producer's count (it waits for no more)
    mbar_arrive(empty + 8 * ((kt1 - kt0 - 1) % X_STAGES));
#endif
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, MIN_CTAS)
fpx_wgmma(const u16* __restrict__ x, int ldx, const u32* __restrict__ p0, const u32* __restrict__ p1,
          const u32* __restrict__ p2, const float* __restrict__ scales, const u16* __restrict__ bias,
          u16* __restrict__ out, int ldo, float* __restrict__ ws, int* __restrict__ counts,
          int M, int N, int K, double scale_factor_d, int kps) {
    extern __shared__ uint4 x_smem[];  // X_STAGES x X_STAGE_BYTES, from the first 1024-byte boundary
    const Powers pw = {};
    const float scale_factor = (float)scale_factor_d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int k_tiles = (K + 127) / 128;
    const int n_tiles = (N + 15) / 16;
    const int tile = ROW_BLOCK * WARPS + warp;  // this warp's 16-row tile
    const int m0 = Z_BLOCK * N_X;
    const int kt0 = SPLIT_INDEX * kps, kt1 = min(kt0 + kps, k_tiles);
    const u32 smem = (smem_address(x_smem) + 1023) & ~1023u;  // swizzle atoms start at 1024-byte boundaries

#if PRODUCER
    __shared__ __align__(8) unsigned long long bars[2 * X_STAGES];  // full[X_STAGES], then empty[X_STAGES]
    const u32 full = smem_address(bars), empty = full + 8 * X_STAGES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < X_STAGES; ++s) {
            mbar_init(full + 8 * s, COPY_THREADS);
            mbar_init(empty + 8 * s, WARPS * 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
#endif
#ifdef PDL
    griddep_wait();  // launched early (programmatic stream serialization): x is the previous kernel's output
#endif
    float d[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) d[i] = 0.f;
#if PRODUCER
    if (kt0 < kt1) {
        // the warpgroup's role from lane 0 (warp-uniform for the compiler: a wgmma in a path it thinks divergent is
        // serialized, C7519)
        if (__shfl_sync(0xFFFFFFFFu, (int)threadIdx.x / 128, 0) >= WGS) {
#ifdef CONSUMER_REGS
            // the producer's registers handed to the consumers for the loop (setmaxnreg, per warpgroup), back after
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(PRODUCER_REGS));
#endif
            produce_x(x_copy(reinterpret_cast<const uint4*>(x), ldx / 8, m0, M, threadIdx.x - WARPS * 32), smem,
                      full, empty, kt0, kt1 - kt0);
#ifdef CONSUMER_REGS
            asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(LAUNCH_REGS));
#endif
        } else {
#ifdef CONSUMER_REGS
            asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(CONSUMER_REGS));
#endif
            consume(d, p0, p1, p2, (long)min(tile, n_tiles - 1) * k_tiles, lane, pw, smem, full, empty, kt0, kt1);
#ifdef CONSUMER_REGS
            wgmma_wait<0>();  // the accumulators complete before the registers go back
            fence_accumulators(d);
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(LAUNCH_REGS));
#endif
        }
        wgmma_wait<0>();
        fence_accumulators(d);
    }
#else
    if (kt0 < kt1) {
        // Warps past the last tile de-quantize the last tile again (a warpgroup's wgmma needs all four; their
        // outputs are never stored); x rows past M are not copied and feed only outputs for rows >= M.
        const long base = (long)min(tile, n_tiles - 1) * k_tiles;
        const XCopy copy = x_copy(reinterpret_cast<const uint4*>(x), ldx / 8, m0, M, threadIdx.x);
#pragma unroll
        for (int i = 0; i < X_AHEAD; ++i) {  // one commit group per K tile, empty ones too: uniform counts
            if (kt0 + i < kt1) stage_x(smem + i * X_STAGE_BYTES, copy, kt0 + i);
            cp_async_commit();
        }
        Tile w[W_AHEAD];
#if INTERLEAVE
        u32 a[1][32] = {};  // one set (zeros: the empty asm reads them before the first tile)
#else
        u32 a[2][32];
#endif
#pragma unroll
        for (int i = 0; i < W_AHEAD; ++i)
            if (kt0 + i < kt1) load_tile(w[i], p0, p1, p2, base + kt0 + i, lane);
        // One K tile: de-quantize it, load the weights W_AHEAD tiles ahead into the freed registers, wait for x,
        // stage x X_AHEAD tiles ahead into the buffer of the previous tile (every warpgroup has waited for its
        // wgmma: the barrier), issue this tile's 8 wgmma and wait for them.
#define STEP(KT, TILE, A)                                                                  \
        {                                                                                  \
            const int kt_ = (KT);                                                          \
            dequant(TILE, pw, A);                                                          \
            if (kt_ + W_AHEAD < kt1) load_tile(TILE, p0, p1, p2, base + kt_ + W_AHEAD, lane); \
            cp_async_wait<X_AHEAD - 1>();                                                  \
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");                   \
            __syncthreads();                                                               \
            if (kt_ + X_AHEAD < kt1)                                                       \
                stage_x(smem + ((kt_ - kt0 + X_AHEAD) % X_STAGES) * X_STAGE_BYTES, copy, kt_ + X_AHEAD); \
            cp_async_commit();                                                             \
            mma_tile(d, A, smem + ((kt_ - kt0) % X_STAGES) * X_STAGE_BYTES);              \
            wgmma_wait<0>();                                                               \
        }
#if INTERLEAVE
        // k-step by k-step as the interleaved consumer (consume): await_k16, de-quantize the k-step, issue its
        // wgmma; x is waited for, the barrier passed and the copy X_AHEAD tiles ahead staged at k-step 0, into the
        // buffer of tile kt - 2, which every warpgroup finished before its k-step 7 of tile kt - 1
        // (X_STAGES = X_AHEAD + 2).
#undef STEP
#define STEP(KT, TILE, A)                                                                              \
        {                                                                                              \
            const int kt_ = (KT);                                                                      \
            _Pragma("unroll") for (int ks = 0; ks < 8; ++ks) {                                         \
                await_k16(A, ks);                                                                      \
                dequant_step(TILE, pw, A, ks);                                                         \
                if (ks == 7 && kt_ + W_AHEAD < kt1) load_tile(TILE, p0, p1, p2, base + kt_ + W_AHEAD, lane); \
                if (ks == 0) {                                                                         \
                    cp_async_wait<X_AHEAD - 1>();                                                      \
                    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");                       \
                    __syncthreads();                                                                   \
                    if (kt_ + X_AHEAD < kt1)                                                           \
                        stage_x(smem + ((kt_ - kt0 + X_AHEAD) % X_STAGES) * X_STAGE_BYTES, copy, kt_ + X_AHEAD); \
                    cp_async_commit();                                                                 \
                }                                                                                      \
                mma_k16(d, A, smem + ((kt_ - kt0) % X_STAGES) * X_STAGE_BYTES, ks);                    \
            }                                                                                          \
        }
#endif
        for (int kt = kt0; kt < kt1; kt += W_AHEAD) {
#pragma unroll
            for (int i = 0; i < W_AHEAD; ++i) {
                if (kt + i >= kt1) break;
                STEP(kt + i, w[i], a[INTERLEAVE ? 0 : i % 2])
            }
        }
#undef STEP
        wgmma_wait<0>();
        fence_accumulators(d);
    }
#endif
#ifdef PDL
    griddep_launch_dependents();  // the next grid may launch while this one stores its outputs
#endif

    // d[i]: weight row 16 tile + g + 8 ((i >> 1) & 1), x row m0 + 8 (i >> 2) + 2 t + (i & 1). The producer's
    // threads store nothing (their x row is past any M) but take part in split-K's barriers.
    const bool stores = warp < WARPS;
    store_outputs<ACC>(d, [&](int i) { return 16 * tile + g + 8 * ((i >> 1) & 1); },
                       [&](int i) { return stores ? 8 * (i >> 2) + 2 * t + (i & 1) : 1 << 20; }, m0, N_X,
                       ROWS_PER_CTA, M, N, out, ldo, ws, counts, scales, scale_factor, bias);
}
