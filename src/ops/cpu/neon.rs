//! NEON kernels for ARM (aarch64): half-precision rows against f32 activations; 8 rows of a packed 32-wide
//! type (see `packed.rs`) and rows of the K-quants against 8-bit activations through the dot-product
//! instruction (`sdot`, Armv8.2 and later: Apple M1 on, Graviton 2 on).
//! The packed layout puts elements 4j..4j+3 of the group's 8 rows side by side (byte 4·row + i), which is
//! exactly `sdot`'s shape: one instruction adds four 4-byte products into each row's i32 lane. The integer sums
//! are exact, so the results equal the AVX2 kernel's and the portable one's up to the float scaling.

#![allow(clippy::missing_safety_doc)]
// Kernels index several arrays by the same lane/block number; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use super::blocks::{k_scales_mins, Q8Block, Q8KBlock, QK_K};
use super::packed::{column_layout, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use std::arch::aarch64::*;
use std::arch::asm;

/// Whether this CPU has the 8-bit dot-product instructions (read once by the caller's dispatch).
pub fn dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc[l] += Σ_i a[4l + i] · b[4l + i]` (signed bytes), the `sdot` instruction (its intrinsic is not stable).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b", acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b,
         options(pure, nomem, nostack));
    acc
}

/// Eight f16 values as two four-lane f32 vectors.
#[inline]
unsafe fn halves(p: *const u8) -> [float32x4_t; 2] {
    let v: [f32; 8] = std::array::from_fn(|i| super::blocks::f16_at(std::slice::from_raw_parts(p, 16), 2 * i));
    [vld1q_f32(v.as_ptr()), vld1q_f32(v.as_ptr().add(4))]
}

/// The fifth bits of 4 consecutive elements (from bit `first` on) of 4 rows (`qh`: one u32 per row) as 0x10 in
/// the bytes of those elements (byte 4·row + i for element `first + i`).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fifth_bits(qh: uint32x4_t, first: i32) -> int8x16_t {
    let t = vreinterpretq_u8_u32(vshlq_u32(qh, vdupq_n_s32(-first)));
    const SPREAD: [u8; 16] = [0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12];
    const BITS: [u8; 16] = [1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8];
    let spread = vqtbl1q_u8(t, vld1q_u8(SPREAD.as_ptr()));
    let set = vtstq_u8(spread, vld1q_u8(BITS.as_ptr()));
    vreinterpretq_s8_u8(vandq_u8(set, vdupq_n_u8(0x10)))
}

/// 8 rows of a packed 32-wide type (one group) against `N` rows of [`Q8Block`]s; the results of row `lane` for
/// token `t` in `out[t][lane]`. Rows 0–3 and 4–7 are the two halves of every vector.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn gemv_packed<const KIND: u8, const N: usize>(
    group: *const u8,
    blocks: usize,
    x: &[*const u8; N],
    out: &mut [[f32; 8]; N],
) {
    // Bytes of one column of 8 blocks, and where its mins, fifth bits and quants start.
    let (gb, m_at, qh_at, qs_at) = column_layout(KIND);
    let m4 = vdupq_n_u8(0x0f);
    let mut acc = [[vdupq_n_f32(0.0); 2]; N];
    for b in 0..blocks {
        let p = group.add(b * gb);
        let d = halves(p);
        let m = match KIND {
            Q4_1 | Q5_1 => halves(p.add(m_at)),
            Q4_0 => [vmulq_n_f32(d[0], -8.0), vmulq_n_f32(d[1], -8.0)],
            Q5_0 => [vmulq_n_f32(d[0], -16.0), vmulq_n_f32(d[1], -16.0)],
            _ => [vdupq_n_f32(0.0); 2],
        };
        // u[j][h]: elements 4j..4j+3 of the block for rows 4h..4h+3 (byte 4·row + i).
        let mut u = [[vdupq_n_s8(0); 2]; 8];
        if KIND == Q8_0 {
            for j in 0..8 {
                for h in 0..2 {
                    u[j][h] = vld1q_s8(p.add(qs_at + 32 * j + 16 * h) as *const i8);
                }
            }
        } else {
            for k in 0..4 {
                for h in 0..2 {
                    let q = vld1q_u8(p.add(qs_at + 32 * k + 16 * h));
                    u[k][h] = vreinterpretq_s8_u8(vandq_u8(q, m4));
                    u[k + 4][h] = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
                }
            }
            if KIND == Q5_0 || KIND == Q5_1 {
                for h in 0..2 {
                    let qh = vld1q_u32(p.add(qh_at + 16 * h) as *const u32);
                    for k in 0..4 {
                        u[k][h] = vorrq_s8(u[k][h], fifth_bits(qh, 4 * k as i32));
                        u[k + 4][h] = vorrq_s8(u[k + 4][h], fifth_bits(qh, 16 + 4 * k as i32));
                    }
                }
            }
        }
        for t in 0..N {
            let a = &*(x[t] as *const Q8Block).add(b);
            let xq = a.qs.as_ptr() as *const i32;
            let mut s = [vdupq_n_s32(0); 2];
            for j in 0..8 {
                let bx = vreinterpretq_s8_s32(vdupq_n_s32(xq.add(j).read_unaligned()));
                s[0] = sdot(s[0], u[j][0], bx);
                s[1] = sdot(s[1], u[j][1], bx);
            }
            for h in 0..2 {
                acc[t][h] = vfmaq_f32(acc[t][h], vmulq_n_f32(d[h], a.d), vcvtq_f32_s32(s[h]));
                if KIND != Q8_0 {
                    acc[t][h] = vfmaq_n_f32(acc[t][h], m[h], a.ds);
                }
            }
        }
    }
    for t in 0..N {
        vst1q_f32(out[t].as_mut_ptr(), acc[t][0]);
        vst1q_f32(out[t].as_mut_ptr().add(4), acc[t][1]);
    }
}

/// Four halves → f32: f16 through `fcvtl` (its intrinsic is not stable in Rust), bf16 by a 16-bit shift.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen4<const BF: bool>(p: *const u16) -> float32x4_t {
    let h = vld1_u16(p);
    if BF {
        vreinterpretq_f32_u32(vshll_n_u16(h, 16))
    } else {
        let out: float32x4_t;
        asm!("fcvtl {o:v}.4s, {h:v}.4h", o = out(vreg) out, h = in(vreg) h, options(pure, nomem, nostack));
        out
    }
}

/// `R` rows of f16 (`BF = false`) or bf16 weights against `N` f32 rows of `cols` elements, as the AVX2 kernel of
/// the same name: one accumulator per (row, token), the same operations for a pair whatever `R` and `N` are.
#[target_feature(enable = "neon")]
pub unsafe fn gemv_half<const BF: bool, const R: usize, const N: usize>(
    rows: &[*const u8; R],
    cols: usize,
    x: &[*const u8; N],
) -> [[f32; N]; R] {
    let mut acc = [[vdupq_n_f32(0.0); N]; R];
    let mut c = 0;
    while c + 4 <= cols {
        let mut w = [vdupq_n_f32(0.0); R];
        for (r, w) in w.iter_mut().enumerate() {
            *w = widen4::<BF>((rows[r] as *const u16).add(c));
        }
        for t in 0..N {
            let xv = vld1q_f32((x[t] as *const f32).add(c));
            for r in 0..R {
                acc[r][t] = vfmaq_f32(acc[r][t], w[r], xv);
            }
        }
        c += 4;
    }
    let mut out = [[0f32; N]; R];
    for r in 0..R {
        for t in 0..N {
            out[r][t] = super::half_row_tail::<BF>(rows[r], x[t] as *const f32, c, cols, vaddvq_f32(acc[r][t]));
        }
    }
    out
}

/// `Σ_i a[i] · b[i]` over 32 bytes as four i32 partial sums (signed bytes; the weights' unsigned values are below
/// 64, so they read the same as signed).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot32(a: [int8x16_t; 2], x: *const i8) -> int32x4_t {
    let s = sdot(vdupq_n_s32(0), a[0], vld1q_s8(x));
    sdot(s, a[1], vld1q_s8(x.add(16)))
}

/// A row of Q4_K (`FIVE = false`) or Q5_K super-blocks against `N` rows of [`Q8KBlock`]s: the integer sums
/// through `sdot`, then per super-block the portable kernel's float steps, so the result is the portable
/// kernel's to the bit.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_q45k<const FIVE: bool, const N: usize>(
    row: *const u8,
    blocks: usize,
    x: &[*const u8; N],
) -> [f32; N] {
    let bb = if FIVE { 176 } else { 144 };
    let (m4, m1) = (vdupq_n_u8(0x0f), vdupq_n_u8(1));
    let mut acc = [0f32; N];
    for i in 0..blocks {
        let b = row.add(i * bb);
        let bytes = std::slice::from_raw_parts(b, 16);
        let (d, dmin) = (super::blocks::f16_at(bytes, 0), super::blocks::f16_at(bytes, 2));
        let (sc, mins) = k_scales_mins(std::slice::from_raw_parts(b.add(4), 12));
        let qs = b.add(if FIVE { 48 } else { 16 });
        let mut high = if FIVE { [vld1q_u8(b.add(16)), vld1q_u8(b.add(32))] } else { [vdupq_n_u8(0); 2] };
        let mut sumi = [vdupq_n_s32(0); N];
        for j in 0..4 {
            let mut lo = [vdupq_n_s8(0); 2];
            let mut hi = [vdupq_n_s8(0); 2];
            for h in 0..2 {
                let q4 = vld1q_u8(qs.add(32 * j + 16 * h));
                let (mut l, mut u) = (vandq_u8(q4, m4), vshrq_n_u8(q4, 4));
                if FIVE {
                    l = vorrq_u8(l, vshlq_n_u8(vandq_u8(high[h], m1), 4));
                    u = vorrq_u8(u, vshlq_n_u8(vandq_u8(vshrq_n_u8(high[h], 1), m1), 4));
                    high[h] = vshrq_n_u8(high[h], 2);
                }
                lo[h] = vreinterpretq_s8_u8(l);
                hi[h] = vreinterpretq_s8_u8(u);
            }
            for t in 0..N {
                let q = (*(x[t] as *const Q8KBlock).add(i)).qs.as_ptr().add(64 * j);
                sumi[t] = vmlaq_n_s32(sumi[t], dot32(lo, q), sc[2 * j] as i32);
                sumi[t] = vmlaq_n_s32(sumi[t], dot32(hi, q.add(32)), sc[2 * j + 1] as i32);
            }
        }
        for t in 0..N {
            let a = &*(x[t] as *const Q8KBlock).add(i);
            let mut summ = 0i32;
            for s in 0..8 {
                summ += mins[s] as i32 * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32);
            }
            // The portable kernel's float steps on the same exact integers: the same bits.
            acc[t] += d * a.d * vaddvq_s32(sumi[t]) as f32 - dmin * a.d * summ as f32;
        }
    }
    acc
}

/// A row of Q6_K super-blocks against `N` rows of [`Q8KBlock`]s, equal to the portable kernel to the bit (as
/// [`dot_q45k`]).
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_q6k<const N: usize>(row: *const u8, blocks: usize, x: &[*const u8; N]) -> [f32; N] {
    let (m4, m3) = (vdupq_n_u8(0x0f), vdupq_n_u8(3));
    let mut acc = [0f32; N];
    for i in 0..blocks {
        let b = row.add(i * 210);
        let d = super::blocks::f16_at(std::slice::from_raw_parts(b, 210), 208);
        let sc = std::slice::from_raw_parts(b.add(192) as *const i8, 16);
        let mut sumi = [vdupq_n_s32(0); N];
        for n in 0..2 {
            // u[g][h]: elements 128n + 32g + 16h.. of the super-block, unsigned 0..63.
            let mut u = [[vdupq_n_s8(0); 2]; 4];
            for h in 0..2 {
                let qa = vld1q_u8(b.add(64 * n + 16 * h));
                let qb = vld1q_u8(b.add(64 * n + 32 + 16 * h));
                let hb = vld1q_u8(b.add(128 + 32 * n + 16 * h));
                let top = |s: uint8x16_t| vshlq_n_u8(vandq_u8(s, m3), 4);
                u[0][h] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(qa, m4), top(hb)));
                u[1][h] = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(qb, m4), top(vshrq_n_u8(hb, 2))));
                u[2][h] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(qa, 4), top(vshrq_n_u8(hb, 4))));
                u[3][h] = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(qb, 4), top(vshrq_n_u8(hb, 6))));
            }
            for (g, u) in u.iter().enumerate() {
                let s = 8 * n + 2 * g;
                for t in 0..N {
                    let q = (*(x[t] as *const Q8KBlock).add(i)).qs.as_ptr().add(128 * n + 32 * g);
                    // Each 16 elements have their own scale.
                    let first = sdot(vdupq_n_s32(0), u[0], vld1q_s8(q));
                    let second = sdot(vdupq_n_s32(0), u[1], vld1q_s8(q.add(16)));
                    sumi[t] = vmlaq_n_s32(sumi[t], first, sc[s] as i32);
                    sumi[t] = vmlaq_n_s32(sumi[t], second, sc[s + 1] as i32);
                }
            }
        }
        for t in 0..N {
            let a = &*(x[t] as *const Q8KBlock).add(i);
            let mut off = 0i32;
            for s in 0..QK_K / 16 {
                off += sc[s] as i32 * a.bsums[s] as i32;
            }
            // The stored values are u − 32: the offset in integers, then the portable kernel's float steps.
            acc[t] += d * a.d * (vaddvq_s32(sumi[t]) - 32 * off) as f32;
        }
    }
    acc
}
