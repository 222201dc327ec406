// Helpers shared by the TC-FPx CUDA kernels (fpx_small_m.cu, fpx_mid_m.cu, fpx_wgmma.cu): streaming loads, the field moves
// as multiplies, fp16/bf16 conversions and mma.sync. kernels/fpx_cuda.py puts this text after the generated
// defines and before the kernel's own source; it is one translation unit for NVRTC, with no headers (fp16/bf16 conversions are inline PTX).

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 smem_address(const void* p) {  // the shared-window address of p
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(p));
    return addr;
}

// Thread block clusters (sm_90): the small-M kernel's split-K in shared memory.
__device__ __forceinline__ void cluster_sync() {  // every thread of every CTA of the cluster
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ float load_cluster(u32 addr, u32 cta) {  // the float at shared address addr of CTA cta
    float v;
    asm volatile("{\n\t.reg .b32 remote;\n\tmapa.shared::cluster.u32 remote, %1, %2;\n\t"
                 "ld.shared::cluster.f32 %0, [remote];\n\t}" : "=f"(v) : "r"(addr), "r"(cta) : "memory");
    return v;
}

// Programmatic dependent launch (sm_90): a grid launched with programmatic stream serialization may start while
// the previous kernel of the stream drains; griddep_wait() returns once that kernel completed (at once for a grid
// launched without it), griddep_launch_dependents() lets the next such grid start.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// griddep_wait() once `dep` is known: a wait predicated on a value of earlier loads, which ptxas then cannot sink below
// the wait (it sinks plain loads past griddepcontrol.wait); both branches wait.
__device__ __forceinline__ void griddep_wait_after(u32 dep) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@p griddepcontrol.wait;\n@!p griddepcontrol.wait;\n}"
                 :: "r"(dep) : "memory");
}
__device__ __forceinline__ void griddep_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ uint4 load_stream(const u32* p) {
    // Weights are read once: bypass L1, keep L1 for x.
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 load_stream2(const u32* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// Field moves as integer multiplies by 2^r, so that they issue on the FMA pipe (IMAD) and leave the ALU pipe to the
// masks (LOP3): x << r is the low word of x * 2^r, x >> (32 - r) its high word, and a rotate both (IMAD.WIDE).
// dequant_tile (generated) picks the one whose bits survive the mask. With an immediate multiplier ptxas turns about
// half of the left shifts back into SHF (ALU pipe: 0.38 of e3m2's 1.48 ALU operations per weight, 2026-12-02); the
// generator's fma_shifts variant passes those multipliers as kernel parameters (Powers), which ptxas cannot see, so
// they stay IMADs (e3m2: 1.09 ALU per weight), for a few registers more.
template <u32 POWER>
__device__ __forceinline__ u32 shl_fma(u32 x) {  // x << r for POWER = 2^r
    u32 y;
    asm("mul.lo.u32 %0, %1, %2;" : "=r"(y) : "r"(x), "n"(POWER));
    return y;
}

__device__ __forceinline__ u32 shl_fma(u32 x, u32 power) {  // x << r for power = 2^r, a kernel parameter
    u32 y;
    asm("mul.lo.u32 %0, %1, %2;" : "=r"(y) : "r"(x), "r"(power));
    return y;
}

template <u32 POWER>
__device__ __forceinline__ u32 shr_fma(u32 x) {  // x >> (32 - r) for POWER = 2^r
    u32 y;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(y) : "r"(x), "n"(POWER));
    return y;
}

template <u32 POWER, u32 MASK>
__device__ __forceinline__ u32 rotl_masked(u32 x) {  // rotl(x, r) & MASK for POWER = 2^r
    unsigned long long wide;
    asm("mul.wide.u32 %0, %1, %2;" : "=l"(wide) : "r"(x), "n"(POWER));
    return ((u32)wide | (u32)(wide >> 32)) & MASK;
}

__device__ __forceinline__ u32 to_bf16x2(u32 fp16x2) {
    // Exact: every value(code) * 2^(bias - 15) of a <= 4-exponent-bit format is a normal BF16 number.
    u32 out;
    asm("{.reg .f16 lo, hi; .reg .f32 flo, fhi;\n\t"
        "mov.b32 {lo, hi}, %1;\n\tcvt.f32.f16 flo, lo;\n\tcvt.f32.f16 fhi, hi;\n\t"
        "cvt.rn.bf16x2.f32 %0, fhi, flo;}" : "=r"(out) : "r"(fp16x2));
    return out;
}

__device__ __forceinline__ float act_to_float(u16 v) {
#if IS_BF16
    return __int_as_float((int)v << 16);
#else
    float f;
    asm("{.reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "h"(v));
    return f;
#endif
}

__device__ __forceinline__ u16 float_to_act(float f) {
    u16 v;
#if IS_BF16
    asm("{.reg .b16 h; cvt.rn.bf16.f32 h, %1; mov.b16 %0, h;}" : "=h"(v) : "f"(f));
#else
    asm("{.reg .f16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h;}" : "=h"(v) : "f"(f));
#endif
    return v;
}

__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The split-K partials p[0], p[step], ... p[(splits - 1) step] summed in split order (results independent of
// timing), eight L2 loads in flight at a time (predicated, so a split that is not a multiple of 8 costs no extra
// round trips): a loop of dependent round trips cost ~0.3 K tiles per split (M = 1, 8192 x 28672 at split 56, H200,
// 2026-12-02). Against the loop before it (four loads in flight, then one at a time) and four predicated loads, the
// same time (geo-means 1.00x over 16 cases of M = 1 / 8 at the table's splits 1-8, H200, 2026-12-04; the splits
// were too small for the round trips to show), but ptxas made the M <= 16 K loop 361 -> 334 instructions.
__device__ __forceinline__ float sum_partials(const float* p, long step, int splits) {
    constexpr int LOADS = 8;
    float v = 0.f;
    for (int s = 0; s < splits; s += LOADS) {
        float a[LOADS];
#pragma unroll
        for (int j = 0; j < LOADS; ++j) a[j] = s + j < splits ? __ldcg(p + (s + j) * step) : 0.f;
#pragma unroll
        for (int j = 0; j < LOADS; ++j)
            if (s + j < splits) v += a[j];
    }
    return v;
}

// The last CTA's sums of its E outputs over the split partials, in split order (results independent of timing):
// partial 0 + partial 1 + ... at float offset offset(e) of each slab, handed to store(e, sum) where valid(e) (the
// others are not loaded). The outputs go in chunks of 8-16 whose loads of one split are all in flight: summing output
// by output (sum_partials per e) made E dependent round trips to L2, ~25-50 us per launch of the wgmma kernel
// (E = 64; H200, 2026-12-04). (Its own partial is read back too: taken from registers, it spilled at E = 128.)
template <int E, class Offset, class Valid, class Store>
__device__ __forceinline__ void sum_splits(const float* first, long slab, int splits, Offset offset, Valid valid,
                                           Store store) {
    constexpr int CHUNK = E < 16 ? E : E > 64 ? 8 : 16;  // 16 spilled at E = 128 (ptxas, 2026-12-04)
#pragma unroll
    for (int c = 0; c < E; c += CHUNK) {
        float sum[CHUNK];
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) sum[j] = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float* p = first + s * slab;
#pragma unroll
            for (int j = 0; j < CHUNK; ++j)
                if (c + j < E) sum[j] += valid(c + j) ? __ldcg(p + offset(c + j)) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < CHUNK; ++j)
            if (c + j < E && valid(c + j)) store(c + j, sum[j]);
    }
}

// An output: the float32 sum times the row's scale and the format's 2^(15 - bias), plus the bias, in x's dtype.
__device__ __forceinline__ u16 finish(float v, int n, const float* __restrict__ scales, float scale_factor,
                                      const u16* __restrict__ bias) {
    v *= scales[n] * scale_factor;
#if HAS_BIAS
    v += act_to_float(bias[n]);
#endif
    return float_to_act(v);
}


// The epilogue of a kernel on grid (z blocks, row blocks, splits) (fpx_wgmma.cu; fpx_mid_m.cu has its own copy):
// a thread holds E float32 sums, v[e] for weight row row_of(e) and x row m0 + col_of(e) (col_of < m_per_cta).
// One split: each is finished and stored. Split-K: each CTA publishes its partial [rows_per_cta x m_per_cta] to ws at slab (z, split),
// counts its arrival (one counter per row block and z block), and the last CTA to arrive sums the slabs in split
// order (results independent of timing) and resets the counter (ready for the next launch or graph replay).
template <int E, class RowOf, class ColOf>
__device__ __forceinline__ void store_outputs(const float* v, RowOf row_of, ColOf col_of, int m0, int m_per_cta,
                                              int rows_per_cta, int M, int N, u16* __restrict__ out, int ldo,
                                              float* __restrict__ ws, int* __restrict__ counts,
                                              const float* __restrict__ scales, float scale_factor,
                                              const u16* __restrict__ bias) {
    if (gridDim.z == 1) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int n = row_of(e), m = m0 + col_of(e);
            if (n < N && m < M) out[(long)m * ldo + n] = finish(v[e], n, scales, scale_factor, bias);
        }
        return;
    }
    const long slab = (long)gridDim.y * rows_per_cta * m_per_cta;  // one (z, split) partial, row-major [n][m - m0]
    float* part = ws + ((long)blockIdx.x * gridDim.z + blockIdx.z) * slab;
#pragma unroll
    for (int e = 0; e < E; ++e)
        if (m0 + col_of(e) < M) part[(long)row_of(e) * m_per_cta + col_of(e)] = v[e];
    __threadfence();
    __syncthreads();
    __shared__ int arrived;
    int* count = counts + blockIdx.x * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) arrived = atomicAdd(count, 1);
    __syncthreads();
    if (arrived != gridDim.z - 1) return;
    __threadfence();
    sum_splits<E>(ws + (long)blockIdx.x * gridDim.z * slab, slab, gridDim.z,
                  [&](int e) { return (long)row_of(e) * m_per_cta + col_of(e); },
                  [&](int e) { return m0 + col_of(e) < M && row_of(e) < N; },
                  [&](int e, float sum) {
                      out[(long)(m0 + col_of(e)) * ldo + row_of(e)] =
                          finish(sum, row_of(e), scales, scale_factor, bias);
                  });
    if (threadIdx.x == 0) *count = 0;
}
