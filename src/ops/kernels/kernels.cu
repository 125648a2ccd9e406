// Our CUDA kernels: the decode step (below) and a few fused ops of the prefill path (at the end).
//
// The decode step (one token, batch 1) is captured once into a CUDA graph and replayed.
// Per layer: [norm + QKV matvec] -> [rope + KV write + attention over the cache, splits combined by the
// last block] -> [O matvec + residual] -> [norm + gate/up matvec + activation] -> [down matvec + residual]
// (a parallel-residual layer runs its MLP before the attention: both read the layer's input).
// The residual stream stays in f32; matvec inputs are rounded to bf16 like the bf16 model's activations.
// The position comes from device memory, so one captured graph serves every step.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define WARPS 8
#define THREADS (WARPS * 32)
// Matvec blocks resident per SM (caps registers at 64K / (4 * 256) = 64 per thread); the host sizes the
// persistent grid as SMs x this. Measured on an H200 against 2 blocks with twice the loads in flight per warp
// (and 1, 6 and 8 blocks): more warps, each with fewer loads, stream large matrices fastest.
#define MV_BLOCKS_PER_SM 4
// The quantized dot products unpack into more registers.
#define MV_QUANT_BLOCKS_PER_SM 2

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += red[i];
    __syncthreads();
    return t;
}

// Programmatic dependent launch (sm_90+): a kernel may start while its predecessor finishes; it only
// prefetches weights (never written) until `pdl_wait` returns, which is after the predecessor completed.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// Weights are read once per step: keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float2 bf2_to_f2(uint32_t v) {
    __nv_bfloat162 b = *reinterpret_cast<__nv_bfloat162*>(&v);
    return __bfloat1622float2(b);
}

// 8 bf16 weights · 8 bf16 inputs
__device__ __forceinline__ float dot8_bf16(uint4 w, uint4 x) {
    float2 a, b;
    float s = 0.f;
    a = bf2_to_f2(w.x); b = bf2_to_f2(x.x); s = fmaf(a.x, b.x, s); s = fmaf(a.y, b.y, s);
    a = bf2_to_f2(w.y); b = bf2_to_f2(x.y); s = fmaf(a.x, b.x, s); s = fmaf(a.y, b.y, s);
    a = bf2_to_f2(w.z); b = bf2_to_f2(x.z); s = fmaf(a.x, b.x, s); s = fmaf(a.y, b.y, s);
    a = bf2_to_f2(w.w); b = bf2_to_f2(x.w); s = fmaf(a.x, b.x, s); s = fmaf(a.y, b.y, s);
    return s;
}

// 8 bf16 inputs as floats
__device__ __forceinline__ void unpack8(uint4 x, float* f) {
    float2 t;
    t = bf2_to_f2(x.x); f[0] = t.x; f[1] = t.y;
    t = bf2_to_f2(x.y); f[2] = t.x; f[3] = t.y;
    t = bf2_to_f2(x.z); f[4] = t.x; f[5] = t.y;
    t = bf2_to_f2(x.w); f[6] = t.x; f[7] = t.y;
}

// ---- one row · x, per weight format (whole warp; result valid in every lane) ----

// bf16 rows of K (K % 8 == 0), 16-byte aligned, NR rows at once (gate and up share one pass). Each lane
// keeps 8 vectors of 8 weights in flight per chunk; the first chunk can be loaded before the kernel waits
// for its input.
template <int NR, int DEPTH>
struct Bf16Chunk {
    uint4 v[NR][DEPTH / NR];
};

template <int NR, int DEPTH>
__device__ __forceinline__ void bf16_load(const uint8_t* const* rows, int c, int n, Bf16Chunk<NR, DEPTH>& ch) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int u = 0; u < DEPTH / NR; u++) {
            int idx = c + lane + 32 * u;
            ch.v[r][u] = idx < n ? ld_stream(reinterpret_cast<const uint4*>(rows[r]) + idx) : make_uint4(0, 0, 0, 0);
        }
}

template <int NR, int DEPTH>
__device__ __forceinline__ void bf16_use(const Bf16Chunk<NR, DEPTH>& ch, const uint4* x, int c, int n, float* s) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < DEPTH / NR; u++) {
        int idx = c + lane + 32 * u;
        if (idx < n) {
            uint4 xv = x[idx];
#pragma unroll
            for (int r = 0; r < NR; r++) s[r] += dot8_bf16(ch.v[r][u], xv);
        }
    }
}

// GGUF Q8_0: blocks of {f16 d; int8 q[32]} (34 bytes). Four lanes share a block, eight weights each.
__device__ __forceinline__ float q8_0_part(const uint8_t* row, const bf16* xs, int b, int part) {
    const uint8_t* blk = row + b * 34;
    float d = __half2float(*reinterpret_cast<const __half*>(blk));
    const uint16_t* q = reinterpret_cast<const uint16_t*>(blk + 2 + part * 8);
    uint16_t q0 = __ldg(q), q1 = __ldg(q + 1), q2 = __ldg(q + 2), q3 = __ldg(q + 3);
    float xf[8];
    unpack8(reinterpret_cast<const uint4*>(xs)[b * 4 + part], xf);
    float s = (float)(int8_t)(q0 & 0xff) * xf[0] + (float)(int8_t)(q0 >> 8) * xf[1] +
              (float)(int8_t)(q1 & 0xff) * xf[2] + (float)(int8_t)(q1 >> 8) * xf[3] +
              (float)(int8_t)(q2 & 0xff) * xf[4] + (float)(int8_t)(q2 >> 8) * xf[5] +
              (float)(int8_t)(q3 & 0xff) * xf[6] + (float)(int8_t)(q3 >> 8) * xf[7];
    return d * s;
}

// Rows of 32-weight blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): `PART` is one lane's eight weights of a block;
// four blocks per lane are in flight.
template <float (*PART)(const uint8_t*, const bf16*, int, int)>
__device__ __forceinline__ float row_dot_block32(const uint8_t* row, const bf16* xs, int K) {
    int lane = threadIdx.x & 31;
    int nb = K >> 5, part = lane & 3;
    float s = 0.f;
    int b = lane >> 2;
    for (; b + 24 < nb; b += 32)
        s += PART(row, xs, b, part) + PART(row, xs, b + 8, part) + PART(row, xs, b + 16, part) +
             PART(row, xs, b + 24, part);
    for (; b < nb; b += 8) s += PART(row, xs, b, part);
    return warp_sum(s);
}

// Eight bytes at a 2-byte aligned address (odd-sized blocks keep only that): four 16-bit loads.
__device__ __forceinline__ void load8_u16(const uint8_t* p, uint8_t* out) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint16_t v = __ldg(q + i);
        out[2 * i] = v & 0xff;
        out[2 * i + 1] = v >> 8;
    }
}

// GGUF 4- and 5-bit 32-weight blocks: {f16 d; [f16 m;] [u32 qh;] u8 qs[16]} (Q4_0 18, Q4_1 20, Q5_0 22, Q5_1 24
// bytes). Weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble; the 5-bit types add bit j
// of qh as the fifth bit. Without a min the value is d·(q - 8) (Q4_0) or d·(q - 16) (Q5_0); with one, d·q + m.
// Lane part p takes weights [8p, 8p + 8).
template <int BYTES, bool MIN, bool HIGH>
__device__ __forceinline__ float q32_part(const uint8_t* row, const bf16* xs, int b, int part) {
    const uint8_t* blk = row + b * BYTES;
    float d = __half2float(*reinterpret_cast<const __half*>(blk));
    const uint8_t* after = blk + (MIN ? 4 : 2);
    uint32_t qh = 0;
    if (HIGH) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(after);  // 2-byte aligned: two 16-bit loads
        qh = (uint32_t)__ldg(h) | ((uint32_t)__ldg(h + 1) << 16);
    }
    uint8_t q[8];
    load8_u16(after + (HIGH ? 4 : 0) + 8 * (part & 1), q);
    int shift = part >= 2 ? 4 : 0;
    float xf[8];
    unpack8(reinterpret_cast<const uint4*>(xs)[b * 4 + part], xf);
    float s = 0.f, sx = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int v = (q[k] >> shift) & 0xF;
        if (HIGH) v |= ((qh >> (8 * part + k)) & 1) << 4;
        s = fmaf((float)v, xf[k], s);
        sx += xf[k];
    }
    if (MIN) return d * s + __half2float(*reinterpret_cast<const __half*>(blk + 2)) * sx;
    return d * (s - (HIGH ? 16.f : 8.f) * sx);
}

// GGUF Q4_K: super-blocks of 256 weights {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]} (144 bytes), eight
// sub-blocks of 32 with 6-bit scales and mins. Eight lanes share a super-block: lane p takes qs bytes
// [16p, 16p+16), whose low nibbles are weights 64j + 16h + l and high nibbles 64j + 32 + 16h + l (j = p/2, h = p%2).
__device__ __forceinline__ void q4k_scale_min(int j, const uint8_t* q, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(q[j] & 63);
        m = (float)(q[j + 4] & 63);
    } else {
        sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// GGUF Q5_K (`FIVE`): super-blocks of 256 weights {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]} (176
// bytes): Q4_K's layout and scales plus a fifth bit, bit 2j (low nibbles) or 2j + 1 (high nibbles) of qh[l] for
// the weights of qs byte 32j + l. Lanes share a super-block as in Q4_K.
template <bool FIVE>
__device__ __forceinline__ float q45k_part(const uint8_t* row, const bf16* xs, int b, int p) {
    const uint8_t* blk = row + b * (FIVE ? 176 : 144);
    float d = __half2float(*reinterpret_cast<const __half*>(blk));
    float dmin = __half2float(*reinterpret_cast<const __half*>(blk + 2));
    const uint8_t* scales = blk + 4;
    int j = p >> 1, h = p & 1;
    uint4 qv = __ldg(reinterpret_cast<const uint4*>(blk + (FIVE ? 48 : 16) + p * 16));
    uint4 hv = FIVE ? __ldg(reinterpret_cast<const uint4*>(blk + 16 + h * 16)) : make_uint4(0, 0, 0, 0);
    float sc1, m1, sc2, m2;
    q4k_scale_min(2 * j, scales, sc1, m1);
    q4k_scale_min(2 * j + 1, scales, sc2, m2);
    const uint4* x = reinterpret_cast<const uint4*>(xs + b * 256);
    int lo = (64 * j + 16 * h) >> 3, hi = (64 * j + 32 + 16 * h) >> 3;
    float xl[16], xh[16];
    unpack8(x[lo], xl);
    unpack8(x[lo + 1], xl + 8);
    unpack8(x[hi], xh);
    unpack8(x[hi + 1], xh + 8);
    uint32_t words[4] = {qv.x, qv.y, qv.z, qv.w}, highs[4] = {hv.x, hv.y, hv.z, hv.w};
    float sl = 0.f, sh = 0.f, xsl = 0.f, xsh = 0.f;
#pragma unroll
    for (int k = 0; k < 16; k++) {
        uint32_t byte = (words[k >> 2] >> (8 * (k & 3))) & 0xff;
        uint32_t lo_q = byte & 0xF, hi_q = byte >> 4;
        if (FIVE) {
            uint32_t hb = (highs[k >> 2] >> (8 * (k & 3))) >> (2 * j);
            lo_q |= (hb & 1) << 4;
            hi_q |= (hb & 2) << 3;
        }
        sl = fmaf((float)lo_q, xl[k], sl);
        sh = fmaf((float)hi_q, xh[k], sh);
        xsl += xl[k];
        xsh += xh[k];
    }
    return d * (sc1 * sl + sc2 * sh) - dmin * (m1 * xsl + m2 * xsh);
}

// K-quant rows (256-weight super-blocks, eight lanes each): `PART` is one lane's share of a super-block; two
// super-blocks per lane are in flight.
template <float (*PART)(const uint8_t*, const bf16*, int, int)>
__device__ __forceinline__ float row_dot_k_quant(const uint8_t* row, const bf16* xs, int K) {
    int lane = threadIdx.x & 31;
    int nb = K >> 8, p = lane & 7;
    float s = 0.f;
    int b = lane >> 3;
    for (; b + 4 < nb; b += 8) s += PART(row, xs, b, p) + PART(row, xs, b + 4, p);
    for (; b < nb; b += 4) s += PART(row, xs, b, p);
    return warp_sum(s);
}

// GGUF Q6_K: super-blocks of 256 weights {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d} (210 bytes), each
// weight 4 low bits in ql and 2 high bits in qh, minus 32, times d * scales[16 weights]. Eight lanes share a
// super-block: lane p takes half hf = p/4 and positions l in [8(p%4), 8(p%4)+8) of its four 32-weight groups.
__device__ __forceinline__ float q6k_part(const uint8_t* row, const bf16* xs, int b, int p) {
    const uint8_t* blk = row + b * 210;
    int hf = p >> 2, l0 = 8 * (p & 3);
    uint8_t a[8], c[8], h[8];
    load8_u16(blk + 64 * hf + l0, a);
    load8_u16(blk + 64 * hf + 32 + l0, c);
    load8_u16(blk + 128 + 32 * hf + l0, h);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * hf;
    int is = l0 / 16;  // 16 weights share a scale
    float s0 = sc[is], s1 = sc[is + 2], s2 = sc[is + 4], s3 = sc[is + 6];
    float d = __half2float(*reinterpret_cast<const __half*>(blk + 208));
    const uint4* x = reinterpret_cast<const uint4*>(xs + b * 256 + 128 * hf + l0);
    float x0[8], x1[8], x2[8], x3[8];
    unpack8(x[0], x0);
    unpack8(x[4], x1);
    unpack8(x[8], x2);
    unpack8(x[12], x3);
    float g0 = 0.f, g1 = 0.f, g2 = 0.f, g3 = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        g0 = fmaf((float)((int)((a[k] & 0xF) | ((h[k] & 3) << 4)) - 32), x0[k], g0);
        g1 = fmaf((float)((int)((c[k] & 0xF) | (((h[k] >> 2) & 3) << 4)) - 32), x1[k], g1);
        g2 = fmaf((float)((int)((a[k] >> 4) | (((h[k] >> 4) & 3) << 4)) - 32), x2[k], g2);
        g3 = fmaf((float)((int)((c[k] >> 4) | (((h[k] >> 6) & 3) << 4)) - 32), x3[k], g3);
    }
    return d * (s0 * g0 + s1 * g1 + s2 * g2 + s3 * g3);
}

// Weight formats (WT): 0 bf16, 1 Q8_0, 2 Q4_K, 3 Q6_K, 4 Q4_0, 5 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q5_K.
template <int WT>
__device__ __forceinline__ float row_dot_quant(const uint8_t* row, const bf16* xs, int K) {
    if (WT == 1) return row_dot_block32<q8_0_part>(row, xs, K);
    if (WT == 2) return row_dot_k_quant<q45k_part<false>>(row, xs, K);
    if (WT == 3) return row_dot_k_quant<q6k_part>(row, xs, K);
    if (WT == 4) return row_dot_block32<q32_part<18, false, false>>(row, xs, K);
    if (WT == 5) return row_dot_block32<q32_part<20, true, false>>(row, xs, K);
    if (WT == 6) return row_dot_block32<q32_part<22, false, true>>(row, xs, K);
    if (WT == 7) return row_dot_block32<q32_part<24, true, true>>(row, xs, K);
    return row_dot_k_quant<q45k_part<true>>(row, xs, K);
}

template <int WT>
__device__ __forceinline__ size_t row_bytes(int K) {
    constexpr int BLOCK32[] = {0, 34, 0, 0, 18, 20, 22, 24, 0};
    if (WT == 0) return (size_t)K * 2;
    if (BLOCK32[WT]) return (size_t)(K >> 5) * BLOCK32[WT];
    if (WT == 2) return (size_t)(K >> 8) * 144;
    if (WT == 8) return (size_t)(K >> 8) * 176;
    return (size_t)(K >> 8) * 210;
}

// ---- matvec kernels ----
// Input: IN_NORM = RMSNorm or LayerNorm of the f32 residual `xf`; otherwise the bf16 vector `xb`.
// Output (after adding `bias[row]` where a bias is given): OUT_STORE: outf[row] = y; OUT_RESID: outf[row] += y;
// OUT_GATED: outb[row] = act(gate)·up with gate rows from w0 and up rows from w1 (n0 rows each, the up bias
// after the gate's); OUT_ACT: outb[row] = act(y).
// Rows of w0, w1, w2 are numbered one after the other (QKV in one launch).

#define IN_NORM 0
#define IN_BF16 1
#define OUT_STORE 0
#define OUT_RESID 1
#define OUT_GATED 2
#define OUT_ACT 3

// The MLP's activation (`act` argument).
#define ACT_SILU 0
#define ACT_GELU 1
#define ACT_GELU_TANH 2

__device__ __forceinline__ float activate(float x, int act) {
    if (act == ACT_GELU) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    if (act == ACT_GELU_TANH) return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    return x / (1.f + __expf(-x));
}

// The norm in front of a matvec: RMSNorm (`norm_b` unused) or LayerNorm (`layer_norm`; `norm_b` may be null).
struct NormArgs {
    const float* xf;
    const bf16* w;
    const bf16* b;
    int layer_norm;
    float eps;
};

// Fills xs with the matvec input and returns the scale of the products: for RMSNorm, xs = x * norm_w and the
// scale is 1/rms(x), applied to each dot product (one pass over x instead of two). LayerNorm's bias does not
// factor out that way: xs is the finished (x - mean)/std * w + b and the scale 1.
template <int IN>
__device__ __forceinline__ float load_input(bf16* xs, int K, const NormArgs& nm, const bf16* xb, float* red) {
    if (IN == IN_NORM && nm.layer_norm) {
        float sum = 0.f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) sum += nm.xf[i];
        float mean = block_sum(sum, red) / (float)K;
        float ss = 0.f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) {
            float d = nm.xf[i] - mean;
            ss += d * d;
        }
        float rstd = rsqrtf(block_sum(ss, red) / (float)K + nm.eps);
        for (int i = threadIdx.x; i < K; i += blockDim.x) {
            float v = (nm.xf[i] - mean) * rstd * __bfloat162float(nm.w[i]);
            xs[i] = __float2bfloat16(nm.b ? v + __bfloat162float(nm.b[i]) : v);
        }
        __syncthreads();
        return 1.f;
    }
    if (IN == IN_NORM) {
        float ss = 0.f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) {
            float v = nm.xf[i];
            ss += v * v;
            xs[i] = __float2bfloat16(v * __bfloat162float(nm.w[i]));
        }
        return rsqrtf(block_sum(ss, red) / (float)K + nm.eps);  // block_sum's barriers publish xs
    }
    const uint4* src = reinterpret_cast<const uint4*>(xb);
    uint4* dst = reinterpret_cast<uint4*>(xs);
    for (int i = threadIdx.x; i < (K >> 3); i += blockDim.x) dst[i] = src[i];
    __syncthreads();
    return 1.f;
}

// Rows of this launch: a persistent grid (a few blocks per SM) whose warps step through the rows, so the
// input is loaded and normalised once per block rather than once per eight rows.
template <int OUT>
__device__ __forceinline__ bool warp_rows(int row, const uint8_t* w0, const uint8_t* w1, const uint8_t* w2, int n0,
                                          int n1, int n2, size_t rb, const uint8_t** rows) {
    if (OUT == OUT_GATED) {
        if (row >= n0) return false;
        rows[0] = w0 + row * rb;
        rows[1] = w1 + row * rb;
        return true;
    }
    if (row < n0) rows[0] = w0 + row * rb;
    else if (row < n0 + n1) rows[0] = w1 + (row - n0) * rb;
    else if (row < n0 + n1 + n2) rows[0] = w2 + (row - n0 - n1) * rb;
    else return false;
    return true;
}

// Where a row's result goes, and what is applied on the way.
struct Epilogue {
    const float* bias;  // null: none
    int n0;             // gate rows (OUT_GATED: the up bias and adapter rows start there)
    int act;
    float* outf;
    bf16* outb;
    // An unmerged LoRA adapter: row r adds lora_b[r, :] · lora_t, where lora_t = A x (all the launch's
    // adapters' A stacked, computed by the launch before) and lora_b holds each matrix's scale·B in its own
    // columns (zeros elsewhere). Null: none.
    const bf16* lora_b;
    const float* lora_t;
    int lora_r;
};

// The adapter's share of a row (the whole warp, before the row is stored), NR values as the row's outputs.
template <int OUT, int NR>
__device__ __forceinline__ void lora_rows(int row, const Epilogue& e, float* add) {
#pragma unroll
    for (int r = 0; r < NR; r++) {
        add[r] = 0.f;
        if (!e.lora_b) continue;  // the same for the whole launch: no warp sum without an adapter
        float s = 0.f;
        const bf16* b = e.lora_b + (size_t)(OUT == OUT_GATED && r == 1 ? e.n0 + row : row) * e.lora_r;
        for (int j = threadIdx.x & 31; j < e.lora_r; j += 32) s = fmaf(__bfloat162float(b[j]), e.lora_t[j], s);
        add[r] = warp_sum(s);
    }
}

template <int OUT>
__device__ __forceinline__ void store_row(int row, float* y, float scale, const float* add, const Epilogue& e) {
    if ((threadIdx.x & 31) != 0) return;
    y[0] = y[0] * scale + add[0];
    if (OUT == OUT_GATED) y[1] = y[1] * scale + add[1];
    if (e.bias) {
        y[0] += e.bias[row];
        if (OUT == OUT_GATED) y[1] += e.bias[e.n0 + row];
    }
    if (OUT == OUT_GATED) e.outb[row] = __float2bfloat16(activate(y[0], e.act) * y[1]);
    else if (OUT == OUT_ACT) e.outb[row] = __float2bfloat16(activate(y[0], e.act));
    else if (OUT == OUT_RESID) e.outf[row] += y[0];
    else e.outf[row] = y[0];
}

template <int WT, int IN, int OUT, int DEPTH>
__device__ void matvec(const uint8_t* w0, const uint8_t* w1, const uint8_t* w2, int n0, int n1, int n2, int K,
                       const NormArgs& nm, const bf16* xb, const Epilogue& ep) {
    constexpr int NR = OUT == OUT_GATED ? 2 : 1;
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float red[32];
    bf16* xs = reinterpret_cast<bf16*>(smem);
    int first = blockIdx.x * WARPS + (threadIdx.x >> 5), stride = gridDim.x * WARPS;
    size_t rb = row_bytes<WT>(K);
    const uint8_t* rows[NR];
    bool have = warp_rows<OUT>(first, w0, w1, w2, n0, n1, n2, rb, rows);
    // bf16: start streaming the first rows before waiting for the previous kernel (weights never change).
    constexpr int CH = 32 * (DEPTH / NR);
    const int n = K >> 3;
    // Where the chunk after (row, c) is: the next chunk of the row, or the first of the warp's next row.
    auto next_pos = [&](int row, int c, const uint8_t** cur, int& nrow, int& nc, const uint8_t** nrows) -> bool {
        nrow = row;
        nc = c + CH;
        if (nc < n) {
#pragma unroll
            for (int r = 0; r < NR; r++) nrows[r] = cur[r];
            return true;
        }
        nrow = row + stride;
        nc = 0;
        return warp_rows<OUT>(nrow, w0, w1, w2, n0, n1, n2, rb, nrows);
    };
    // bf16: stream the warp's first two chunks before waiting for the previous kernel (weights never change).
    Bf16Chunk<NR, DEPTH> ch, other;
    int row2 = 0, c2 = 0;
    const uint8_t* rows2[NR];
    bool have2 = false;
    if (WT == 0 && have) {
        bf16_load<NR, DEPTH>(rows, 0, n, ch);
        have2 = next_pos(first, 0, rows, row2, c2, rows2);
        if (have2) bf16_load<NR, DEPTH>(rows2, c2, n, other);
    }
    pdl_wait();
    pdl_launch_dependents();
    float scale = load_input<IN>(xs, K, nm, xb, red);
    if (!have) return;
    if (WT != 0) {
        for (int row = first; have; row += stride) {
            float y[NR];
#pragma unroll
            for (int r = 0; r < NR; r++) y[r] = row_dot_quant<WT>(rows[r], xs, K);
            float add[NR];
            lora_rows<OUT, NR>(row, ep, add);
            store_row<OUT>(row, y, scale, add, ep);
            have = warp_rows<OUT>(row + stride, w0, w1, w2, n0, n1, n2, rb, rows);
        }
        return;
    }
    // One stream of chunks over all of this warp's rows, the next chunk (possibly of the next row) in flight
    // while one is multiplied, so row boundaries leave no gap in the loads.
    const uint4* x = reinterpret_cast<const uint4*>(xs);
    int row = first, c = 0;
    float acc[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.f;
    bool loaded = have2;  // the chunk after the current one is already in flight
    // `cur` holds chunk c of `row`; the following chunk goes to (or already is in) `nxt`.
    auto step = [&](Bf16Chunk<NR, DEPTH>& cur, Bf16Chunk<NR, DEPTH>& nxt) -> bool {
        int nrow, nc;
        const uint8_t* nrows[NR];
        bool more = next_pos(row, c, rows, nrow, nc, nrows);
        if (more && !loaded) bf16_load<NR, DEPTH>(nrows, nc, n, nxt);
        loaded = false;
        bf16_use<NR, DEPTH>(cur, x, c, n, acc);
        if (nc == 0) {
            float y[NR];
#pragma unroll
            for (int r = 0; r < NR; r++) {
                y[r] = warp_sum(acc[r]);
                acc[r] = 0.f;
            }
            float add[NR];
            lora_rows<OUT, NR>(row, ep, add);
            store_row<OUT>(row, y, scale, add, ep);
        }
        row = nrow;
        c = nc;
#pragma unroll
        for (int r = 0; r < NR; r++) rows[r] = nrows[r];
        return more;
    };
    while (step(ch, other) && step(other, ch)) {
    }
}

// DEPTH: 16-byte weight vectors per lane per chunk (two chunks in flight); BPS: blocks per SM it is built for.
// `norm_b` / `bias` / `lora_b` may be null; `layer_norm` picks LayerNorm over RMSNorm.
#define LORA_ARGS const bf16 *lora_b, const float *lora_t, int lora_r
#define MATVEC_KERNELS(NAME, WT, DEPTH, BPS)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, BPS)                                                     \
        NAME##_norm_store(const uint8_t* w0, const uint8_t* w1, const uint8_t* w2, int n0, int n1, int n2, int K,   \
                          const float* xf, const bf16* norm_w, const bf16* norm_b, int layer_norm, float eps,      \
                          const float* bias, float* out, LORA_ARGS) {                                              \
        NormArgs nm{xf, norm_w, norm_b, layer_norm, eps};                                                          \
        matvec<WT, IN_NORM, OUT_STORE, DEPTH>(w0, w1, w2, n0, n1, n2, K, nm, nullptr,                              \
                                              Epilogue{bias, n0, 0, out, nullptr, lora_b, lora_t, lora_r});        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, BPS)                                                     \
        NAME##_store(const uint8_t* w0, int n0, int K, const bf16* xb, float* out) {                               \
        NormArgs nm{nullptr, nullptr, nullptr, 0, 0.f};                                                            \
        matvec<WT, IN_BF16, OUT_STORE, DEPTH>(w0, nullptr, nullptr, n0, 0, 0, K, nm, xb,                           \
                                              Epilogue{nullptr, n0, 0, out, nullptr, nullptr, nullptr, 0});        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, BPS)                                                     \
        NAME##_resid(const uint8_t* w0, int n0, int K, const bf16* xb, const float* bias, float* resid,            \
                     LORA_ARGS) {                                                                                  \
        NormArgs nm{nullptr, nullptr, nullptr, 0, 0.f};                                                            \
        matvec<WT, IN_BF16, OUT_RESID, DEPTH>(w0, nullptr, nullptr, n0, 0, 0, K, nm, xb,                           \
                                              Epilogue{bias, n0, 0, resid, nullptr, lora_b, lora_t, lora_r});      \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, BPS)                                                     \
        NAME##_norm_gated(const uint8_t* gate, const uint8_t* up, int n, int K, const float* xf,                   \
                          const bf16* norm_w, const bf16* norm_b, int layer_norm, float eps, const float* bias,    \
                          int act, bf16* out, LORA_ARGS) {                                                         \
        NormArgs nm{xf, norm_w, norm_b, layer_norm, eps};                                                          \
        matvec<WT, IN_NORM, OUT_GATED, DEPTH>(gate, up, nullptr, n, 0, 0, K, nm, nullptr,                          \
                                              Epilogue{bias, n, act, nullptr, out, lora_b, lora_t, lora_r});       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, BPS)                                                     \
        NAME##_norm_act(const uint8_t* w0, int n, int K, const float* xf, const bf16* norm_w, const bf16* norm_b,  \
                        int layer_norm, float eps, const float* bias, int act, bf16* out, LORA_ARGS) {             \
        NormArgs nm{xf, norm_w, norm_b, layer_norm, eps};                                                          \
        matvec<WT, IN_NORM, OUT_ACT, DEPTH>(w0, nullptr, nullptr, n, 0, 0, K, nm, nullptr,                         \
                                            Epilogue{bias, n, act, nullptr, out, lora_b, lora_t, lora_r});         \
    }

MATVEC_KERNELS(mv_bf16, 0, 4, MV_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q8_0, 1, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q4k, 2, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q6k, 3, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q4_0, 4, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q4_1, 5, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q5_0, 6, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q5_1, 7, 4, MV_QUANT_BLOCKS_PER_SM)
MATVEC_KERNELS(mv_q5k, 8, 4, MV_QUANT_BLOCKS_PER_SM)

// ---- hidden state in: the embedding row (bf16) to the f32 residual stream ----
extern "C" __global__ void hidden_from_bf16(const bf16* src, float* dst, int n) {
    pdl_wait();
    pdl_launch_dependents();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __bfloat162float(src[i]);
}

// ---- attention over the cache for one new token ----
// grid (num_heads, splits), ATT_THREADS threads. Block (h, s) covers cached positions
// [s*ATT_THREADS, min(.., pos+1)), one thread per position; blocks past the current length exit at once.
// Each block rotates its query head (scaled by 1/sqrt(d)) and the new key of its KV head at *pos; the first
// block of each KV group writes the new key and value into the cache (bf16, [kv_heads, cap, D]). Other blocks
// take the new token's key/value from shared memory, so no block reads a cache row this launch writes.
// With one active split the block writes the head's output; otherwise each writes a partial (max, sum,
// weighted values) and the last block of the head to finish combines them (no second kernel).
#define ATT_THREADS 128

template <int D>
__device__ void attention_decode(const float* qkv, const int* pos_ptr, bf16* kc, bf16* vc, int cap, int nh, int nkv,
                                 const float* inv_freq, int rot, float q_scale, int interleaved, int per_head,
                                 bf16* out, float* part, unsigned* done) {
    constexpr int DG = D / 8;             // 8-dim slices of a head
    constexpr int PG = ATT_THREADS / DG;  // position groups in the value sum
    __shared__ float q_s[D], k_s[D], v_s[D];
    __shared__ float prob[ATT_THREADS];
    __shared__ float red[32];
    __shared__ float accs[PG][D];
    __shared__ bool last;
    int h = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    int groups = nh / nkv, g = h / groups;
    // The position (set before the graph runs) and the keys/values of earlier steps are final before this
    // kernel starts: load them, then wait for the QKV matvec.
    int pos = *pos_ptr;
    int active = min(nsplit, pos / ATT_THREADS + 1);
    if (split >= active) {
        pdl_wait();
        pdl_launch_dependents();
        return;
    }
    bf16* krow = kc + ((size_t)g * cap) * D;
    bf16* vrow = vc + ((size_t)g * cap) * D;
    int start = split * ATT_THREADS, end = min(start + ATT_THREADS, pos + 1);
    int t = start + threadIdx.x;
    // Cached keys of this thread's position and this thread's value slices: loads issued before the rotation.
    uint4 kv[DG];
    if (t < pos) {
        const uint4* kr = reinterpret_cast<const uint4*>(krow + (size_t)t * D);
#pragma unroll
        for (int j = 0; j < DG; j++) kv[j] = kr[j];
        asm volatile("prefetch.global.L1 [%0];" ::"l"(vrow + (size_t)t * D));
    }
    pdl_wait();
    pdl_launch_dependents();
    // q | k | v as blocks of all heads (llama), or [q | k | v] per head (GPT-NeoX's fused query_key_value).
    const float* q = per_head ? qkv + h * 3 * D : qkv + h * D;
    const float* k = per_head ? qkv + g * 3 * D + D : qkv + nh * D + g * D;
    const float* v = per_head ? qkv + g * 3 * D + 2 * D : qkv + (nh + nkv) * D + g * D;
    // The first `rot` dims rotate (pairs (i, i + rot/2), or adjacent ones); the rest pass through.
    for (int i = threadIdx.x; i < rot / 2; i += blockDim.x) {
        // f32 angle like the reference's table; sincosf is within an ulp of its f64-then-rounded values
        float c, s;
        sincosf((float)pos * inv_freq[i], &s, &c);
        int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + rot / 2;
        q_s[i0] = (q[i0] * c - q[i1] * s) * q_scale;
        q_s[i1] = (q[i1] * c + q[i0] * s) * q_scale;
        // keys and values are used at the cache's precision, also for the new token
        k_s[i0] = __bfloat162float(__float2bfloat16(k[i0] * c - k[i1] * s));
        k_s[i1] = __bfloat162float(__float2bfloat16(k[i1] * c + k[i0] * s));
    }
    for (int i = rot + threadIdx.x; i < D; i += blockDim.x) {
        q_s[i] = q[i] * q_scale;
        k_s[i] = __bfloat162float(__float2bfloat16(k[i]));
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) v_s[i] = __bfloat162float(__float2bfloat16(v[i]));
    __syncthreads();
    if (h % groups == 0 && split == 0) {
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            krow[(size_t)pos * D + i] = __float2bfloat16(k_s[i]);
            vrow[(size_t)pos * D + i] = __float2bfloat16(v_s[i]);
        }
    }
    float sc = -INFINITY;
    if (t < end) {
        float a = 0.f;
        if (t == pos) {
#pragma unroll 8
            for (int i = 0; i < D; i++) a = fmaf(q_s[i], k_s[i], a);
        } else {
#pragma unroll
            for (int j = 0; j < DG; j++) {
                float kf[8];
                unpack8(kv[j], kf);
#pragma unroll
                for (int e = 0; e < 8; e++) a = fmaf(q_s[8 * j + e], kf[e], a);
            }
        }
        sc = a;
    }
    // Max and sum of exponentials in one reduction: (m, l) pairs merge as l1 e^(m1-M) + l2 e^(m2-M).
    float m = sc, l = t < end ? 1.f : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, m, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
        float mx = fmaxf(m, om);
        l = (l > 0.f ? l * __expf(m - mx) : 0.f) + (ol > 0.f ? ol * __expf(om - mx) : 0.f);
        m = mx;
    }
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = m;
        red[16 + (threadIdx.x >> 5)] = l;
    }
    __syncthreads();
    float M = -INFINITY, L = 0.f;
    for (int w = 0; w < ATT_THREADS / 32; w++) M = fmaxf(M, red[w]);
    for (int w = 0; w < ATT_THREADS / 32; w++)
        if (red[16 + w] > 0.f) L += red[16 + w] * __expf(red[w] - M);
    prob[threadIdx.x] = t < end ? __expf(sc - M) : 0.f;
    __syncthreads();
    int dg = threadIdx.x % DG, pg = threadIdx.x / DG;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int cnt = end - start;
    for (int base = pg; base < cnt; base += 4 * PG) {
        uint4 vv[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int tt = base + u * PG;
            vv[u] = (tt < cnt && start + tt != pos) ? reinterpret_cast<const uint4*>(vrow + (size_t)(start + tt) * D)[dg]
                                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int tt = base + u * PG;
            if (tt >= cnt) break;
            float w = prob[tt], vf[8];
            if (start + tt == pos) {
#pragma unroll
                for (int e = 0; e < 8; e++) vf[e] = v_s[8 * dg + e];
            } else {
                unpack8(vv[u], vf);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(w, vf[e], acc[e]);
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) accs[pg][8 * dg + e] = acc[e];
    __syncthreads();
    if (active == 1) {
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            float A = 0.f;
            for (int gi = 0; gi < PG; gi++) A += accs[gi][i];
            out[h * D + i] = __float2bfloat16(A / L);
        }
        return;
    }
    float* pp = part + ((size_t)h * nsplit + split) * (D + 2);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float A = 0.f;
        for (int gi = 0; gi < PG; gi++) A += accs[gi][i];
        pp[2 + i] = A;
    }
    if (threadIdx.x == 0) {
        pp[0] = M;
        pp[1] = L;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&done[h], 1u) == (unsigned)(active - 1);
    __syncthreads();
    if (!last) return;
    // The head's last block: every partial is written (fenced before each block's count).
    __threadfence();
    const float* hp = part + (size_t)h * nsplit * (D + 2);
    float Mx = -INFINITY;
    for (int sp = 0; sp < active; sp++) Mx = fmaxf(Mx, __ldcg(hp + sp * (D + 2)));
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float Ls = 0.f, A = 0.f;
        for (int sp = 0; sp < active; sp++) {
            float f = __expf(__ldcg(hp + sp * (D + 2)) - Mx);
            Ls += __ldcg(hp + sp * (D + 2) + 1) * f;
            A += __ldcg(hp + sp * (D + 2) + 2 + i) * f;
        }
        out[h * D + i] = __float2bfloat16(A / Ls);
    }
    if (threadIdx.x == 0) done[h] = 0;  // ready for the next layer
}

#define ATTENTION_KERNEL(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                    \
        attention_decode_##D(const float* qkv, const int* pos, bf16* kc, bf16* vc, int cap, int nh, int nkv,    \
                             const float* inv_freq, int rot, float q_scale, int interleaved, int per_head,      \
                             bf16* out, float* part, unsigned* done) {                                          \
        attention_decode<D>(qkv, pos, kc, vc, cap, nh, nkv, inv_freq, rot, q_scale, interleaved, per_head, out, \
                            part, done);                                                                        \
    }

// 8, 16 and 32 serve small models (the reference fixtures) through the same graph.
ATTENTION_KERNEL(8)
ATTENTION_KERNEL(16)
ATTENTION_KERNEL(32)
ATTENTION_KERNEL(64)
ATTENTION_KERNEL(128)
ATTENTION_KERNEL(256)

// ---- fused ops of the regular (prefill) forward pass ----

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <int BYTES> struct VecOf;
template <> struct VecOf<2> { typedef unsigned short t; };
template <> struct VecOf<4> { typedef unsigned int t; };
template <> struct VecOf<8> { typedef uint2 t; };
template <> struct VecOf<16> { typedef uint4 t; };

// C consecutive values of T at p (aligned to their size, up to 16 bytes a load) as floats.
template <typename T, int C>
__device__ __forceinline__ void load_f(const T* p, float* f) {
    constexpr int V = C * (int)sizeof(T) > 16 ? 16 : C * (int)sizeof(T);
    constexpr int E = V / (int)sizeof(T);
    typedef typename VecOf<V>::t Vec;
#pragma unroll
    for (int q = 0; q < C / E; q++) {
        Vec v = reinterpret_cast<const Vec*>(p)[q];
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < E; j++) f[q * E + j] = to_f(e[j]);
    }
}

template <typename T, int C>
__device__ __forceinline__ void store_f(T* p, const float* f) {
    constexpr int V = C * (int)sizeof(T) > 16 ? 16 : C * (int)sizeof(T);
    constexpr int E = V / (int)sizeof(T);
    typedef typename VecOf<V>::t Vec;
#pragma unroll
    for (int q = 0; q < C / E; q++) {
        Vec v;
        T* e = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int j = 0; j < E; j++) e[j] = from_f<T>(f[q * E + j]);
        reinterpret_cast<Vec*>(p)[q] = v;
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Softmax over attention scores `[rows, total]` with the causal mask applied on the fly: row r is query
// r % t of t new tokens after `offset` cached ones, so columns past offset + r % t get probability 0.
// One warp per row, f32 math (replaces building a mask tensor, a broadcast add and a softmax).
template <typename T>
__device__ void causal_softmax(const T* x, T* y, int rows, int total, int t, int offset) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    int limit = min(total, offset + row % t + 1);
    const T* xr = x + (size_t)row * total;
    T* yr = y + (size_t)row * total;
    float m = -INFINITY;
    for (int j = lane; j < limit; j += 32) m = fmaxf(m, to_f(xr[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < limit; j += 32) s += expf(to_f(xr[j]) - m);
    float inv = 1.f / warp_sum(s);
    for (int j = lane; j < total; j += 32) yr[j] = from_f<T>(j < limit ? expf(to_f(xr[j]) - m) * inv : 0.f);
}

// Softmax over attention scores `[rows, total]` of rows that hold sequences of different lengths: the
// `rows_per_seq` rows of sequence b see the `prefix` columns of a shared prefix, then their own columns from
// `prefix + starts[b]` (earlier ones are padding or another sequence's leftovers) up to themselves: row r is
// query r % t of t new tokens after `offset` cached columns. One warp per row, f32 math.
template <typename T>
__device__ void span_softmax(const T* x, const unsigned* starts, T* y, int rows, int total, int t, int offset,
                             int prefix, int rows_per_seq) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    int lo = prefix + (int)starts[row / rows_per_seq], hi = min(total, prefix + offset + row % t + 1);
    const T* xr = x + (size_t)row * total;
    T* yr = y + (size_t)row * total;
    float m = -INFINITY;
    for (int j = lane; j < hi; j += 32)
        if (j < prefix || j >= lo) m = fmaxf(m, to_f(xr[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < hi; j += 32)
        if (j < prefix || j >= lo) s += expf(to_f(xr[j]) - m);
    float inv = 1.f / warp_sum(s);
    for (int j = lane; j < total; j += 32)
        yr[j] = from_f<T>(j < hi && (j < prefix || j >= lo) ? expf(to_f(xr[j]) - m) * inv : 0.f);
}

// The span softmax of rows after a shared prefix, with the prefix's scores in their own tensor (the product of
// every row's queries with the one prefix, `[kv, seqs * g * t, prefix]`) beside the own columns' scores
// (`[seqs, kv, g * t, own]`, `rows_per_seq = kv * g * t`): one softmax over both, written to `y` as the two
// probability tensors back to back in those same layouts, so neither needs a copy to meet the value products.
template <typename T>
__device__ void span_softmax_split(const T* shared, const T* own, const unsigned* starts, T* y, int rows,
                                   int own_total, int t, int offset, int prefix, int prefix_cols, int rows_per_seq,
                                   int kv, int seqs) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    int gt = rows_per_seq / kv;
    int b = row / rows_per_seq, rem = row - b * rows_per_seq, k = rem / gt, i = rem - k * gt;
    size_t srow = ((size_t)k * seqs + b) * gt + i;
    const T* sr = shared + srow * prefix_cols;
    T* ys = y + srow * prefix_cols;
    const T* xr = own + (size_t)row * own_total;
    T* yo = y + (size_t)rows * prefix_cols + (size_t)row * own_total;
    int lo = (int)starts[b], hi = min(own_total, offset + i % t + 1);
    float m = -INFINITY;
    for (int j = lane; j < prefix; j += 32) m = fmaxf(m, to_f(sr[j]));
    for (int j = lo + lane; j < hi; j += 32) m = fmaxf(m, to_f(xr[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < prefix; j += 32) s += __expf(to_f(sr[j]) - m);
    for (int j = lo + lane; j < hi; j += 32) s += __expf(to_f(xr[j]) - m);
    float inv = 1.f / warp_sum(s);
    // Columns past the prefix's own (padding to an aligned width) get 0.
    for (int j = lane; j < prefix_cols; j += 32) ys[j] = from_f<T>(j < prefix ? __expf(to_f(sr[j]) - m) * inv : 0.f);
    for (int j = lane; j < own_total; j += 32)
        yo[j] = from_f<T>(j >= lo && j < hi ? __expf(to_f(xr[j]) - m) * inv : 0.f);
}

// silu(gate) * up, elementwise over contiguous tensors.
template <typename T>
__device__ void swiglu(const T* g, const T* u, T* y, size_t n) {
    // Eight values a thread with 16-byte loads where the sizes and addresses allow (one 2-byte value per
    // thread kept too few bytes in flight: 1.2 TB/s).
    if (n % 8 == 0 && (((size_t)g | (size_t)u | (size_t)y) & 15) == 0) {
        for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n / 8; i += (size_t)gridDim.x * blockDim.x) {
            float a[8], b[8];
            load_f<T, 8>(g + 8 * i, a);
            load_f<T, 8>(u + 8 * i, b);
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] = a[k] / (1.f + expf(-a[k])) * b[k];
            store_f<T, 8>(y + 8 * i, a);
        }
        return;
    }
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = to_f(g[i]);
        y[i] = from_f<T>(a / (1.f + expf(-a)) * to_f(u[i]));
    }
}

// RMSNorm's (CENTERED false) or LayerNorm's input gradient, one warp per row (weights frozen): with c = x − mean
// (LayerNorm) or c = x (RMSNorm), dx = rstd·(g·w − [Σ(g·w)/cols] − c·rstd²·Σ(g·w·c)/cols), the bracketed term
// LayerNorm's only; the same f32 steps as the CPU loop (ops/backward.rs).
template <typename T, bool CENTERED>
__device__ void norm_backward(const T* x, const T* w, const T* g, T* dx, long long rows, int cols, float eps) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * cols;
    const T* gr = g + (size_t)row * cols;
    T* dr = dx + (size_t)row * cols;
    float mean = 0.f;
    if (CENTERED) {
        for (int j = lane; j < cols; j += 32) mean += to_f(xr[j]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mean += __shfl_xor_sync(0xffffffffu, mean, o);
        mean /= cols;
    }
    float var = 0.f, sg = 0.f, sgc = 0.f;
    for (int j = lane; j < cols; j += 32) {
        float c = to_f(xr[j]) - mean, gw = to_f(gr[j]) * to_f(w[j]);
        var += c * c;
        sg += gw;
        sgc += gw * c;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        var += __shfl_xor_sync(0xffffffffu, var, o);
        sg += __shfl_xor_sync(0xffffffffu, sg, o);
        sgc += __shfl_xor_sync(0xffffffffu, sgc, o);
    }
    float rstd = 1.f / sqrtf(var / cols + eps);
    float mean_gw = CENTERED ? sg / cols : 0.f, k = rstd * rstd * sgc / cols;
    for (int j = lane; j < cols; j += 32)
        dr[j] = from_f<T>(rstd * (to_f(gr[j]) * to_f(w[j]) - mean_gw - (to_f(xr[j]) - mean) * k));
}

// SwiGLU's gradients: out[i] = d gate, out[n + i] = d up, with silu'(x) = σ(x)(1 + x(1 − σ(x))).
template <typename T> __device__ void swiglu_backward(const T* x, const T* u, const T* g, T* out, long long n) {
    if (n % 8 == 0 && (((size_t)x | (size_t)u | (size_t)g | (size_t)out) & 15) == 0) {  // as in swiglu
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n / 8;
             i += (long long)gridDim.x * blockDim.x) {
            float a[8], uu[8], gg[8], dx[8], du[8];
            load_f<T, 8>(x + 8 * i, a);
            load_f<T, 8>(u + 8 * i, uu);
            load_f<T, 8>(g + 8 * i, gg);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float s = 1.f / (1.f + expf(-a[k]));
                dx[k] = gg[k] * uu[k] * (s * (1.f + a[k] * (1.f - s)));
                du[k] = gg[k] * (a[k] * s);
            }
            store_f<T, 8>(out + 8 * i, dx);
            store_f<T, 8>(out + n + 8 * i, du);
        }
        return;
    }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = to_f(x[i]), gg = to_f(g[i]);
        float s = 1.f / (1.f + expf(-a));
        out[i] = from_f<T>(gg * to_f(u[i]) * (s * (1.f + a * (1.f - s))));
        out[n + i] = from_f<T>(gg * (a * s));
    }
}

// The adapters' dropout, x ⊙ mask widened to f32: element i is kept when its 16 bits of splitmix64's step
// i / 4 + 1 from `seed` (bits 16 · (i mod 4) up) reach `threshold` (p · 2^16); one hash serves four
// elements. The same test as the CPU's (ops/backward.rs).
__device__ __forceinline__ unsigned long long dropout_bits(unsigned long long seed, unsigned long long g) {
    unsigned long long z = seed + (g + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool dropout_keeps(unsigned long long seed, unsigned long long i, unsigned threshold) {
    return ((dropout_bits(seed, i >> 2) >> (16 * (i & 3))) & 0xFFFF) >= threshold;
}

template <typename T>
__device__ void dropout_f32(const T* x, float* out, long long n, unsigned long long seed, unsigned threshold) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = dropout_keeps(seed, (unsigned long long)i, threshold) ? to_f(x[i]) : 0.f;
}

#define FUSED_OPS(T, NAME)                                                                                          \
    extern "C" __global__ void causal_softmax_##NAME(const T* x, T* y, int rows, int total, int t, int offset) {  \
        causal_softmax<T>(x, y, rows, total, t, offset);                                                            \
    }                                                                                                               \
    extern "C" __global__ void span_softmax_##NAME(const T* x, const unsigned* starts, T* y, int rows, int total,  \
                                                  int t, int offset, int prefix, int rows_per_seq) {             \
        span_softmax<T>(x, starts, y, rows, total, t, offset, prefix, rows_per_seq);                                \
    }                                                                                                               \
    extern "C" __global__ void span_softmax_split_##NAME(const T* shared, const T* own, const unsigned* starts,    \
                                                        T* y, int rows, int own_total, int t, int offset,         \
                                                        int prefix, int prefix_cols, int rows_per_seq, int kv,    \
                                                        int seqs) {                                                \
        span_softmax_split<T>(shared, own, starts, y, rows, own_total, t, offset, prefix, prefix_cols, rows_per_seq, \
                              kv, seqs);                                                                           \
    }                                                                                                               \
    extern "C" __global__ void swiglu_##NAME(const T* g, const T* u, T* y, unsigned long long n) {                 \
        swiglu<T>(g, u, y, (size_t)n);                                                                              \
    }                                                                                                               \
    extern "C" __global__ void rms_norm_backward_##NAME(const T* x, const T* w, const T* g, T* dx, long long rows, \
                                                       int cols, float eps) {                                     \
        norm_backward<T, false>(x, w, g, dx, rows, cols, eps);                                                         \
    }                                                                                                               \
    extern "C" __global__ void layer_norm_backward_##NAME(const T* x, const T* w, const T* g, T* dx,               \
                                                         long long rows, int cols, float eps) {                   \
        norm_backward<T, true>(x, w, g, dx, rows, cols, eps);                                                       \
    }                                                                                                               \
    extern "C" __global__ void swiglu_backward_##NAME(const T* x, const T* u, const T* g, T* out, long long n, int, \
                                                     float) {                                                     \
        swiglu_backward<T>(x, u, g, out, n);                                                                        \
    }                                                                                                               \
    extern "C" __global__ void dropout_f32_##NAME(const T* x, float* out, long long n, unsigned long long seed,      \
                                                 unsigned threshold) {                                            \
        dropout_f32<T>(x, out, n, seed, threshold);                                                                 \
    }

FUSED_OPS(float, f32)
FUSED_OPS(bf16, bf16)
FUSED_OPS(__half, f16)


// Asynchronous 16-byte copies global -> shared (cp.async; `valid` false zero-fills the 16 bytes instead): the
// caller commits each group and waits for it before reading what it copied.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// ---- The LoRA layer of training: y = base + c · (keep ⊙ x) Aᵀ Bᵀ ----
// A [R, in] and B [out, R] are f32 (the trained copy), x, the base product and the gradients arriving from
// above are the model's dtype. Every product with A or B is a rank-R contraction: memory-bound passes over
// the [rows, in] or [rows, out] tensors with the small factor in registers or read warp-uniformly, f32
// accumulation, the dropout mask re-derived from its seed where it is needed (the same hash as dropout_f32).
// A contraction split over blocks writes its splits apart and the next pass (in lora_cols, the last block to
// finish) adds them in a fixed order, so results do not depend on timing (no atomics on values).


// Rotary embedding of training between the projections' [b, t, heads, d] and attention's [b, heads, t, d]:
// y = scale · R(sign · θ) x over the first `rot` dims of each head (pairs (i, i + rot/2), or (2i, 2i + 1)
// interleaved; θ from the [t, rot/2] tables), the rest copied times scale. x and y are addressed through
// their strides for b, heads and t (d contiguous), so the forward reads the projection's output where it is
// and the backward (sign −1: R is orthogonal) writes the gradient in that layout — no transposing copies.
// Unit i of a walk over [b, h, t, units]: its place u in the row, its position tt, and the rows of x and y
// it falls in (through their strides for b, h and t).
template <typename T>
__device__ __forceinline__ void strided_unit(long long i, int units, int h, int t, const T* x, long long xb,
                                             long long xh, long long xt, T* y, long long yb, long long yh,
                                             long long yt, int& u, int& tt, const T*& xr, T*& yr) {
    u = (int)(i % units);
    long long r = i / units;
    tt = (int)(r % t);
    r /= t;
    int hh = (int)(r % h), bb = (int)(r / h);
    xr = x + bb * xb + hh * xh + tt * xt;
    yr = y + bb * yb + hh * yh + tt * yt;
}

template <typename T>
__device__ void rope_strided(const T* x, long long xb, long long xh, long long xt, const T* cos, const T* sin, T* y,
                             long long yb, long long yh, long long yt, int b, int h, int t, int d, int rot,
                             int interleaved, float scale, float sign) {
    int half = rot / 2, units = half + (d - rot);
    long long n = (long long)b * h * t * units;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        int u, tt;
        const T* xr;
        T* yr;
        strided_unit(i, units, h, t, x, xb, xh, xt, y, yb, yh, yt, u, tt, xr, yr);
        if (u < half) {
            int i1 = interleaved ? 2 * u : u, i2 = interleaved ? 2 * u + 1 : u + half;
            float c = to_f(cos[(size_t)tt * half + u]), s = sign * to_f(sin[(size_t)tt * half + u]);
            float a = to_f(xr[i1]), v = to_f(xr[i2]);
            yr[i1] = from_f<T>(scale * (a * c - v * s));
            yr[i2] = from_f<T>(scale * (a * s + v * c));
        } else {
            int j = rot + (u - half);
            yr[j] = from_f<T>(scale * to_f(xr[j]));
        }
    }
}

// The same for 2-byte types, 16 bytes a load: a thread takes 8 pairs (i, i + rot/2), or 4 interleaved pairs, or 8
// passed-through values. The host takes this form when rot/2, d − rot, the strides and the addresses are whole
// 16-byte vectors (one value per thread was 0.7 TB/s).
template <typename T>
__device__ void rope_strided_vec(const T* x, long long xb, long long xh, long long xt, const T* cos, const T* sin,
                                 T* y, long long yb, long long yh, long long yt, int b, int h, int t, int d, int rot,
                                 int interleaved, float scale, float sign) {
    int half = rot / 2;
    int rotating = interleaved ? rot / 8 : half / 8, units = rotating + (d - rot) / 8;
    long long n = (long long)b * h * t * units;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        int u, tt;
        const T* xr;
        T* yr;
        strided_unit(i, units, h, t, x, xb, xh, xt, y, yb, yh, yt, u, tt, xr, yr);
        float a[8], v[8], c[8], s[8];
        if (u >= rotating) {
            int j = rot + 8 * (u - rotating);
            load_f<T, 8>(xr + j, a);
#pragma unroll
            for (int k = 0; k < 8; k++) a[k] *= scale;
            store_f<T, 8>(yr + j, a);
        } else if (interleaved) {
            load_f<T, 8>(xr + 8 * u, a);
            load_f<T, 4>(cos + (size_t)tt * half + 4 * u, c);
            load_f<T, 4>(sin + (size_t)tt * half + 4 * u, s);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float x1 = a[2 * k], x2 = a[2 * k + 1], sk = sign * s[k];
                v[2 * k] = scale * (x1 * c[k] - x2 * sk);
                v[2 * k + 1] = scale * (x1 * sk + x2 * c[k]);
            }
            store_f<T, 8>(yr + 8 * u, v);
        } else {
            load_f<T, 8>(xr + 8 * u, a);
            load_f<T, 8>(xr + half + 8 * u, v);
            load_f<T, 8>(cos + (size_t)tt * half + 8 * u, c);
            load_f<T, 8>(sin + (size_t)tt * half + 8 * u, s);
            float o1[8], o2[8];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float sk = sign * s[k];
                o1[k] = scale * (a[k] * c[k] - v[k] * sk);
                o2[k] = scale * (a[k] * sk + v[k] * c[k]);
            }
            store_f<T, 8>(yr + 8 * u, o1);
            store_f<T, 8>(yr + half + 8 * u, o2);
        }
    }
}

#define ROPE_STRIDED(T, NAME)                                                                                      \
    extern "C" __global__ void rope_strided_##NAME(const T* x, long long xb, long long xh, long long xt,          \
                                                  const T* cos, const T* sin, T* y, long long yb, long long yh,    \
                                                  long long yt, int b, int h, int t, int d, int rot,              \
                                                  int interleaved, float scale, float sign) {                     \
        rope_strided<T>(x, xb, xh, xt, cos, sin, y, yb, yh, yt, b, h, t, d, rot, interleaved, scale, sign);       \
    }
#define ROPE_STRIDED_VEC(T, NAME)                                                                                  \
    extern "C" __global__ void rope_strided_vec_##NAME(const T* x, long long xb, long long xh, long long xt,      \
                                                      const T* cos, const T* sin, T* y, long long yb,              \
                                                      long long yh, long long yt, int b, int h, int t, int d,      \
                                                      int rot, int interleaved, float scale, float sign) {         \
        rope_strided_vec<T>(x, xb, xh, xt, cos, sin, y, yb, yh, yt, b, h, t, d, rot, interleaved, scale, sign);   \
    }
ROPE_STRIDED(float, f32)
ROPE_STRIDED(bf16, bf16)
ROPE_STRIDED(__half, f16)
ROPE_STRIDED_VEC(bf16, bf16)
ROPE_STRIDED_VEC(__half, f16)

// Columns a thread owns in the column-wise passes: its C × R products stay at 32 registers (64 at R = 64), so
// that many warps fit an SM: these passes are bound by how many loads are in flight.
#define LORA_COLS(R) ((R) >= 32 ? 1 : ((R) >= 16 ? 2 : ((R) >= 8 ? 4 : 8)))
// Rows a lane owns in lora_rows: M's values, read warp-uniformly, serve that many rows.
#define LORA_ROWS_PER_LANE(R) ((R) >= 16 ? 1 : ((R) >= 8 ? 2 : 4))
#define LORA_WARPS 4

// Zero the dropped ones of the n values of flat indices index, index + 1, ...: one hash per 4 elements.
__device__ __forceinline__ void lora_drop(float* v, int n, long long index, unsigned long long seed,
                                          unsigned threshold) {
    if (threshold == 0) return;
    unsigned long long h = dropout_bits(seed, (unsigned long long)index >> 2);
#pragma unroll
    for (int j = 0; j < n; j++) {
        unsigned long long i = (unsigned long long)(index + j);
        if (j > 0 && (i & 3) == 0) h = dropout_bits(seed, i >> 2);
        if (((h >> (16 * (i & 3))) & 0xFFFF) < threshold) v[j] = 0.f;
    }
}

// acc[0..4] += x · (w.x, w.y, w.z, w.w): the rank-R outer-product step of lora_rows (B layout) and lora_cols.
__device__ __forceinline__ void fma4(float* acc, float x, float4 w) {
    acc[0] = fmaf(x, w.x, acc[0]);
    acc[1] = fmaf(x, w.y, acc[1]);
    acc[2] = fmaf(x, w.z, acc[2]);
    acc[3] = fmaf(x, w.w, acc[3]);
}

// Rows t0 .. t0 + n of p (the sum of `splits` runs of [rows, R]) into shared memory, by the whole block; rows
// past `rows` are zero.
template <int R>
__device__ __forceinline__ void lora_stage_rows(const float* p, int splits, int rows, int t0, int n, float* dst) {
    for (int e = threadIdx.x; e < n * R; e += blockDim.x) {
        int t = t0 + e / R;
        float s = 0.f;
        if (t < rows)
            for (int q = 0; q < splits; q++) s += p[((size_t)q * rows + t) * R + e % R];
        dst[e] = s;
    }
    __syncthreads();
}

// part[s][t][k] = scale · Σ over split s of the columns of keep(t, i) · x[t, i] · M(k, i), with M(k, i) =
// m[k · cols + i] (MT false: A) or m[i · R + k] (MT true: B, so that the contraction is g · B). A block:
// 32 · RL rows × one split. The split's columns pass through shared memory 128 bytes of each row at a time
// (two stages of coalesced asynchronous copies: read lane-per-row from global memory, the rows' 16-byte
// pieces were 32 separate lines a load, 0.5–0.9 TB/s), then each lane takes its RL rows (32 apart), the warps
// the stage's 8-column chunks in turn, M's values read warp-uniformly; the warps' sums added in shared memory.
template <typename T, int R, bool MT>
__device__ void lora_rows(const T* x, const float* m, float* part, int rows, int cols, int split, float scale,
                          unsigned long long seed, unsigned threshold) {
    constexpr int RL = LORA_ROWS_PER_LANE(R);
    constexpr int RB = 32 * RL;
    constexpr int E16 = 16 / (int)sizeof(T);  // values a 16-byte piece
    constexpr int SW = 128 / (int)sizeof(T);  // values of a row a stage
    constexpr int PITCH = SW + E16;           // padded, so the lanes' 16-byte reads fall in distinct banks
    constexpr int CHUNKS = SW / 8;
    __shared__ __align__(16) T tile[2][RB * PITCH];
    __shared__ float red[LORA_WARPS][RB][R + 1];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int c0 = blockIdx.y * split, c1 = min(cols, c0 + split);
    int row0 = blockIdx.x * RB;
    int stages = (c1 - c0 + SW - 1) / SW;
    auto stage = [&](int s) {
        int cs = c0 + s * SW;
        T* dst = tile[s & 1];
        for (int e = threadIdx.x; e < RB * 8; e += blockDim.x) {
            int r = e >> 3, q = e & 7;
            int row = row0 + r, col = cs + q * E16;
            bool valid = row < rows && col < c1;
            cp_async16(dst + r * PITCH + q * E16, valid ? x + (size_t)row * cols + col : x, valid);
        }
        cp_async_commit();
    };
    float acc[RL][R];
#pragma unroll
    for (int l = 0; l < RL; l++)
#pragma unroll
        for (int k = 0; k < R; k++) acc[l][k] = 0.f;
    stage(0);
#pragma unroll 1
    for (int s = 0; s < stages; s++) {
        if (s + 1 < stages) {
            stage(s + 1);
            cp_async_wait_1();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const T* buf = tile[s & 1];
#pragma unroll 1
        for (int ch = warp; ch < CHUNKS; ch += LORA_WARPS) {
            int c = c0 + s * SW + ch * 8;
            if (c >= c1) break;
            float xv[RL][8];
#pragma unroll
            for (int l = 0; l < RL; l++) {
                int r = lane + 32 * l;
                load_f<T, 8>(buf + r * PITCH + ch * 8, xv[l]);
                lora_drop(xv[l], 8, (long long)(row0 + r) * cols + c, seed, threshold);
            }
            if (MT) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const float4* mp = reinterpret_cast<const float4*>(m + (size_t)(c + j) * R);
#pragma unroll
                    for (int q = 0; q < R / 4; q++) {
                        float4 w = mp[q];
#pragma unroll
                        for (int l = 0; l < RL; l++) fma4(&acc[l][4 * q], xv[l][j], w);
                    }
                }
            } else {
#pragma unroll
                for (int k = 0; k < R; k++) {
                    const float4* mp = reinterpret_cast<const float4*>(m + (size_t)k * cols + c);
                    float4 w0 = mp[0], w1 = mp[1];
#pragma unroll
                    for (int l = 0; l < RL; l++) {
                        float v = acc[l][k];
                        v = fmaf(xv[l][0], w0.x, v); v = fmaf(xv[l][1], w0.y, v); v = fmaf(xv[l][2], w0.z, v);
                        v = fmaf(xv[l][3], w0.w, v); v = fmaf(xv[l][4], w1.x, v); v = fmaf(xv[l][5], w1.y, v);
                        v = fmaf(xv[l][6], w1.z, v); v = fmaf(xv[l][7], w1.w, v);
                        acc[l][k] = v;
                    }
                }
            }
        }
        __syncthreads();  // the buffer is refilled two stages on
    }
#pragma unroll
    for (int l = 0; l < RL; l++)
#pragma unroll
        for (int k = 0; k < R; k++) red[warp][lane + 32 * l][k] = acc[l][k];
    __syncthreads();
    for (int o = threadIdx.x; o < RB * R; o += blockDim.x) {
        int l = o / R, k = o % R, r = row0 + l;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < LORA_WARPS; w++) s += red[w][l][k];
        if (r < rows) part[((size_t)blockIdx.y * rows + r) * R + k] = s * scale;
    }
}

// Rows of x whose loads lora_cols and lora_expand issue before using them (a wave of these short kernels is
// bound by each warp's chain of load latencies).
#define LORA_AHEAD 8

// out = scale · Σ_t keep(t, i) · x[t, i] · u[t, k] as [cols][R] (or [R][cols] with `transpose`), u the sum of
// `splits` runs of [rows, R] (the split's rows of it staged in shared memory first): a lane owns C columns,
// the warps take the split's rows in turn; their sums added in shared memory. With several row splits
// (gridDim.y) each block writes its sums to `part` and the last block of a column range to finish (counted
// in `done`, which it resets) adds them in split order, so no second kernel and no atomics on the values.
template <typename T, int R>
__device__ void lora_cols(const T* x, const float* u, int splits, float* part, float* out, unsigned* done, int rows,
                          int cols, int split, int transpose, float scale, unsigned long long seed,
                          unsigned threshold) {
    constexpr int C = LORA_COLS(R);
    constexpr int CR = C * R;
    extern __shared__ float4 lora_smem[];
    float* us = reinterpret_cast<float*>(lora_smem);  // [split][R]
    float* red = us + (size_t)split * R;              // [LORA_WARPS · 32][CR + 1]
    __shared__ bool last;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int col = (blockIdx.x * 32 + lane) * C;
    int r0 = blockIdx.y * split, r1 = min(rows, r0 + split);
    lora_stage_rows<R>(u, splits, rows, r0, split, us);
    float acc[C][R];
#pragma unroll
    for (int j = 0; j < C; j++)
#pragma unroll
        for (int k = 0; k < R; k++) acc[j][k] = 0.f;
    if (col < cols) {
#pragma unroll 1
        for (int t0 = r0 + warp; t0 < r1; t0 += LORA_WARPS * LORA_AHEAD) {
            float xv[LORA_AHEAD][C];
#pragma unroll
            for (int q = 0; q < LORA_AHEAD; q++) {
                int t = t0 + LORA_WARPS * q;
                if (t < r1) {
                    load_f<T, C>(x + (size_t)t * cols + col, xv[q]);
                } else {
#pragma unroll
                    for (int j = 0; j < C; j++) xv[q][j] = 0.f;
                }
            }
#pragma unroll
            for (int q = 0; q < LORA_AHEAD; q++) {
                int t = t0 + LORA_WARPS * q;
                if (t >= r1) break;
                lora_drop(xv[q], C, (long long)t * cols + col, seed, threshold);
                const float4* up = reinterpret_cast<const float4*>(us + (size_t)(t - r0) * R);
#pragma unroll
                for (int g = 0; g < R / 4; g++) {
                    float4 w = up[g];
#pragma unroll
                    for (int j = 0; j < C; j++) fma4(&acc[j][4 * g], xv[q][j], w);
                }
            }
        }
    }
    float* mine = red + (warp * 32 + lane) * (CR + 1);
#pragma unroll
    for (int j = 0; j < C; j++)
#pragma unroll
        for (int k = 0; k < R; k++) mine[j * R + k] = acc[j][k];
    __syncthreads();
    // The block's 32 · C columns are consecutive, so its outputs are one contiguous run.
    size_t first = (size_t)blockIdx.x * 32 * CR;
    size_t n = (size_t)cols * R;
    auto put = [&](size_t e, float s) {
        size_t i = e / R, k = e % R;
        out[transpose ? k * cols + i : e] = s * scale;
    };
    for (int o = threadIdx.x; o < 32 * CR; o += blockDim.x) {
        int l = o / CR, e = o % CR;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < LORA_WARPS; w++) s += red[(w * 32 + l) * (CR + 1) + e];
        if (first + o >= n) continue;
        if (gridDim.y == 1) put(first + o, s);
        else part[(size_t)blockIdx.y * n + first + o] = s;
    }
    if (gridDim.y == 1) return;
    __threadfence();  // this block's sums are visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&done[blockIdx.x], 1u) == gridDim.y - 1;
        if (last) done[blockIdx.x] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Each thread's PER outputs (blockDim.x = 32 · LORA_WARPS) summed over the splits in order, a few splits'
    // loads in flight at once: a loop of one dependent load per split was a tail of ~20 µs at 33 splits.
    constexpr int PER = 32 * CR / (32 * LORA_WARPS);
    float sum[PER];
#pragma unroll
    for (int k = 0; k < PER; k++) sum[k] = 0.f;
#pragma unroll 8
    for (unsigned q = 0; q < gridDim.y; q++) {
#pragma unroll
        for (int k = 0; k < PER; k++) {
            size_t o = threadIdx.x + (size_t)k * 32 * LORA_WARPS;
            if (first + o < n) sum[k] += __ldcg(part + (size_t)q * n + first + o);
        }
    }
#pragma unroll
    for (int k = 0; k < PER; k++) {
        size_t o = threadIdx.x + (size_t)k * 32 * LORA_WARPS;
        if (first + o < n) put(first + o, sum[k]);
    }
}

// y[t, i] = base[t, i] + keep(t, i) · Σ_k p[t, k] · M(k, i) (M as in lora_rows; p the sum of `splits` runs of
// [rows, R], the block's `block_rows` rows of it staged in shared memory first): a thread holds M for its C
// columns and walks the block's rows, LORA_AHEAD rows' loads at a time. With p_sum, the first block column
// also writes p's rows there.
template <typename T, int R, bool MT>
__device__ void lora_expand(const T* base, const float* p, int splits, const float* m, T* y, float* p_sum,
                            int rows, int cols, int block_rows, unsigned long long seed, unsigned threshold) {
    constexpr int C = LORA_COLS(R);
    extern __shared__ float4 lora_smem[];
    float* ps = reinterpret_cast<float*>(lora_smem);  // [block_rows][R]
    int r0 = blockIdx.y * block_rows, r1 = min(rows, r0 + block_rows);
    lora_stage_rows<R>(p, splits, rows, r0, block_rows, ps);
    if (p_sum != nullptr && blockIdx.x == 0)
        for (int e = threadIdx.x; e < (r1 - r0) * R; e += blockDim.x) p_sum[(size_t)r0 * R + e] = ps[e];
    int col = (blockIdx.x * blockDim.x + threadIdx.x) * C;
    if (col >= cols) return;
    float w[C][R];
#pragma unroll
    for (int j = 0; j < C; j++)
#pragma unroll
        for (int k = 0; k < R; k++) w[j][k] = MT ? m[(size_t)(col + j) * R + k] : m[(size_t)k * cols + col + j];
#pragma unroll 1
    for (int t0 = r0; t0 < r1; t0 += LORA_AHEAD) {
        float b[LORA_AHEAD][C];
#pragma unroll
        for (int q = 0; q < LORA_AHEAD; q++)
            if (t0 + q < r1) load_f<T, C>(base + (size_t)(t0 + q) * cols + col, b[q]);
#pragma unroll
        for (int q = 0; q < LORA_AHEAD; q++) {
            int t = t0 + q;
            if (t >= r1) break;
            float d[C];
            const float4* pp = reinterpret_cast<const float4*>(ps + (t - r0) * R);
#pragma unroll
            for (int j = 0; j < C; j++) d[j] = 0.f;
#pragma unroll
            for (int g = 0; g < R / 4; g++) {
                float4 v = pp[g];
#pragma unroll
                for (int j = 0; j < C; j++) {
                    d[j] = fmaf(v.x, w[j][4 * g], d[j]);
                    d[j] = fmaf(v.y, w[j][4 * g + 1], d[j]);
                    d[j] = fmaf(v.z, w[j][4 * g + 2], d[j]);
                    d[j] = fmaf(v.w, w[j][4 * g + 3], d[j]);
                }
            }
            lora_drop(d, C, (long long)t * cols + col, seed, threshold);
#pragma unroll
            for (int j = 0; j < C; j++) b[q][j] += d[j];
            store_f<T, C>(y + (size_t)t * cols + col, b[q]);
        }
    }
}

#define LORA_KERNELS(T, NAME, R)                                                                                   \
    extern "C" __global__ void lora_rows_a_##NAME##_##R(const T* x, const float* m, float* part, int rows, int cols, \
                                                       int split, float scale, unsigned long long seed,           \
                                                       unsigned threshold) {                                      \
        lora_rows<T, R, false>(x, m, part, rows, cols, split, scale, seed, threshold);                             \
    }                                                                                                              \
    extern "C" __global__ void lora_rows_b_##NAME##_##R(const T* x, const float* m, float* part, int rows, int cols, \
                                                       int split, float scale, unsigned long long seed,           \
                                                       unsigned threshold) {                                      \
        lora_rows<T, R, true>(x, m, part, rows, cols, split, scale, seed, threshold);                              \
    }                                                                                                              \
    extern "C" __global__ void lora_cols_##NAME##_##R(const T* x, const float* u, int splits, float* part,         \
                                                     float* out, unsigned* done, int rows, int cols, int split,    \
                                                     int transpose, float scale, unsigned long long seed,          \
                                                     unsigned threshold) {                                        \
        lora_cols<T, R>(x, u, splits, part, out, done, rows, cols, split, transpose, scale, seed, threshold);     \
    }                                                                                                              \
    extern "C" __global__ void lora_expand_a_##NAME##_##R(const T* base, const float* p, int splits, const float* m, \
                                                         T* y, float* p_sum, int rows, int cols, int block_rows,   \
                                                         unsigned long long seed, unsigned threshold) {            \
        lora_expand<T, R, false>(base, p, splits, m, y, p_sum, rows, cols, block_rows, seed, threshold);          \
    }                                                                                                              \
    extern "C" __global__ void lora_expand_b_##NAME##_##R(const T* base, const float* p, int splits, const float* m, \
                                                         T* y, float* p_sum, int rows, int cols, int block_rows,   \
                                                         unsigned long long seed, unsigned threshold) {            \
        lora_expand<T, R, true>(base, p, splits, m, y, p_sum, rows, cols, block_rows, seed, threshold);           \
    }

#define LORA_RANKS(T, NAME)                                                                                        \
    LORA_KERNELS(T, NAME, 4) LORA_KERNELS(T, NAME, 8) LORA_KERNELS(T, NAME, 16) LORA_KERNELS(T, NAME, 32)          \
    LORA_KERNELS(T, NAME, 64)

LORA_RANKS(float, f32)
LORA_RANKS(bf16, bf16)
LORA_RANKS(__half, f16)

// torch's AdamW over [theta | m | v] (3n f32, in place) from n f32 gradients scaled by gscale (clipping); the
// same f32 operations as the CPU's loop (finetune/optim.rs).
extern "C" __global__ void adamw_f32(float* state, const float* g, long long n, float beta1, float beta2, float eps,
                                     float decay, float step_size, float inv_sqrt_bc2, float gscale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * gscale;
        float m = beta1 * state[n + i] + (1.0f - beta1) * gi;
        float v = beta2 * state[2 * n + i] + (1.0f - beta2) * (gi * gi);
        state[n + i] = m;
        state[2 * n + i] = v;
        state[i] = state[i] * decay - step_size * (m / (sqrtf(v) * inv_sqrt_bc2 + eps));
    }
}

// Segments of f32 values copied (or, with add, added) from src to dst in one launch: table holds (src, dst,
// count) per segment as 64-bit triples, one blockIdx.y each; src 0 stands for zeros. The optimizer's flat
// vector and the adapter's many small tensors (ops/flat.rs).
extern "C" __global__ void copy_segments_f32(const unsigned long long* table, int add) {
    const unsigned long long* e = table + 3 * (size_t)blockIdx.y;
    const float* src = (const float*)e[0];
    float* dst = (float*)e[1];
    long long n = (long long)e[2];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = src ? src[i] : 0.0f;
        dst[i] = add ? dst[i] + v : v;
    }
}

// (value, index) argmax over the block, first index on ties; every thread gets the winner's index.
__device__ __forceinline__ int block_argmax(float best, int idx, float* rv, int* ri) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) {
            best = ov;
            idx = oi;
        }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        rv[warp] = best;
        ri[warp] = idx;
    }
    __syncthreads();
    for (int w = 0; w < (int)(blockDim.x >> 5); w++)
        if (rv[w] > best || (rv[w] == best && ri[w] < idx)) {
            best = rv[w];
            idx = ri[w];
        }
    __syncthreads();
    return idx == 0x7fffffff ? 0 : idx;
}

// Index of the largest value of row `xr` (first one on ties) for the whole block; `rv`, `ri` hold 32 entries.
__device__ __forceinline__ int row_argmax(const float* xr, int n, float* rv, int* ri) {
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = xr[j];
        if (v > best) {  // strided, so a later j never beats an equal earlier value of this thread
            best = v;
            idx = j;
        }
    }
    return block_argmax(best, idx, rv, ri);
}

// Index of the largest value of each row of `[rows, n]` f32 (first one on ties), one block per row.
extern "C" __global__ void argmax_f32(const float* x, unsigned* out, int n) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    int w = row_argmax(x + (size_t)blockIdx.x * n, n, bv, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = (unsigned)w;
}

// ---- batched decode: one new token for each of B rows (captured into a CUDA graph per batch) ----
// Per layer: [RMSNorm rows] -> cuBLAS GEMMs Q, K, V (bf16 out) -> [rope + KV write + attention over each row's
// span] -> cuBLAS O GEMM accumulated into the f32 residual -> [RMSNorm rows] -> gate, up GEMMs -> [SwiGLU rows]
// -> down GEMM accumulated into the residual. The write column and every row's first column come from device
// memory (`lens` = [len, start_0, .., start_{B-1}]), so one captured graph serves every step of a batch.

// RMSNorm of each row of the f32 residual `[B, n]` into bf16 (grid B, 256 threads, n % 4 == 0): each thread
// keeps its float4s in registers between the sum and the scaling (one read of the row).
#define RMS_ROW_VECS 8
__device__ __forceinline__ void rms_row(const float* x, const bf16* w, float eps, bf16* out, int n) {
    __shared__ float red[32];
    const float4* xr = reinterpret_cast<const float4*>(x);
    int n4 = n / 4;
    float4 v[RMS_ROW_VECS];
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < RMS_ROW_VECS; u++) {
        int i = threadIdx.x + u * blockDim.x;
        v[u] = i < n4 ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        s = fmaf(v[u].x, v[u].x, fmaf(v[u].y, v[u].y, fmaf(v[u].z, v[u].z, fmaf(v[u].w, v[u].w, s))));
    }
    for (int i = threadIdx.x + RMS_ROW_VECS * blockDim.x; i < n4; i += blockDim.x) {
        float4 t = xr[i];
        s = fmaf(t.x, t.x, fmaf(t.y, t.y, fmaf(t.z, t.z, fmaf(t.w, t.w, s))));
    }
    float inv = rsqrtf(block_sum(s, red) / n + eps);
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out);
    const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(w);
    auto put = [&](int i, float4 t) {
        float2 a = __bfloat1622float2(w2[2 * i]), b = __bfloat1622float2(w2[2 * i + 1]);
        o[2 * i] = __floats2bfloat162_rn(t.x * inv * a.x, t.y * inv * a.y);
        o[2 * i + 1] = __floats2bfloat162_rn(t.z * inv * b.x, t.w * inv * b.y);
    };
#pragma unroll
    for (int u = 0; u < RMS_ROW_VECS; u++) {
        int i = threadIdx.x + u * blockDim.x;
        if (i < n4) put(i, v[u]);
    }
    for (int i = threadIdx.x + RMS_ROW_VECS * blockDim.x; i < n4; i += blockDim.x) put(i, xr[i]);
}

extern "C" __global__ void rms_rows(const float* x, const bf16* w, float eps, bf16* out, int n) {
    rms_row(x + (size_t)blockIdx.x * n, w, eps, out + (size_t)blockIdx.x * n, n);
}

// ---- a pass of t new tokens per row (prefill, scoring), uncaptured: the batched step's kernels plus this ----
// Rotate each token's query heads (scaled by q_scale) into q `[rows, nh, t, D]` (the span attention's layout) and
// its key heads into the cache at column prev + i, its value heads beside them (`kc` / `vc` `[rows, nkv, cap, D]`).
// Token i of row b sits at position prefix + (prev + i - start_b) (left padding, before the start, at 0: it is
// never attended to). Grid (t, rows); `qkv` holds each token's q | k | v heads side by side. A captured pass reads
// `prev` from `prev_at` (null: the argument).
extern "C" __global__ void rope_qkv_rows(const bf16* qkv, const unsigned* starts, const float* inv_freq, bf16* q,
                                         bf16* kc, bf16* vc, int t, int prev, int cap, int prefix, int nh, int nkv,
                                         int d, float q_scale, int interleaved, const int* prev_at) {
    __shared__ float cs[128], sn[128];
    if (prev_at) prev = *prev_at;
    int i = blockIdx.x, b = blockIdx.y, half = d / 2, col = prev + i;
    int pos = prefix + max(col - (int)starts[b], 0);
    for (int j = threadIdx.x; j < half; j += blockDim.x) sincosf((float)pos * inv_freq[j], &sn[j], &cs[j]);
    __syncthreads();
    const bf16* row = qkv + ((size_t)b * t + i) * (size_t)(nh + 2 * nkv) * d;
    for (int idx = threadIdx.x; idx < (nh + nkv) * half; idx += blockDim.x) {
        int hh = idx / half, j = idx - hh * half;
        int i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + half;
        float x0 = __bfloat162float(row[hh * d + i0]), x1 = __bfloat162float(row[hh * d + i1]);
        float r0 = x0 * cs[j] - x1 * sn[j], r1 = x1 * cs[j] + x0 * sn[j];
        bf16* dst;
        if (hh < nh) {
            dst = q + (((size_t)b * nh + hh) * t + i) * d;
            r0 *= q_scale;
            r1 *= q_scale;
        } else {
            dst = kc + (((size_t)b * nkv + hh - nh) * cap + col) * d;
        }
        dst[i0] = __float2bfloat16(r0);
        dst[i1] = __float2bfloat16(r1);
    }
    const bf16* v = row + (size_t)(nh + nkv) * d;
    for (int idx = threadIdx.x; idx < nkv * d; idx += blockDim.x) {
        int g = idx / d, e = idx - g * d;
        vc[(((size_t)b * nkv + g) * cap + col) * d + e] = v[idx];
    }
}

// act[r, j] = silu(gate[r, j]) * up[r, j] with gate and up side by side in `gu` `[B, 2 * inter]`.
extern "C" __global__ void swiglu_rows(const bf16* gu, bf16* act, int inter, int total) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int r = i / inter, j = i - r * inter;
    float g = __bfloat162float(gu[(size_t)r * 2 * inter + j]);
    float u = __bfloat162float(gu[(size_t)r * 2 * inter + inter + j]);
    act[i] = __float2bfloat16(g / (1.f + expf(-g)) * u);
}

// The same, eight columns per thread (inter % 8 == 0): 16-byte loads and stores.
extern "C" __global__ void swiglu_rows8(const bf16* gu, bf16* act, int inter, int total8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total8) return;
    int per = inter / 8, r = i / per, j = (i - r * per) * 8;
    const bf16* row = gu + (size_t)r * 2 * inter + j;
    uint4 g4 = *reinterpret_cast<const uint4*>(row), u4 = *reinterpret_cast<const uint4*>(row + inter), o4;
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g4);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u4);
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o4);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 g = __bfloat1622float2(g2[k]), u = __bfloat1622float2(u2[k]);
        o2[k] = __floats2bfloat162_rn(g.x / (1.f + expf(-g.x)) * u.x, g.y / (1.f + expf(-g.y)) * u.y);
    }
    *reinterpret_cast<uint4*>(act + (size_t)i * 8) = o4;
}

// The last `tail` of every `t` rows of `src` (rows of `words` 4-byte words) packed into `dst` (grid rows * tail).
extern "C" __global__ void gather_tail_rows(const unsigned* src, unsigned* dst, int words, int t, int tail) {
    int r = blockIdx.x;
    size_t from = (size_t)(r / tail) * t + t - tail + r % tail;
    for (int i = threadIdx.x; i < words; i += blockDim.x) dst[(size_t)r * words + i] = src[from * words + i];
}

// The part of a batched decode step that block (g, r) split z of both row-attention kernels share: row r's
// new column `len` and first column `start`, the columns [c_begin, c_end) this split attends to (whole tiles
// of `tile`; the split holding column `len` writes the new key and value there), and row r's q/k/v and its
// group's cache rows.
struct RowSplit {
    int len, start, pos, c_begin, c_end;
    bool writer;
    const bf16 *row, *k, *v;
    bf16 *krow, *vrow;
};

template <int D>
__device__ RowSplit row_split(int tile, const bf16* qkv, const int* lens, bf16* kc, bf16* vc, int cap, int nh,
                              int nkv) {
    int g = blockIdx.x, r = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    RowSplit t;
    t.len = lens[0];
    t.start = lens[1 + r];
    t.pos = t.len - t.start;
    int chunk = ((t.len + 1 - t.start + nsplit - 1) / nsplit + tile - 1) / tile * tile;
    t.c_begin = t.start + split * chunk;
    t.c_end = min(t.start + (split + 1) * chunk, t.len + 1);
    t.writer = t.c_begin <= t.len && t.len < t.c_end;
    t.row = qkv + (size_t)r * (nh + 2 * nkv) * D;
    t.k = t.row + nh * D + g * D;
    t.v = t.row + (nh + nkv) * D + g * D;
    t.krow = kc + ((size_t)r * nkv + g) * cap * D;
    t.vrow = vc + ((size_t)r * nkv + g) * cap * D;
    return t;
}

// Rotates the new key's pair (i0, i1) by (c, s) and writes it at column `len` of the cache row.
template <int D>
__device__ void write_rotated_key(const RowSplit& t, int i0, int i1, float c, float s) {
    float k0 = __bfloat162float(t.k[i0]), k1 = __bfloat162float(t.k[i1]);
    t.krow[(size_t)t.len * D + i0] = __float2bfloat16(k0 * c - k1 * s);
    t.krow[(size_t)t.len * D + i1] = __float2bfloat16(k1 * c + k0 * s);
}

// grid (kv_heads, B), max(4, D / 32, heads per group) warps; at most 8 heads per group. Block (g, r) owns
// row r's KV group g: it rotates the new key at the row's position (len - start) and writes it and the value
// at column `len`, then each of the group's query heads (one warp each) attends over columns start..len. The
// keys and values are read once per group, in tiles of 32 columns staged in shared memory (the next tile's
// loads in flight while this one is used): lane j scores column j, the warp's online softmax rescales once
// per tile, and each lane accumulates D/32 dimensions of the values.
#define ROW_TILE 32
#define ROW_MAX_GROUP 8
// Tile loads per thread (16 bytes each) for the keys and for the values.
#define ROW_LOADS 4

template <int D>
__device__ void attention_rows(const bf16* qkv, const int* lens, bf16* kc, bf16* vc, int cap, int nh, int nkv,
                               const float* inv_freq, float q_scale, int interleaved, bf16* out, float* part) {
    constexpr int E = D / 32;
    constexpr int KW = D / 2 + 1;  // words per key row in shared memory: padded, so lane j's row is its own bank
    constexpr int CHUNKS = ROW_TILE * D / 8;  // 16-byte pieces of a tile
    __shared__ uint32_t ks[ROW_TILE * KW];
    __shared__ __align__(16) bf16 vs[ROW_TILE * D];
    __shared__ __align__(16) float qs[ROW_MAX_GROUP][D];
    int g = blockIdx.x, r = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    int groups = nh / nkv;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nthreads = blockDim.x;
    const RowSplit t = row_split<D>(ROW_TILE, qkv, lens, kc, vc, cap, nh, nkv);
    const int len = t.len, start = t.start, pos = t.pos, c_begin = t.c_begin, c_end = t.c_end;
    const bool writer = t.writer;
    const bf16 *row = t.row, *v = t.v;
    bf16 *krow = t.krow, *vrow = t.vrow;
    bool head = warp < groups;
    int h = g * groups + warp;
    for (int i = lane; i < D / 2; i += 32) {
        float c, s;
        sincosf((float)pos * inv_freq[i], &s, &c);
        int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + D / 2;
        if (head) {
            const bf16* q = row + h * D;
            float q0 = __bfloat162float(q[i0]), q1 = __bfloat162float(q[i1]);
            qs[warp][i0] = (q0 * c - q1 * s) * q_scale;
            qs[warp][i1] = (q1 * c + q0 * s) * q_scale;
        }
        if (warp == 0 && writer) write_rotated_key<D>(t, i0, i1, c, s);
    }
    if (warp == 0 && writer)
        for (int i = lane; i < D; i += 32) vrow[(size_t)len * D + i] = v[i];
    __syncthreads();  // the new column is in the cache for every warp of the block
    uint4 kreg[ROW_LOADS], vreg[ROW_LOADS];
    auto load = [&](int c0) {
        int n = min(ROW_TILE, c_end - c0);
#pragma unroll
        for (int u = 0; u < ROW_LOADS; u++) {
            int idx = threadIdx.x + u * nthreads;
            int j = idx / (D / 8);
            bool ok = idx < CHUNKS && j < n;
            kreg[u] = ok ? *reinterpret_cast<const uint4*>(krow + (size_t)(c0 + j) * D + (idx % (D / 8)) * 8)
                         : make_uint4(0, 0, 0, 0);
            vreg[u] = ok ? *reinterpret_cast<const uint4*>(vrow + (size_t)(c0 + j) * D + (idx % (D / 8)) * 8)
                         : make_uint4(0, 0, 0, 0);
        }
    };
    auto stage = [&]() {
#pragma unroll
        for (int u = 0; u < ROW_LOADS; u++) {
            int idx = threadIdx.x + u * nthreads;
            if (idx >= CHUNKS) break;
            int j = idx / (D / 8), w = (idx % (D / 8)) * 4;
            uint32_t* kd = ks + j * KW + w;
            kd[0] = kreg[u].x;
            kd[1] = kreg[u].y;
            kd[2] = kreg[u].z;
            kd[3] = kreg[u].w;
            reinterpret_cast<uint4*>(vs)[idx] = vreg[u];
        }
    };
    float m = -INFINITY, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.f;
    if (c_begin < c_end) load(c_begin);
    for (int c0 = c_begin; c0 < c_end; c0 += ROW_TILE) {
        int n = min(ROW_TILE, c_end - c0);
        stage();
        __syncthreads();
        if (c0 + ROW_TILE < c_end) load(c0 + ROW_TILE);  // next tile in flight while this one is used
        if (head) {
            float s = -INFINITY;
            if (lane < n) {
                float a = 0.f;
                const uint32_t* kr = ks + lane * KW;
                const float2* q2 = reinterpret_cast<const float2*>(qs[warp]);
#pragma unroll 16
                for (int w = 0; w < D / 2; w++) {
                    float2 kf = bf2_to_f2(kr[w]), qf = q2[w];
                    a = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, a));
                }
                s = a;
            }
            float mt = s;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            float mx = fmaxf(m, mt);
            float scale = __expf(m - mx);
            float p = lane < n ? __expf(s - mx) : 0.f;
            l = l * scale + warp_sum(p);
#pragma unroll
            for (int e = 0; e < E; e++) acc[e] *= scale;
            for (int j = 0; j < n; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
                const bf16* vr = vs + j * D + lane * E;
#pragma unroll
                for (int e = 0; e < E; e += 2) {
                    float2 vf = bf2_to_f2(*reinterpret_cast<const uint32_t*>(vr + e));
                    acc[e] = fmaf(pj, vf.x, acc[e]);
                    acc[e + 1] = fmaf(pj, vf.y, acc[e + 1]);
                }
            }
            m = mx;
        }
        __syncthreads();  // every warp is done with the tile before the next is staged
    }
    if (!head) return;
    if (nsplit == 1) {
        bf16* o = out + ((size_t)r * nh + h) * D + lane * E;
#pragma unroll
        for (int e = 0; e < E; e++) o[e] = __float2bfloat16(acc[e] / l);
        return;
    }
    // A split's partial: its max, sum of exponentials and weighted values (an empty split has l = 0).
    float* pp = part + (((size_t)r * nh + h) * nsplit + split) * (D + 2);
    if (lane == 0) {
        pp[0] = m;
        pp[1] = l;
    }
#pragma unroll
    for (int e = 0; e < E; e++) pp[2 + lane * E + e] = acc[e];
}

// The splits of each (row, head) merged: grid (num_heads, B), D threads.
extern "C" __global__ void attention_rows_combine(const float* part, bf16* out, int nh, int nsplit, int d) {
    int h = blockIdx.x, r = blockIdx.y, i = threadIdx.x;
    const float* pp = part + ((size_t)r * nh + h) * nsplit * (d + 2);
    float M = -INFINITY;
    for (int s = 0; s < nsplit; s++)
        if (pp[s * (d + 2) + 1] > 0.f) M = fmaxf(M, pp[s * (d + 2)]);
    float L = 0.f, A = 0.f;
    for (int s = 0; s < nsplit; s++) {
        const float* q = pp + s * (d + 2);
        if (q[1] > 0.f) {
            float f = __expf(q[0] - M);
            L += q[1] * f;
            A += q[2 + i] * f;
        }
    }
    out[((size_t)r * nh + h) * d + i] = __float2bfloat16(A / L);
}

#define ROW_ATTENTION_KERNEL(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ROW_MAX_GROUP * 32)                                              \
        attention_rows_##D(const bf16* qkv, const int* lens, bf16* kc, bf16* vc, int cap, int nh, int nkv,       \
                           const float* inv_freq, float q_scale, int interleaved, bf16* out, float* part) {      \
        attention_rows<D>(qkv, lens, kc, vc, cap, nh, nkv, inv_freq, q_scale, interleaved, out, part);           \
    }

ROW_ATTENTION_KERNEL(64)
ROW_ATTENTION_KERNEL(128)
ROW_ATTENTION_KERNEL(256)

// The same attention on tensor cores: one warp per (row, KV group, split). The group's query heads (zero-padded
// to 16) are the A operand of m16n8k16 bf16 MMAs: S = Q·Kᵀ over a tile of 32 columns is 4 column blocks × D/16
// steps, the online softmax runs on S's fragments (a row's values sit in the 4 lanes of a quad), and the
// probabilities, packed to bf16 in place, are the A operand of O += P·V. Keys and values are staged per tile in
// the warp's shared memory (rows padded by 8 elements: conflict-free fragment loads). Head dims 64 and 128.
#define MMA_TILE 32

__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
    __nv_bfloat162 v;
    v.x = lo;
    v.y = hi;
    return *reinterpret_cast<uint32_t*>(&v);
}

// The A operand of 16 query rows (staged in `q`, rows padded to TW) for D / 16 MMA steps, and O zeroed.
template <int D, int TW>
__device__ __forceinline__ void mma_start(const bf16* q, int gid, int tig, uint32_t (*qa)[4], float (*o)[4]) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const bf16* q0 = q + gid * TW + kk * 16 + tig * 2;
        const bf16* q8 = q0 + 8 * TW;
        qa[kk][0] = *reinterpret_cast<const uint32_t*>(q0);
        qa[kk][1] = *reinterpret_cast<const uint32_t*>(q8);
        qa[kk][2] = *reinterpret_cast<const uint32_t*>(q0 + 8);
        qa[kk][3] = *reinterpret_cast<const uint32_t*>(q8 + 8);
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
}

// Stage `n` columns (the rest zero) of keys and values from `c0` into shared memory, threads `first` + k·`step`.
template <int D, int TW>
__device__ __forceinline__ void mma_stage(const bf16* kb, const bf16* vb, int c0, int n, bf16* ks, bf16* vs,
                                          int first, int step) {
    for (int idx = first; idx < MMA_TILE * D / 8; idx += step) {
        int j = idx / (D / 8), w = (idx % (D / 8)) * 8;
        uint4 k4 = make_uint4(0, 0, 0, 0), v4 = make_uint4(0, 0, 0, 0);
        if (j < n) {
            k4 = *reinterpret_cast<const uint4*>(kb + (size_t)(c0 + j) * D + w);
            v4 = *reinterpret_cast<const uint4*>(vb + (size_t)(c0 + j) * D + w);
        }
        *reinterpret_cast<uint4*>(ks + j * TW + w) = k4;
        *reinterpret_cast<uint4*>(vs + j * TW + w) = v4;
    }
}

// The same through asynchronous copies (cp_async16 above): the caller commits the group and waits for it
// before reading the tile.

template <int D, int TW, int ROWS = MMA_TILE>
__device__ __forceinline__ void mma_stage_async(const bf16* kb, const bf16* vb, int c0, int n, bf16* ks, bf16* vs,
                                                int first, int step) {
    for (int idx = first; idx < ROWS * D / 8; idx += step) {
        int j = idx / (D / 8), w = (idx % (D / 8)) * 8;
        bool valid = j < n;
        size_t src = valid ? (size_t)(c0 + j) * D + w : 0;
        cp_async16(ks + j * TW + w, kb + src, valid);
        cp_async16(vs + j * TW + w, vb + src, valid);
    }
}

// Four 8 × 8 bf16 matrices from shared memory in one instruction: lane l gives the address of row l % 8 of
// matrix l / 8 (16-byte aligned); lane t gets row t / 4, columns 2 · (t % 4) and the next of each matrix (with
// `trans`, of each matrix transposed) — the B operand layout of m16n8k16.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// S (16 query rows × one 32-column tile) = A operand `qa` (D / 16 steps) · the staged keys `ks` (rows padded to TW).
// The keys' fragments come four 8 × 8 matrices at a time (two k-steps of one 8-key block) through ldmatrix.
template <int D, int TW>
__device__ __forceinline__ void mma_scores(const uint32_t (*qa)[4], const bf16* ks, int gid, int tig, float (*sc)[4]) {
    int lane = (gid << 2) | tig;
    const bf16* base = ks + (lane & 7) * TW + (lane >> 3) * 8;
#pragma unroll
    for (int cb = 0; cb < 4; cb++) {
        sc[cb][0] = sc[cb][1] = sc[cb][2] = sc[cb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            uint32_t r[4];
            ldmatrix_x4(r, base + cb * 8 * TW + kk * 16);
            uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_16816(sc[cb], qa[kk], b0);
            mma_16816(sc[cb], qa[kk + 1], b1);
        }
    }
}

// One online-softmax step on a tile's scores (masked entries -inf) for rows gid (m0, l0) and gid + 8 (m1, l1),
// held by the 4 lanes of a quad: rescales `o`, leaves the tile's probabilities in `sc`. A row that sees nothing
// in the tile keeps its state.
template <int NB>
__device__ __forceinline__ void mma_softmax_step(float (*sc)[4], float& m0, float& m1, float& l0, float& l1,
                                                 float (*o)[4]) {
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int cb = 0; cb < 4; cb++) {
        mx0 = fmaxf(mx0, fmaxf(sc[cb][0], sc[cb][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[cb][2], sc[cb][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    float f0 = n0 == -INFINITY ? 1.f : __expf(m0 - n0), f1 = n1 == -INFINITY ? 1.f : __expf(m1 - n1);
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int cb = 0; cb < 4; cb++) {
        sc[cb][0] = sc[cb][0] == -INFINITY ? 0.f : __expf(sc[cb][0] - n0);
        sc[cb][1] = sc[cb][1] == -INFINITY ? 0.f : __expf(sc[cb][1] - n0);
        sc[cb][2] = sc[cb][2] == -INFINITY ? 0.f : __expf(sc[cb][2] - n1);
        sc[cb][3] = sc[cb][3] == -INFINITY ? 0.f : __expf(sc[cb][3] - n1);
        s0 += sc[cb][0] + sc[cb][1];
        s1 += sc[cb][2] + sc[cb][3];
    }
    s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
    s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
    l0 = l0 * f0 + s0;
    l1 = l1 * f1 + s1;
    m0 = n0;
    m1 = n1;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        o[nb][0] *= f0;
        o[nb][1] *= f0;
        o[nb][2] *= f1;
        o[nb][3] *= f1;
    }
}

// O += P · V: the probabilities in `sc`, packed to bf16, are the A operand; the staged values `vs` the B operand.
template <int D, int TW>
__device__ __forceinline__ void mma_values(const float (*sc)[4], const bf16* vs, int gid, int tig, float (*o)[4]) {
    // The values' fragments through ldmatrix.trans: matrices (keys 0-7, dims nb), (keys 8-15, nb), (0-7, nb + 1),
    // (8-15, nb + 1) of each 16-key step.
    int lane = (gid << 2) | tig;
    const bf16* base = vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * TW + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
        uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                          pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                          pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int nb = 0; nb < D / 8; nb += 2) {
            uint32_t r[4];
            ldmatrix_x4_trans(r, base + kk * 16 * TW + nb * 8);
            uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_16816(o[nb], pa, b0);
            mma_16816(o[nb + 1], pa, b1);
        }
    }
}

template <int D>
__device__ void attention_rows_mma(const bf16* qkv, const int* lens, bf16* kc, bf16* vc, int cap, int nh, int nkv,
                                   const float* inv_freq, float q_scale, int interleaved, bf16* out, float* part) {
    constexpr int KS = D / 16;  // MMA steps over the head dim for S
    constexpr int NB = D / 8;   // column blocks of O
    constexpr int TW = D + 8;   // padded shared-memory row
    __shared__ __align__(16) bf16 qs[16 * TW];
    __shared__ __align__(16) bf16 ks[MMA_TILE * TW];
    __shared__ __align__(16) bf16 vs[MMA_TILE * TW];
    int g = blockIdx.x, r = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    int lane = threadIdx.x, gid = lane >> 2, tig = lane & 3;
    int groups = nh / nkv;
    const RowSplit t = row_split<D>(MMA_TILE, qkv, lens, kc, vc, cap, nh, nkv);
    const int len = t.len, start = t.start, pos = t.pos, c_begin = t.c_begin, c_end = t.c_end;
    const bool writer = t.writer;
    const bf16 *row = t.row, *v = t.v;
    bf16 *krow = t.krow, *vrow = t.vrow;
    for (int i = lane; i < D / 2; i += 32) {
        float c, s;
        sincosf((float)pos * inv_freq[i], &s, &c);
        int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + D / 2;
        for (int hh = 0; hh < 16; hh++) {
            float r0 = 0.f, r1 = 0.f;
            if (hh < groups) {
                const bf16* q = row + (g * groups + hh) * D;
                float q0 = __bfloat162float(q[i0]), q1 = __bfloat162float(q[i1]);
                r0 = (q0 * c - q1 * s) * q_scale;
                r1 = (q1 * c + q0 * s) * q_scale;
            }
            qs[hh * TW + i0] = __float2bfloat16(r0);
            qs[hh * TW + i1] = __float2bfloat16(r1);
        }
        if (writer) write_rotated_key<D>(t, i0, i1, c, s);
    }
    if (writer)
        for (int i = lane; i < D; i += 32) vrow[(size_t)len * D + i] = v[i];
    __syncwarp();  // the queries in shared memory and the new column in the cache, for every lane
    uint32_t qa[KS][4];
    float o[NB][4];
    mma_start<D, TW>(qs, gid, tig, qa, o);
    // Rows gid and gid + 8 of the tile (query heads), held by the 4 lanes of a quad.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    for (int c0 = c_begin; c0 < c_end; c0 += MMA_TILE) {
        int n = min(MMA_TILE, c_end - c0);
        mma_stage<D, TW>(krow, vrow, c0, n, ks, vs, lane, 32);
        __syncwarp();
        float sc[4][4];
        mma_scores<D, TW>(qa, ks, gid, tig, sc);
#pragma unroll
        for (int cb = 0; cb < 4; cb++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                if (cb * 8 + tig * 2 + (e & 1) >= n) sc[cb][e] = -INFINITY;
            }
        }
        mma_softmax_step<NB>(sc, m0, m1, l0, l1, o);
        mma_values<D, TW>(sc, vs, gid, tig, o);
        __syncwarp();  // every lane is done with the tile before the next is staged
    }
    int h0 = g * groups + gid, h1 = h0 + 8;
    bool has0 = gid < groups, has1 = gid + 8 < groups;
    if (nsplit == 1) {
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            int d = nb * 8 + tig * 2;
            if (has0) *reinterpret_cast<uint32_t*>(out + ((size_t)r * nh + h0) * D + d) = pack_bf16(o[nb][0] / l0, o[nb][1] / l0);
            if (has1) *reinterpret_cast<uint32_t*>(out + ((size_t)r * nh + h1) * D + d) = pack_bf16(o[nb][2] / l1, o[nb][3] / l1);
        }
        return;
    }
    float* p0 = part + (((size_t)r * nh + h0) * nsplit + split) * (D + 2);
    float* p1 = part + (((size_t)r * nh + h1) * nsplit + split) * (D + 2);
    if (tig == 0) {
        if (has0) {
            p0[0] = m0;
            p0[1] = c_begin < c_end ? l0 : 0.f;
        }
        if (has1) {
            p1[0] = m1;
            p1[1] = c_begin < c_end ? l1 : 0.f;
        }
    }
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int d = nb * 8 + tig * 2;
        if (has0) {
            p0[2 + d] = o[nb][0];
            p0[3 + d] = o[nb][1];
        }
        if (has1) {
            p1[2 + d] = o[nb][2];
            p1[3 + d] = o[nb][3];
        }
    }
}

#define ROW_ATTENTION_MMA_KERNEL(D)                                                                                \
    extern "C" __global__ void __launch_bounds__(32)                                                               \
        attention_rows_mma_##D(const bf16* qkv, const int* lens, bf16* kc, bf16* vc, int cap, int nh, int nkv,    \
                               const float* inv_freq, float q_scale, int interleaved, bf16* out, float* part) {  \
        attention_rows_mma<D>(qkv, lens, kc, vc, cap, nh, nkv, inv_freq, q_scale, interleaved, out, part);       \
    }

ROW_ATTENTION_MMA_KERNEL(64)
ROW_ATTENTION_MMA_KERNEL(128)

// Attention of a pass of t new tokens per row on tensor cores, over an optional shared prefix and each row's own
// span: grid (ceil(t / Q), heads / hb, rows), W warps; a block takes hb query heads of one KV group (hb divides W)
// and Q = 16 · W / hb query positions, each warp 16 query positions of one head — the group's heads share every
// staged tile (hb = 1: one head, 64 positions with 4 warps). Query position i
// (column prev + i) sees every prefix column and its row's own columns start..prev + i. Key/value tiles of 64
// columns for head dim 64, 32 for 128 (prefix first, then own) are staged once per block, two stages deep through
// asynchronous copies (the next tile lands while this one is multiplied); the output is written as
// `[rows, t, heads * D]`, the layout the O projection reads (no transposes). A query that sees nothing (left
// padding, no prefix) gets 0.
#define SPAN_ATT_WARPS 8  // the most warps a block has

// 16 rows of `src` (row r at `src + r · stride`, rows past `n` zero) into `dst` (rows padded to TW), by one warp.
template <int D, int TW>
__device__ __forceinline__ void warp_stage_rows(const bf16* src, size_t stride, int n, bf16* dst, int lane) {
    for (int idx = lane; idx < 16 * D / 8; idx += 32) {
        int rr = idx / (D / 8), w8 = (idx % (D / 8)) * 8;
        uint4 v4 = rr < n ? *reinterpret_cast<const uint4*>(src + (size_t)rr * stride + w8) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(dst + rr * TW + w8) = v4;
    }
}

template <int D>
__device__ void span_attention_mma(const bf16* q, const bf16* kc, const bf16* vc, const bf16* kp, const bf16* vp,
                                   const unsigned* starts, bf16* out, int t, int prev, int cap, int prefix, int nh,
                                   int nkv, int hb, float* lse) {
    // Columns per stage: 64 for head dim 64 (two 32-column halves between barriers: half the barriers and waits of
    // 32-column stages), 32 for 128 (64 would not fit in 48 KB).
    constexpr int SUB = D == 64 ? 2 : 1;
    constexpr int KS = D / 16, NB = D / 8, TW = D + 8, COLS = SUB * MMA_TILE;
    // Two stages of key and value tiles of SUB · 32 columns (the next tile's copy is in flight while this one is
    // multiplied; each tile's columns are taken 32 at a time between its barriers); the queries pass through the
    // same memory first, on their way to registers.
    static_assert(4 * COLS >= SPAN_ATT_WARPS * 16, "the queries fit in the stages' memory");
    __shared__ __align__(16) bf16 smem[4 * COLS * TW];
    bf16* qs = smem;
    // Stage i's keys and values (computed, not a pointer array: that would sit in local memory).
    auto ks = [&](int i) { return smem + i * 2 * COLS * TW; };
    auto vs = [&](int i) { return smem + (i * 2 + 1) * COLS * TW; };
    int b = blockIdx.z, warps = blockDim.x >> 5;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int h = blockIdx.y * hb + warp % hb;
    int g = h / (nh / nkv);
    int queries = 16 * (warps / hb);
    int qbase = blockIdx.x * queries, qw = qbase + (warp / hb) * 16;
    int start = (int)starts[b];
    int own_end = prev + min(qbase + queries, t);
    const bf16* qh = q + ((size_t)b * nh + h) * t * D;
    bf16* myq = qs + warp * 16 * TW;
    warp_stage_rows<D, TW>(qh + (size_t)qw * D, D, t - qw, myq, lane);
    __syncwarp();
    uint32_t qa[KS][4];
    float o[NB][4];
    mma_start<D, TW>(myq, gid, tig, qa, o);
    __syncthreads();  // every warp holds its queries in registers: the stages may overwrite them
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    int lim0 = prev + qw + gid, lim1 = lim0 + 8;  // last own column rows gid and gid + 8 see
    int last = prev + min(qw + 15, t - 1);        // the warp's last query's column
    const bf16* kpre = kp + (size_t)g * prefix * D;
    const bf16* vpre = vp + (size_t)g * prefix * D;
    const bf16* krow = kc + ((size_t)b * nkv + g) * cap * D;
    const bf16* vrow = vc + ((size_t)b * nkv + g) * cap * D;
    int pre_tiles = (prefix + COLS - 1) / COLS;
    int own_tiles = own_end > start ? (own_end - start + COLS - 1) / COLS : 0;
    int tiles = pre_tiles + own_tiles;
    // Tile `tile`: its first column, width, and whether it is the prefix's.
    auto at = [&](int tile, int& c0, int& n) {
        bool pre = tile < pre_tiles;
        c0 = pre ? tile * COLS : start + (tile - pre_tiles) * COLS;
        n = pre ? min(COLS, prefix - c0) : min(COLS, own_end - c0);
        return pre;
    };
    auto stage = [&](int tile) {
        int c0, n;
        bool pre = at(tile, c0, n);
        mma_stage_async<D, TW, COLS>(pre ? kpre : krow, pre ? vpre : vrow, c0, n, ks(tile & 1), vs(tile & 1),
                                     threadIdx.x, blockDim.x);
    };
    if (tiles > 0) stage(0);
    cp_async_commit();
    for (int tile = 0; tile < tiles; tile++) {
        if (tile + 1 < tiles) stage(tile + 1);
        cp_async_commit();
        cp_async_wait_1();
        __syncthreads();  // this tile's copies, from every thread, have landed
        int c0, n;
        bool pre = at(tile, c0, n);
#pragma unroll
        for (int sub = 0; sub < SUB; sub++) {
            int cs = c0 + sub * MMA_TILE, ns = n - sub * MMA_TILE;
            if (ns > 0 && (pre || cs <= last)) {
                float sc[4][4];
                mma_scores<D, TW>(qa, ks(tile & 1) + sub * MMA_TILE * TW, gid, tig, sc);
#pragma unroll
                for (int cb = 0; cb < 4; cb++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int j = cb * 8 + tig * 2 + (e & 1);
                        bool ok = j < ns && (pre || cs + j <= (e < 2 ? lim0 : lim1));
                        if (!ok) sc[cb][e] = -INFINITY;
                    }
                }
                mma_softmax_step<NB>(sc, m0, m1, l0, l1, o);
                mma_values<D, TW>(sc, vs(tile & 1) + sub * MMA_TILE * TW, gid, tig, o);
            }
        }
        __syncthreads();  // every warp is done with this stage before the copy after next overwrites it
    }
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    int r0 = qw + gid, r1 = r0 + 8;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int d = h * D + nb * 8 + tig * 2;
        if (r0 < t) *reinterpret_cast<uint32_t*>(out + ((size_t)b * t + r0) * nh * D + d) = pack_bf16(o[nb][0] * i0, o[nb][1] * i0);
        if (r1 < t) *reinterpret_cast<uint32_t*>(out + ((size_t)b * t + r1) * nh * D + d) = pack_bf16(o[nb][2] * i1, o[nb][3] * i1);
    }
    // Training keeps each query row's log-sum-exp (`[b, heads, t]`): the backward pass rebuilds P from it.
    if (lse != nullptr && tig == 0) {
        if (r0 < t) lse[((size_t)b * nh + h) * t + r0] = l0 > 0.f ? m0 + logf(l0) : -INFINITY;
        if (r1 < t) lse[((size_t)b * nh + h) * t + r1] = l1 > 0.f ? m1 + logf(l1) : -INFINITY;
    }
}

// Two blocks of 8 warps per SM for head dim 64 (at most 128 registers a thread).
#define SPAN_BLOCKS(D) ((D) == 64 ? 2 : 1)
#define SPAN_ATTENTION_KERNEL(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(SPAN_ATT_WARPS * 32, SPAN_BLOCKS(D))                                \
        span_attention_mma_##D(const bf16* q, const bf16* kc, const bf16* vc, const bf16* kp, const bf16* vp,        \
                               const unsigned* starts, bf16* out, int t, int prev, int cap, int prefix, int nh,      \
                               int nkv, int hb, const int* prev_at) {                                                \
        span_attention_mma<D>(q, kc, vc, kp, vp, starts, out, t, prev_at ? *prev_at : prev, cap, prefix, nh, nkv,    \
                              hb, nullptr);                                                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SPAN_ATT_WARPS * 32, SPAN_BLOCKS(D))                                \
        span_attention_lse_mma_##D(const bf16* q, const bf16* kc, const bf16* vc, const unsigned* starts, bf16* out, \
                                   int t, int prev, int cap, int nh, int nkv, int hb, float* lse) {                  \
        span_attention_mma<D>(q, kc, vc, nullptr, nullptr, starts, out, t, prev, cap, 0, nh, nkv, hb, lse);          \
    }

SPAN_ATTENTION_KERNEL(64)
SPAN_ATTENTION_KERNEL(128)

// ---- y = x · Wᵀ for a few rows of x (≤ 16: a speculative verification, a small batch's step) on tensor cores ----
// cuBLAS's products of so few rows read the weights well below the card's bandwidth. Here a block takes 16 weight
// rows and its warps split the reduction in chunks of 64: lane (gid, tig) streams values tig·16 .. tig·16 + 15 of
// the chunk for weight rows gid and gid + 8 (four lanes read 128 contiguous bytes of a row) and the same values of
// input row gid (of each 8-row tile), and feeds them to m16n8k16 MMAs with the reduction index permuted alike on
// both operands (a dot product does not care about order): step s takes the lane's values 4s .. 4s + 3 as its
// k = 2tig, 2tig + 1, 2tig + 8, 2tig + 9. The warps' partial sums meet in shared memory.
#define SMALL_GEMM_WARPS 8
#define SMALL_GEMM_STORE_F32 0
#define SMALL_GEMM_ADD_F32 1
#define SMALL_GEMM_STORE_BF16 2

// NT: tiles of 8 input rows (1 or 2). w `[n, K]` (K a multiple of 64), x `[rows, K]` (row stride ldx, a multiple
// of 8), y `[rows, n]` (row stride ldy): f32 stored, f32 added to, or bf16 stored (`mode`).
template <int NT>
__device__ void small_gemm(const bf16* w, int n, int K, const bf16* x, int ldx, int rows, void* y, int ldy, int mode) {
    __shared__ float red[SMALL_GEMM_WARPS][NT][32][4];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int row0 = blockIdx.x * 16;
    // Weight rows past n read the last row (their sums are dropped); input rows past `rows` are zeros.
    const bf16* wl = w + (size_t)min(row0 + gid, n - 1) * K + tig * 16;
    const bf16* wh = w + (size_t)min(row0 + gid + 8, n - 1) * K + tig * 16;
    const bf16* xr[NT];
    bool has[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        has[j] = j * 8 + gid < rows;
        xr[j] = x + (size_t)(has[j] ? j * 8 + gid : 0) * ldx + tig * 16;
    }
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.f;
    struct Chunk {
        uint4 a[4];
        uint4 b[NT][2];
    };
    auto load = [&](int c, Chunk& ch) {
        size_t off = (size_t)c * 64;
        ch.a[0] = ld_stream(wl + off);
        ch.a[1] = ld_stream(wl + off + 8);
        ch.a[2] = ld_stream(wh + off);
        ch.a[3] = ld_stream(wh + off + 8);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const uint4 zero = make_uint4(0, 0, 0, 0);
            ch.b[j][0] = has[j] ? *reinterpret_cast<const uint4*>(xr[j] + off) : zero;
            ch.b[j][1] = has[j] ? *reinterpret_cast<const uint4*>(xr[j] + off + 8) : zero;
        }
    };
    auto use = [&](const Chunk& ch) {
        const uint32_t* lo = reinterpret_cast<const uint32_t*>(&ch.a[0]);  // 8 words: values 0..15, row gid
        const uint32_t* hi = reinterpret_cast<const uint32_t*>(&ch.a[2]);  // row gid + 8
#pragma unroll
        for (int s = 0; s < 4; s++) {
            uint32_t a[4] = {lo[2 * s], hi[2 * s], lo[2 * s + 1], hi[2 * s + 1]};
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const uint32_t* xw = reinterpret_cast<const uint32_t*>(&ch.b[j][0]);
                uint32_t b[2] = {xw[2 * s], xw[2 * s + 1]};
                mma_16816(acc[j], a, b);
            }
        }
    };
    int chunks = K / 64;
    Chunk cur, nxt;
    int c = warp;
    if (c < chunks) load(c, cur);
    for (; c < chunks; c += SMALL_GEMM_WARPS) {
        if (c + SMALL_GEMM_WARPS < chunks) load(c + SMALL_GEMM_WARPS, nxt);
        use(cur);
        cur = nxt;
    }
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp][j][lane][e] = acc[j][e];
    __syncthreads();
    // Output (r, t): weight row row0 + r, input row t; its fragment value sits in lane (r % 8) · 4 + (t % 8) / 2,
    // element (r / 8) · 2 + t % 2 of tile t / 8.
    for (int o = threadIdx.x; o < 16 * 8 * NT; o += blockDim.x) {
        int r = o & 15, t = o >> 4, j = t >> 3, tk = t & 7;
        int l = (r & 7) * 4 + (tk >> 1), e = (r >> 3) * 2 + (tk & 1);
        float sum = 0.f;
#pragma unroll
        for (int wi = 0; wi < SMALL_GEMM_WARPS; wi++) sum += red[wi][j][l][e];
        int row = row0 + r;
        if (row >= n || t >= rows) continue;
        size_t at = (size_t)t * ldy + row;
        if (mode == SMALL_GEMM_STORE_F32) reinterpret_cast<float*>(y)[at] = sum;
        else if (mode == SMALL_GEMM_ADD_F32) reinterpret_cast<float*>(y)[at] += sum;
        else reinterpret_cast<bf16*>(y)[at] = __float2bfloat16(sum);
    }
}

#define SMALL_GEMM_KERNEL(NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(SMALL_GEMM_WARPS * 32)                                           \
        small_gemm_bf16_##NT(const bf16* w, int n, int K, const bf16* x, int ldx, int rows, void* y, int ldy,     \
                             int mode) {                                                                          \
        small_gemm<NT>(w, n, K, x, ldx, rows, y, ldy, mode);                                                      \
    }
SMALL_GEMM_KERNEL(1)
SMALL_GEMM_KERNEL(2)

// ---- training attention's backward pass on tensor cores (FlashAttention-2's recipe, no score matrix) ----
// The forward is span_attention_lse_mma (causal: no prefix, every row starting at 0) on queries already scaled,
// keeping each row's log-sum-exp. Layouts: q and dq `[b, heads, t, D]`, k, v, dk, dv `[b, kv, total, D]` (the last
// t columns are the pass's own; query i sees columns 0..=prev + i, prev = total - t), o and g (the output and its
// gradient) `[b, t, heads · D]`, lse and delta `[b, heads, t]`. P = exp(S - lse) is rebuilt tile by tile; dS = P ∘
// (dP - delta) with dP = dO·Vᵀ; dQ = dS·K (one pass over key tiles per query tile), dK = dSᵀ·Q and dV = Pᵀ·dO (one
// pass over the group's query heads and query tiles per key tile): every output element has one writer, no atomics.

// delta = Σ_d dO·O per query row and head, one warp each (rows = b · t · heads).
extern "C" __global__ void attention_delta(const bf16* o, const bf16* g, float* delta, int rows, int nh, int t, int d) {
    int w = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (w >= rows) return;
    const bf16* op = o + (size_t)w * d;
    const bf16* gp = g + (size_t)w * d;
    float s = 0.f;
    for (int i = lane; i < d; i += 32) s += __bfloat162float(op[i]) * __bfloat162float(gp[i]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
        int h = w % nh, bi = w / nh;
        delta[((size_t)(bi / t) * nh + h) * t + bi % t] = s;
    }
}

#define TRAIN_ATT_WARPS 4


// dQ: grid (ceil(t / 64), heads, b), 4 warps of 16 query rows of one head.
template <int D>
__device__ void attention_dq_mma(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,
                                 const float* delta, bf16* dq, int t, int total, int nh, int nkv) {
    constexpr int KS = D / 16, NB = D / 8, TW = D + 8;
    static_assert(2 * MMA_TILE >= TRAIN_ATT_WARPS * 16, "each warp's rows fit in the tiles' memory");
    __shared__ __align__(16) bf16 smem[2 * MMA_TILE * TW];
    bf16* ks = smem;
    bf16* vs = smem + MMA_TILE * TW;
    int b = blockIdx.z, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int kvh = h / (nh / nkv), prev = total - t;
    int qbase = blockIdx.x * 16 * TRAIN_ATT_WARPS, qw = qbase + warp * 16;
    bf16* mine = smem + warp * 16 * TW;
    uint32_t qa[KS][4], ga[KS][4];
    float acc[NB][4];
    warp_stage_rows<D, TW>(q + (((size_t)b * nh + h) * t + qw) * D, D, t - qw, mine, lane);
    __syncwarp();
    mma_start<D, TW>(mine, gid, tig, qa, acc);
    __syncwarp();
    warp_stage_rows<D, TW>(g + (((size_t)b * t + qw) * nh + h) * D, (size_t)nh * D, t - qw, mine, lane);
    __syncwarp();
    mma_start<D, TW>(mine, gid, tig, ga, acc);
    __syncthreads();  // every warp holds its fragments: the memory becomes the key / value tiles
    int r0 = qw + gid, r1 = r0 + 8;
    const float* lse_h = lse + ((size_t)b * nh + h) * t;
    const float* delta_h = delta + ((size_t)b * nh + h) * t;
    float lse0 = r0 < t ? lse_h[r0] : 0.f, lse1 = r1 < t ? lse_h[r1] : 0.f;
    float del0 = r0 < t ? delta_h[r0] : 0.f, del1 = r1 < t ? delta_h[r1] : 0.f;
    int block_last = prev + min(qbase + 16 * TRAIN_ATT_WARPS, t) - 1;
    int warp_last = prev + min(qw + 15, t - 1);
    const bf16* kr = k + ((size_t)b * nkv + kvh) * total * D;
    const bf16* vr = v + ((size_t)b * nkv + kvh) * total * D;
    for (int c0 = 0; c0 <= block_last; c0 += MMA_TILE) {
        mma_stage<D, TW>(kr, vr, c0, min(MMA_TILE, total - c0), ks, vs, threadIdx.x, blockDim.x);
        __syncthreads();
        if (qw < t && c0 <= warp_last) {
            float s[4][4], dp[4][4];
            mma_scores<D, TW>(qa, ks, gid, tig, s);
            mma_scores<D, TW>(ga, vs, gid, tig, dp);
#pragma unroll
            for (int cb = 0; cb < 4; cb++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int j = c0 + cb * 8 + tig * 2 + (e & 1);
                    bool top = e < 2;
                    bool seen = j < total && j <= prev + (top ? r0 : r1);
                    float p = seen ? __expf(s[cb][e] - (top ? lse0 : lse1)) : 0.f;
                    s[cb][e] = p * (dp[cb][e] - (top ? del0 : del1));
                }
            }
            mma_values<D, TW>(s, ks, gid, tig, acc);
        }
        __syncthreads();  // every warp is done with the tiles before the next are staged
    }
    bf16* out = dq + ((size_t)b * nh + h) * t * D;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int d = nb * 8 + tig * 2;
        if (r0 < t) *reinterpret_cast<uint32_t*>(out + (size_t)r0 * D + d) = pack_bf16(acc[nb][0], acc[nb][1]);
        if (r1 < t) *reinterpret_cast<uint32_t*>(out + (size_t)r1 * D + d) = pack_bf16(acc[nb][2], acc[nb][3]);
    }
}

// dK and dV: grid (ceil(total / 64), heads, b), 4 warps of 16 key rows; a block takes one query head's share of
// its KV head's gradients, walking the query tiles that see its keys. Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ keep a key per
// fragment row, so the products dV += Pᵀ·dO and dK += dSᵀ·Q take the staged query / gradient tiles as their
// second operand. With one query head per KV head the block writes dk / dv; otherwise its f32 share goes to
// `part` (`[2, b, heads, total, D]`, dK's then dV's) and attention_sum_groups adds a group's shares (a block per
// head rather than per group: 8× the blocks for TinyLlama's groups of 8, whose grid was half the card).
template <int D>
__device__ void attention_dkdv_mma(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,
                                   const float* delta, bf16* dk, bf16* dv, float* part, int t, int total, int nh,
                                   int nkv) {
    constexpr int KS = D / 16, NB = D / 8, TW = D + 8;
    __shared__ __align__(16) bf16 smem[2 * MMA_TILE * TW];
    __shared__ float lse_s[MMA_TILE], delta_s[MMA_TILE];
    bf16* qs = smem;
    bf16* gs = smem + MMA_TILE * TW;
    int b = blockIdx.z, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int kvh = h / (nh / nkv), prev = total - t;
    int kbase = blockIdx.x * 16 * TRAIN_ATT_WARPS, kw = kbase + warp * 16;
    const size_t kv_off = ((size_t)b * nkv + kvh) * total * D;
    bf16* mine = smem + warp * 16 * TW;
    uint32_t ka[KS][4], va[KS][4];
    float dka[NB][4], dva[NB][4];
    warp_stage_rows<D, TW>(k + kv_off + (size_t)kw * D, D, total - kw, mine, lane);
    __syncwarp();
    mma_start<D, TW>(mine, gid, tig, ka, dka);
    __syncwarp();
    warp_stage_rows<D, TW>(v + kv_off + (size_t)kw * D, D, total - kw, mine, lane);
    __syncwarp();
    mma_start<D, TW>(mine, gid, tig, va, dva);
    __syncthreads();
    int k0 = kw + gid, k1 = k0 + 8;
    int q_first = max(0, kbase - prev) / MMA_TILE * MMA_TILE;  // the first query tile that sees a key of the block
    int warp_first = max(0, kw - prev);                         // the first query that sees a key of the warp
    {
        const bf16* qh = q + ((size_t)b * nh + h) * t * D;
        const float* lse_h = lse + ((size_t)b * nh + h) * t;
        const float* delta_h = delta + ((size_t)b * nh + h) * t;
        for (int q0 = q_first; q0 < t; q0 += MMA_TILE) {
            int n = min(MMA_TILE, t - q0);
            for (int idx = threadIdx.x; idx < MMA_TILE * D / 8; idx += blockDim.x) {
                int j = idx / (D / 8), w8 = (idx % (D / 8)) * 8;
                uint4 a = make_uint4(0, 0, 0, 0), c = make_uint4(0, 0, 0, 0);
                if (j < n) {
                    a = *reinterpret_cast<const uint4*>(qh + (size_t)(q0 + j) * D + w8);
                    c = *reinterpret_cast<const uint4*>(g + (((size_t)b * t + q0 + j) * nh + h) * D + w8);
                }
                *reinterpret_cast<uint4*>(qs + j * TW + w8) = a;
                *reinterpret_cast<uint4*>(gs + j * TW + w8) = c;
            }
            for (int j = threadIdx.x; j < MMA_TILE; j += blockDim.x) {
                lse_s[j] = j < n ? lse_h[q0 + j] : 0.f;
                delta_s[j] = j < n ? delta_h[q0 + j] : 0.f;
            }
            __syncthreads();
            if (kw < total && q0 + MMA_TILE > warp_first) {
                float s[4][4], dp[4][4];
                mma_scores<D, TW>(ka, qs, gid, tig, s);
                mma_scores<D, TW>(va, gs, gid, tig, dp);
#pragma unroll
                for (int cb = 0; cb < 4; cb++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int qc = cb * 8 + tig * 2 + (e & 1), i = q0 + qc, j = e < 2 ? k0 : k1;
                        bool seen = i < t && j < total && j <= prev + i;
                        float p = seen ? __expf(s[cb][e] - lse_s[qc]) : 0.f;
                        s[cb][e] = p;
                        dp[cb][e] = p * (dp[cb][e] - delta_s[qc]);
                    }
                }
                mma_values<D, TW>(s, gs, gid, tig, dva);
                mma_values<D, TW>(dp, qs, gid, tig, dka);
            }
            __syncthreads();  // every warp is done with the tiles before the next are staged
        }
    }
    if (part != nullptr) {
        float* pk = part + ((size_t)b * nh + h) * total * D;
        float* pv = pk + (size_t)gridDim.z * nh * total * D;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            int d = nb * 8 + tig * 2;
            if (k0 < total) {
                *reinterpret_cast<float2*>(pk + (size_t)k0 * D + d) = make_float2(dka[nb][0], dka[nb][1]);
                *reinterpret_cast<float2*>(pv + (size_t)k0 * D + d) = make_float2(dva[nb][0], dva[nb][1]);
            }
            if (k1 < total) {
                *reinterpret_cast<float2*>(pk + (size_t)k1 * D + d) = make_float2(dka[nb][2], dka[nb][3]);
                *reinterpret_cast<float2*>(pv + (size_t)k1 * D + d) = make_float2(dva[nb][2], dva[nb][3]);
            }
        }
        return;
    }
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
        int d = nb * 8 + tig * 2;
        if (k0 < total) {
            *reinterpret_cast<uint32_t*>(dk + kv_off + (size_t)k0 * D + d) = pack_bf16(dka[nb][0], dka[nb][1]);
            *reinterpret_cast<uint32_t*>(dv + kv_off + (size_t)k0 * D + d) = pack_bf16(dva[nb][0], dva[nb][1]);
        }
        if (k1 < total) {
            *reinterpret_cast<uint32_t*>(dk + kv_off + (size_t)k1 * D + d) = pack_bf16(dka[nb][2], dka[nb][3]);
            *reinterpret_cast<uint32_t*>(dv + kv_off + (size_t)k1 * D + d) = pack_bf16(dva[nb][2], dva[nb][3]);
        }
    }
}

#define TRAIN_ATTENTION_KERNELS(D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(TRAIN_ATT_WARPS * 32)                                              \
        attention_dq_mma_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,         \
                             const float* delta, bf16* dq, int t, int total, int nh, int nkv) {                    \
        attention_dq_mma<D>(q, k, v, g, lse, delta, dq, t, total, nh, nkv);                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(TRAIN_ATT_WARPS * 32)                                              \
        attention_dkdv_mma_##D(const bf16* q, const bf16* k, const bf16* v, const bf16* g, const float* lse,       \
                               const float* delta, bf16* dk, bf16* dv, float* part, int t, int total, int nh,      \
                               int nkv) {                                                                          \
        attention_dkdv_mma<D>(q, k, v, g, lse, delta, dk, dv, part, t, total, nh, nkv);                            \
    }

TRAIN_ATTENTION_KERNELS(64)
TRAIN_ATTENTION_KERNELS(128)

// dk / dv (`[b, kv, total, D]` bf16) = the sums of each group's per-head f32 shares in `part` (see above); n =
// b · kv · total · D, a grid-stride loop.
extern "C" __global__ void attention_sum_groups(const float* part, bf16* dk, bf16* dv, long long n, int groups,
                                                int per_head) {
    long long shares = n * groups;  // elements of dK's shares: dV's follow
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long kv_head = i / per_head, within = i % per_head;
        const float* pk = part + kv_head * groups * per_head + within;
        float sk = 0.f, sv = 0.f;
        for (int g = 0; g < groups; g++) {
            sk += pk[(size_t)g * per_head];
            sv += pk[shares + (size_t)g * per_head];
        }
        dk[i] = __float2bfloat16(sk);
        dv[i] = __float2bfloat16(sv);
    }
}

// ---- sampling on the device: one block per row of `[rows, n]` f32 logits ----
// Per row (u32 words): temperature (f32 bits), top-p (f32 bits), top-k (0: off), seed low, seed high, draw.
// Temperature <= 0 is argmax. Otherwise z = (x - max) / T; top-k keeps z >= the k-th largest and top-p the
// largest threshold whose kept mass reaches p (both found by bisection on the value, no sort); the token is
// the Gumbel-max draw over the kept set: argmax z + G with G = -log(-log(u)), u from a counter hash of
// (seed, draw, token) — an exact sample of the renormalised distribution, the same on every device.
#define SAMPLE_PARAMS 6
#define BISECT_STEPS 32

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) t = fmaxf(t, red[i]);
    __syncthreads();
    return t;
}

extern "C" __global__ void sample_rows(const float* x, const unsigned* params, unsigned* out, int n) {
    __shared__ float red[32];
    __shared__ int red_i[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    const unsigned* p = params + (size_t)blockIdx.x * SAMPLE_PARAMS;
    float temperature = __uint_as_float(p[0]), top_p = __uint_as_float(p[1]);
    int top_k = (int)p[2];
    unsigned long long seed = (unsigned long long)p[3] | ((unsigned long long)p[4] << 32);
    unsigned long long draw = p[5];
    int top = row_argmax(xr, n, red, red_i);
    if (!(temperature > 0.f)) {
        if (threadIdx.x == 0) out[blockIdx.x] = (unsigned)top;
        return;
    }
    float mx = xr[top];
    float inv_t = 1.f / temperature;
    // The kept set is z >= lo; lo starts below every z.
    float lo = -INFINITY;
    if (top_k > 0 && top_k < n) {
        float zmin = INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) zmin = fminf(zmin, (xr[j] - mx) * inv_t);
        float a = -block_max(-zmin, red), b = 0.f;  // count(z >= a) = n >= k; find the largest such a
        for (int it = 0; it < BISECT_STEPS; it++) {
            float mid = 0.5f * (a + b);
            float cnt = 0.f;
            for (int j = threadIdx.x; j < n; j += blockDim.x) cnt += ((xr[j] - mx) * inv_t >= mid) ? 1.f : 0.f;
            if (block_sum(cnt, red) >= (float)top_k) a = mid; else b = mid;
        }
        lo = a;
    }
    if (top_p > 0.f && top_p < 1.f) {
        float total = 0.f, zmin = INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float z = (xr[j] - mx) * inv_t;
            if (z >= lo) {
                total += __expf(z);
                zmin = fminf(zmin, z);
            }
        }
        total = block_sum(total, red);
        float a = -block_max(-zmin, red), b = 0.f;  // mass(z >= a) = total; find the largest a whose mass >= p
        for (int it = 0; it < BISECT_STEPS; it++) {
            float mid = 0.5f * (a + b);
            float mass = 0.f;
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                float z = (xr[j] - mx) * inv_t;
                if (z >= mid) mass += __expf(z);
            }
            if (block_sum(mass, red) >= top_p * total) a = mid; else b = mid;
        }
        lo = fmaxf(lo, a);
    }
    unsigned long long key = splitmix64(seed ^ splitmix64(draw));
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float z = (xr[j] - mx) * inv_t;
        if (z < lo) continue;
        unsigned long long hsh = splitmix64(key + (unsigned long long)j);
        float u = ((float)(hsh >> 40) + 0.5f) * (1.f / 16777216.f);
        float gz = z - __logf(-__logf(u));
        if (gz > best) {
            best = gz;
            idx = j;
        }
    }
    int w = block_argmax(best, idx, red, red_i);
    if (threadIdx.x == 0) out[blockIdx.x] = (unsigned)w;
}

// ---- the training loss over the head's logits, one block per row ----
// For bf16 logits `[rows, n]` and u32 targets: loss[r] = logsumexp(x_r) - x_r[target] (f32) and the logits'
// gradient d[r] = softmax(x_r) - onehot(target) in bf16 — what log_softmax, gather, exp and scatter_add made
// as six candle ops with an f32 copy of the logits. The row is read twice (the second time from L2). A target
// out of range leaves d = softmax and the loss NaN; with d null (evaluation) only the loss is written.
extern "C" __global__ void cross_entropy_rows_bf16(const bf16* x, const unsigned* targets, float* loss, bf16* d,
                                                   int n) {
    __shared__ float red[32];
    const bf16* row = x + (size_t)blockIdx.x * n;
    bf16* drow = d + (size_t)blockIdx.x * n;
    // Eight logits a load where every row starts on a 16-byte boundary: one 2-byte load per thread at a time
    // kept too few bytes in flight (0.5 TB/s on a 128k vocabulary).
    bool vec = n % 8 == 0 && ((size_t)x & 15) == 0 && ((size_t)d & 15) == 0;
    float m = -INFINITY, s = 0.f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            uint4 w = *reinterpret_cast<const uint4*>(row + j);
            const bf16* e = reinterpret_cast<const bf16*>(&w);
            float v[8], lm = -INFINITY;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                v[k] = __bfloat162float(e[k]);
                lm = fmaxf(lm, v[k]);
            }
            if (lm == -INFINITY) continue;  // -inf logits add nothing (and -inf - -inf would be NaN)
            if (lm > m) {
                s *= __expf(m - lm);
                m = lm;
            }
#pragma unroll
            for (int k = 0; k < 8; k++) s += __expf(v[k] - m);
        }
    }
    for (int j = vec ? n : threadIdx.x; j < n; j += blockDim.x) {
        float v = __bfloat162float(row[j]);
        if (v > m) {
            s = s * __expf(m - v) + 1.f;
            m = v;
        } else if (v != -INFINITY) {
            s += __expf(v - m);
        }
    }
    float bm = block_max(m, red);
    float total = block_sum(m == -INFINITY ? 0.f : s * __expf(m - bm), red);
    float lse = bm + logf(total);
    unsigned target = targets[blockIdx.x];
    if (d != nullptr && vec) {
        for (int j = threadIdx.x * 8; j < n; j += blockDim.x * 8) {
            uint4 w = *reinterpret_cast<const uint4*>(row + j), o;
            const bf16* e = reinterpret_cast<const bf16*>(&w);
            bf16* f = reinterpret_cast<bf16*>(&o);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float p = __expf(__bfloat162float(e[k]) - lse);
                f[k] = __float2bfloat16((unsigned)(j + k) == target ? p - 1.f : p);
            }
            *reinterpret_cast<uint4*>(drow + j) = o;
        }
    } else if (d != nullptr) {
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float p = __expf(__bfloat162float(row[j]) - lse);
            drow[j] = __float2bfloat16((unsigned)j == target ? p - 1.f : p);
        }
    }
    if (threadIdx.x == 0) loss[blockIdx.x] = target < (unsigned)n ? lse - __bfloat162float(row[target]) : NAN;
}

// out[rows[i], :] += g[i, :] for g [n, cols] (cols even), pairs of values at a time: the gradient of selecting
// rows. Atomic adds, so a repeated row sums its gradients; rows that are all distinct (the labelled positions
// of a training batch) each receive one add onto zero, which is exact.
__device__ __forceinline__ void add_pair(float* p, float a, float b) { atomicAdd(p, a); atomicAdd(p + 1, b); }
__device__ __forceinline__ void add_pair(bf16* p, float a, float b) {
    atomicAdd(reinterpret_cast<__nv_bfloat162*>(p), __floats2bfloat162_rn(a, b));
}
__device__ __forceinline__ void add_pair(__half* p, float a, float b) {
    atomicAdd(reinterpret_cast<__half2*>(p), __floats2half2_rn(a, b));
}
template <typename T>
__device__ void scatter_add_rows(const T* g, const unsigned* rows, T* out, long long n, int cols) {
    int pairs = cols / 2;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n * pairs;
         e += (long long)gridDim.x * blockDim.x) {
        long long i = e / pairs;
        int c = 2 * (int)(e % pairs);
        const T* src = g + i * cols + c;
        add_pair(out + (size_t)rows[i] * cols + c, to_f(src[0]), to_f(src[1]));
    }
}
#define SCATTER_ADD_ROWS(T, NAME)                                                                                  \
    extern "C" __global__ void scatter_add_rows_##NAME(const T* g, const unsigned* rows, T* out, long long n,     \
                                                      int cols) {                                                 \
        scatter_add_rows<T>(g, rows, out, n, cols);                                                                \
    }
SCATTER_ADD_ROWS(float, f32)
SCATTER_ADD_ROWS(bf16, bf16)
SCATTER_ADD_ROWS(__half, f16)

// Σ x² over n f32 values in two passes: each block's sum into partial[block], then one block adds those in
// order (deterministic; candle's sum of a long vector ran on a single block: 0.55 ms for 5.6 M values).
extern "C" __global__ void sum_squares_f32(const float* x, long long n, float* partial) {
    __shared__ float red[32];
    float s = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        s = fmaf(x[i], x[i], s);
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void sum_partials_f32(const float* partial, int n, float* out) {
    __shared__ float red[32];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) *out = s;
}

// y = a + b over n values (a multiple of 16 bytes' worth), 16 bytes a load: the backward pass's sums of two
// gradients of one tensor (candle's addition loads one value per thread: 1.2 TB/s on 8 MB tensors).
template <typename T>
__device__ void add_vec(const T* a, const T* b, T* y, long long n) {
    constexpr int E = 16 / (int)sizeof(T);
    long long nv = n / E;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < nv; i += (long long)gridDim.x * blockDim.x) {
        uint4 va = reinterpret_cast<const uint4*>(a)[i], vb = reinterpret_cast<const uint4*>(b)[i], vy;
        const T* ea = reinterpret_cast<const T*>(&va);
        const T* eb = reinterpret_cast<const T*>(&vb);
        T* ey = reinterpret_cast<T*>(&vy);
#pragma unroll
        for (int k = 0; k < E; k++) ey[k] = from_f<T>(to_f(ea[k]) + to_f(eb[k]));
        reinterpret_cast<uint4*>(y)[i] = vy;
    }
}
#define ADD_VEC(T, NAME)                                                                                           \
    extern "C" __global__ void add_vec_##NAME(const T* a, const T* b, T* y, long long n) { add_vec<T>(a, b, y, n); }
ADD_VEC(float, f32)
ADD_VEC(bf16, bf16)
ADD_VEC(__half, f16)

// ---- Quantized weights dequantized to bf16 for training's products (QLoRA) ----
// One thread per 32 consecutive values (a 32-block, or a 32-value sub-block of a K-quant super-block), written
// as four 16-byte stores.
__device__ __forceinline__ void store32_bf16(bf16* out, const float* v) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        uint4 w;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&w);
#pragma unroll
        for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(v[8 * q + 2 * j], v[8 * q + 2 * j + 1]);
        reinterpret_cast<uint4*>(out)[q] = w;
    }
}

#define GROUPS_LOOP(groups) \
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < (groups); g += (long long)gridDim.x * blockDim.x)

// Q8_0: {f16 d; i8 qs[32]}.
extern "C" __global__ void dequantize_bf16_q8_0(const uint8_t* q, bf16* out, long long groups) {
    GROUPS_LOOP(groups) {
        const uint8_t* blk = q + g * 34;
        float d = __half2float(*reinterpret_cast<const __half*>(blk)), v[32];
#pragma unroll
        for (int l = 0; l < 32; l++) v[l] = d * (float)(int8_t)blk[2 + l];
        store32_bf16(out + g * 32, v);
    }
}

// Q4_0: {f16 d; u8 qs[16]}: value l is d · (low nibble of qs[l] − 8), value l + 16 the high nibble's.
extern "C" __global__ void dequantize_bf16_q4_0(const uint8_t* q, bf16* out, long long groups) {
    GROUPS_LOOP(groups) {
        const uint8_t* blk = q + g * 18;
        float d = __half2float(*reinterpret_cast<const __half*>(blk)), v[32];
#pragma unroll
        for (int l = 0; l < 16; l++) {
            v[l] = d * (float)((int)(blk[2 + l] & 0xF) - 8);
            v[l + 16] = d * (float)((int)(blk[2 + l] >> 4) - 8);
        }
        store32_bf16(out + g * 32, v);
    }
}

// Q4_1, Q5_0, Q5_1 (`q32_part`'s layouts): {f16 d; [f16 m;] [u32 qh;] u8 qs[16]}: value l < 16 is the low
// nibble of qs[l], value l + 16 its high nibble, the 5-bit types adding bit l (l + 16) of qh as the fifth bit;
// d · (q − 16) without a min (Q5_0), d · q + m with one.
template <int BYTES, bool MIN, bool HIGH>
__device__ __forceinline__ void dequantize_bf16_q32(const uint8_t* q, bf16* out, long long groups) {
    GROUPS_LOOP(groups) {
        const uint8_t* blk = q + g * BYTES;
        float d = __half2float(*reinterpret_cast<const __half*>(blk));
        float m = MIN ? __half2float(*reinterpret_cast<const __half*>(blk + 2)) : (HIGH ? -16.f * d : -8.f * d);
        const uint8_t* after = blk + (MIN ? 4 : 2);
        uint32_t qh = 0;
        if (HIGH) qh = (uint32_t)after[0] | ((uint32_t)after[1] << 8) | ((uint32_t)after[2] << 16) | ((uint32_t)after[3] << 24);
        const uint8_t* qs = after + (HIGH ? 4 : 0);
        float v[32];
#pragma unroll
        for (int l = 0; l < 16; l++) {
            int lo = qs[l] & 0xF, hi = qs[l] >> 4;
            if (HIGH) {
                lo |= ((qh >> l) & 1) << 4;
                hi |= ((qh >> (l + 16)) & 1) << 4;
            }
            v[l] = fmaf(d, (float)lo, m);
            v[l + 16] = fmaf(d, (float)hi, m);
        }
        store32_bf16(out + g * 32, v);
    }
}
extern "C" __global__ void dequantize_bf16_q4_1(const uint8_t* q, bf16* out, long long groups) {
    dequantize_bf16_q32<20, true, false>(q, out, groups);
}
extern "C" __global__ void dequantize_bf16_q5_0(const uint8_t* q, bf16* out, long long groups) {
    dequantize_bf16_q32<22, false, true>(q, out, groups);
}
extern "C" __global__ void dequantize_bf16_q5_1(const uint8_t* q, bf16* out, long long groups) {
    dequantize_bf16_q32<24, true, true>(q, out, groups);
}

// Q4_K: sub-block s of a super-block {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]} is the low (s even) or
// high (s odd) nibbles of qs[32 (s / 2) ..][32], at d · scale_s · q − dmin · min_s. Q5_K (FIVE) has the same
// sub-blocks over {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}, with bit s of qh[l] as the fifth bit
// of value l of sub-block s.
template <bool FIVE>
__device__ __forceinline__ void dequantize_bf16_q45k(const uint8_t* q, bf16* out, long long groups) {
    GROUPS_LOOP(groups) {
        long long b = g >> 3;
        int s = (int)(g & 7);
        const uint8_t* blk = q + b * (FIVE ? 176 : 144);
        float d = __half2float(*reinterpret_cast<const __half*>(blk));
        float dmin = __half2float(*reinterpret_cast<const __half*>(blk + 2));
        float sc, m, v[32];
        q4k_scale_min(s, blk + 4, sc, m);
        const uint8_t* qh = blk + 16;
        const uint8_t* qs = blk + (FIVE ? 48 : 16) + 32 * (s >> 1);
        float ds = d * sc, dm = dmin * m;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int v4 = (s & 1) ? (qs[l] >> 4) : (qs[l] & 0xF);
            if (FIVE) v4 |= ((qh[l] >> s) & 1) << 4;
            v[l] = ds * (float)v4 - dm;
        }
        store32_bf16(out + g * 32, v);
    }
}
extern "C" __global__ void dequantize_bf16_q4k(const uint8_t* q, bf16* out, long long groups) {
    dequantize_bf16_q45k<false>(q, out, groups);
}
extern "C" __global__ void dequantize_bf16_q5k(const uint8_t* q, bf16* out, long long groups) {
    dequantize_bf16_q45k<true>(q, out, groups);
}

// Q6_K: {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}; sub-block s = 4n + k holds values 128n + 32k + l: the
// low (k < 2) or high (k ≥ 2) nibble of ql[64n + l (+ 32 for k = 1, 3)] with bits 2k, 2k + 1 of qh[32n + l]
// as bits 4 and 5, minus 32, times d · scales[8n + 2k + l / 16].
extern "C" __global__ void dequantize_bf16_q6k(const uint8_t* q, bf16* out, long long groups) {
    GROUPS_LOOP(groups) {
        long long b = g >> 3;
        int s = (int)(g & 7), n = s >> 2, k = s & 3;
        const uint8_t* blk = q + b * 210;
        const uint8_t* ql = blk + 64 * n + ((k & 1) ? 32 : 0);
        const uint8_t* qh = blk + 128 + 32 * n;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * n + 2 * k;
        float d = __half2float(*reinterpret_cast<const __half*>(blk + 208)), v[32];
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int lo = (k >> 1) ? (ql[l] >> 4) : (ql[l] & 0xF);
            int hi = (qh[l] >> (2 * k)) & 3;
            v[l] = d * (float)sc[l >> 4] * (float)((lo | (hi << 4)) - 32);
        }
        store32_bf16(out + g * 32, v);
    }
}
