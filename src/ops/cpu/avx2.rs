//! AVX2 (+FMA, F16C) kernels: one weight row against `N` activation rows at once, so that a block of
//! weights is loaded and unpacked once for `N` tokens (prefill) — `N = 1` is the decode case.
//!
//! Integer products use `maddubs` (unsigned weights × signed activations → pairs of i16; the weights are at
//! most 63 and the activations at most 127 in magnitude, so the pairs cannot saturate), then `madd` to i32
//! (with 1s, or with the K-quants' sub-block scales), one float FMA per block and token.

#![allow(clippy::missing_safety_doc)]
// Kernels index several arrays by the same lane/block number; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]

use super::blocks::{Q8Block, Q8KBlock};
use super::packed::{column_layout, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
#[cfg(target_arch = "x86")]
use std::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The sum of the 4 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m128i) -> i32 {
    let v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0b10_11_00_01)))
}

/// A K-quant super-block's 8 six-bit scales and 8 mins (the 12 bytes at `s`, as `blocks::k_scales_mins`
/// reads them) as one byte each, by 32-bit operations: (scales, mins), element j in byte j.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_scales_mins_bytes(s: *const u8) -> (u64, u64) {
    let [u0, u1, u2] = [0, 4, 8].map(|at| (s.add(at) as *const u32).read_unaligned());
    let low6 = 0x3f3f_3f3f;
    let (top2, nibble) = (0x0303_0303, 0x0f0f_0f0f);
    let scales_hi = (u2 & nibble) | (((u0 >> 6) & top2) << 4);
    let mins_hi = ((u2 >> 4) & nibble) | (((u1 >> 6) & top2) << 4);
    ((u0 & low6) as u64 | (scales_hi as u64) << 32, (u1 & low6) as u64 | (mins_hi as u64) << 32)
}

/// 16 bytes of packed nibbles → 32 bytes in element order (low nibbles first, then high nibbles).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let t = _mm_loadu_si128(p as *const __m128i);
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f))
}

/// 32 bits → 32 bytes of 0xff (bit set) or 0x00.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let bits = (p as *const u32).read_unaligned();
    let shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuffle);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// A row of a 32-block type (`KIND` one of the constants above) against `N` rows of [`Q8Block`]s.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8<const KIND: u8, const N: usize>(row: *const u8, blocks: usize, x: &[*const u8; N]) -> [f32; N] {
    let bb = match KIND {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut offset = [0f32; N];
    for i in 0..blocks {
        let b = row.add(i * bb);
        let d = half(b);
        // `u`: the weights as unsigned bytes (signed for Q8_0); `m`: the offset per unit of Σq.
        let (u, m) = match KIND {
            Q4_0 => (nibbles(b.add(2)), -8.0 * d),
            Q4_1 => (nibbles(b.add(4)), half(b.add(2))),
            Q5_0 => {
                let high = _mm256_and_si256(bytes_from_bits(b.add(2)), _mm256_set1_epi8(0x10));
                (_mm256_or_si256(nibbles(b.add(6)), high), -16.0 * d)
            }
            Q5_1 => {
                let high = _mm256_and_si256(bytes_from_bits(b.add(4)), _mm256_set1_epi8(0x10));
                (_mm256_or_si256(nibbles(b.add(8)), high), half(b.add(2)))
            }
            _ => (_mm256_loadu_si256(b.add(2) as *const __m256i), 0.0),
        };
        let au = if KIND == Q8_0 { _mm256_sign_epi8(u, u) } else { u };
        for t in 0..N {
            let a = &*(x[t] as *const Q8Block).add(i);
            let mut q = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            if KIND == Q8_0 {
                q = _mm256_sign_epi8(q, u);
            }
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(au, q), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc[t]);
            if KIND != Q8_0 {
                offset[t] += m * a.ds;
            }
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum(acc[t]) + offset[t];
    }
    out
}

/// The kernels whose inner sums are integer products of weight and activation bytes — the packed 32-wide
/// groups and the K-quants' rows — for one instruction set. `$vnni` false: AVX2, byte pairs summed by
/// `maddubs` into i16 and widened by `madd`; true: the VNNI instructions `$dpbusd` (4 byte products added
/// straight into an i32 lane) and `$dpwssd` (`madd` and its addition in one). The AVX2 module instantiates it
/// with the VNNI names only in branches that are never taken.
macro_rules! integer_kernels {
    ($features:literal, $vnni:literal, $dpbusd:ident, $dpwssd:ident) => {
        const VNNI: bool = $vnni;

        /// `acc + Σ pairs(p) · s`: i16 pairs times i16 scales, summed into the i32 lanes.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn madd_add(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
            if VNNI {
                $dpwssd(acc, p, s)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
            }
        }

        /// A row of Q4_K (`FIVE = false`) or Q5_K super-blocks against `N` rows of [`Q8KBlock`]s.
        #[target_feature(enable = $features)]
        pub unsafe fn dot_q45k<const FIVE: bool, const N: usize>(
            row: *const u8,
            blocks: usize,
            x: &[*const u8; N],
        ) -> [f32; N] {
            let bb = if FIVE { 176 } else { 144 };
            let m4 = _mm256_set1_epi8(0x0f);
            let m1 = _mm256_set1_epi8(1);
            let mut acc = [_mm256_setzero_ps(); N];
            let mut offset = [0f32; N];
            for i in 0..blocks {
                let b = row.add(i * bb);
                let (d, dmin) = (half(b), half(b.add(2)));
                let (sc, mins) = k_scales_mins_bytes(b.add(4));
                let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
                let qs = b.add(if FIVE { 48 } else { 16 });
                let mut high =
                    if FIVE { _mm256_loadu_si256(b.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
                // Two chains per token (the low and the high nibbles' products), added at the end of the block.
                let mut sumi = [[_mm256_setzero_si256(); 2]; N];
                for j in 0..4 {
                    let q4 = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                    let mut lo = _mm256_and_si256(q4, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                    if FIVE {
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(high, m1), 4));
                        hi =
                            _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 1), m1), 4));
                        high = _mm256_srli_epi16(high, 2);
                    }
                    let scale = |k: usize| _mm256_set1_epi16((sc >> (8 * k) & 0xff) as i16);
                    let (s_lo, s_hi) = (scale(2 * j), scale(2 * j + 1));
                    for t in 0..N {
                        let a = (x[t] as *const Q8KBlock).add(i);
                        let q = (*a).qs.as_ptr().add(64 * j);
                        let pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q as *const __m256i));
                        let ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q.add(32) as *const __m256i));
                        sumi[t] = [madd_add(sumi[t][0], pl, s_lo), madd_add(sumi[t][1], ph, s_hi)];
                    }
                }
                for t in 0..N {
                    let a = &*(x[t] as *const Q8KBlock).add(i);
                    // Σ_s mins[s] · (the activations' sum over sub-block s of 32) — the sums of each 16, paired.
                    let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
                    let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
                    let summ = hsum_i32(_mm_madd_epi16(mins, pairs));
                    let sumi = _mm256_add_epi32(sumi[t][0], sumi[t][1]);
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                    offset[t] -= dmin * a.d * summ as f32;
                }
            }
            let mut out = [0f32; N];
            for t in 0..N {
                out[t] = hsum(acc[t]) + offset[t];
            }
            out
        }

        /// A row of Q6_K super-blocks against `N` rows of [`Q8KBlock`]s.
        #[target_feature(enable = $features)]
        pub unsafe fn dot_q6k<const N: usize>(row: *const u8, blocks: usize, x: &[*const u8; N]) -> [f32; N] {
            let m4 = _mm256_set1_epi8(0x0f);
            let m3 = _mm256_set1_epi8(3);
            let mut acc = [_mm256_setzero_ps(); N];
            let mut offset = [0f32; N];
            for i in 0..blocks {
                let b = row.add(i * 210);
                let d = half(b.add(208));
                let sc = std::slice::from_raw_parts(b.add(192) as *const i8, 16);
                let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192) as *const __m128i));
                let mut sumi = [_mm256_setzero_si256(); N];
                for n in 0..2 {
                    let qa = _mm256_loadu_si256(b.add(64 * n) as *const __m256i);
                    let qb = _mm256_loadu_si256(b.add(64 * n + 32) as *const __m256i);
                    let h = _mm256_loadu_si256(b.add(128 + 32 * n) as *const __m256i);
                    let top = |s: __m256i| _mm256_slli_epi16(_mm256_and_si256(s, m3), 4);
                    let u = [
                        _mm256_or_si256(_mm256_and_si256(qa, m4), top(h)),
                        _mm256_or_si256(_mm256_and_si256(qb, m4), top(_mm256_srli_epi16(h, 2))),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), top(_mm256_srli_epi16(h, 4))),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), top(_mm256_srli_epi16(h, 6))),
                    ];
                    for (g, u) in u.iter().enumerate() {
                        let s = 8 * n + 2 * g;
                        let scale = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1] as i16), _mm_set1_epi16(sc[s] as i16));
                        for t in 0..N {
                            let a = (x[t] as *const Q8KBlock).add(i);
                            let q = _mm256_loadu_si256((*a).qs.as_ptr().add(128 * n + 32 * g) as *const __m256i);
                            sumi[t] = madd_add(sumi[t], _mm256_maddubs_epi16(*u, q), scale);
                        }
                    }
                }
                for t in 0..N {
                    let a = &*(x[t] as *const Q8KBlock).add(i);
                    // Σ_s scale[s] · (the activations' sum over sub-block s of 16).
                    let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
                    let off = _mm256_madd_epi16(scales16, bsums);
                    let off = hsum_i32(_mm_add_epi32(_mm256_castsi256_si128(off), _mm256_extracti128_si256(off, 1)));
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                    offset[t] -= 32.0 * d * a.d * off as f32;
                }
            }
            let mut out = [0f32; N];
            for t in 0..N {
                out[t] = hsum(acc[t]) + offset[t];
            }
            out
        }

        /// 8 rows of a packed 32-wide type (one group, see `packed.rs`) against `N` rows of [`Q8Block`]s; the
        /// results of row `lane` for token `t` in `out[t][lane]`.
        #[target_feature(enable = $features)]
        pub unsafe fn gemv_packed<const KIND: u8, const N: usize>(
            group: *const u8,
            blocks: usize,
            x: &[*const u8; N],
            out: &mut [[f32; 8]; N],
        ) {
            // Bytes of one column of 8 blocks, and where its mins, fifth bits and quants start.
            let (gb, m_at, qh_at, qs_at) = column_layout(KIND);
            let m4 = _mm256_set1_epi8(0x0f);
            let ones = _mm256_set1_epi16(1);
            let zero = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..blocks {
                let p = group.add(b * gb);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                // The offset per unit of Σq. VNNI multiplies unsigned weight bytes only, so Q8_0's signed
                // weights are taken as w + 128 (the sign bit flipped) and 128·d·Σq taken back off.
                let m = match KIND {
                    Q4_1 | Q5_1 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(m_at) as *const __m128i)),
                    Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                    Q5_0 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
                    _ if VNNI => _mm256_mul_ps(d, _mm256_set1_ps(-128.0)),
                    _ => _mm256_setzero_ps(),
                };
                // u[j]: elements 4j..4j+3 of the block for the 8 rows (byte 4·row + i).
                let mut u = [_mm256_setzero_si256(); 8];
                if KIND == Q8_0 {
                    for (j, u) in u.iter_mut().enumerate() {
                        *u = _mm256_loadu_si256(p.add(qs_at + 32 * j) as *const __m256i);
                        if VNNI {
                            *u = _mm256_xor_si256(*u, _mm256_set1_epi8(-128));
                        }
                    }
                } else {
                    for k in 0..4 {
                        let q = _mm256_loadu_si256(p.add(qs_at + 32 * k) as *const __m256i);
                        u[k] = _mm256_and_si256(q, m4);
                        u[k + 4] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    }
                    if KIND == Q5_0 || KIND == Q5_1 {
                        let qh = _mm256_loadu_si256(p.add(qh_at) as *const __m256i);
                        for k in 0..4 {
                            u[k] = _mm256_or_si256(u[k], fifth_bits(qh, 4 * k as i32));
                            u[k + 4] = _mm256_or_si256(u[k + 4], fifth_bits(qh, 16 + 4 * k as i32));
                        }
                    }
                }
                for t in 0..N {
                    let a = &*(x[t] as *const Q8Block).add(b);
                    let xq = a.qs.as_ptr() as *const i32;
                    let bx = |j: usize| _mm256_set1_epi32(xq.add(j).read_unaligned());
                    let sum = if VNNI {
                        // Two chains, so that one token's sums are not one long dependency chain.
                        let (mut even, mut odd) = ($dpbusd(zero, u[0], bx(0)), $dpbusd(zero, u[1], bx(1)));
                        for j in (2..8).step_by(2) {
                            even = $dpbusd(even, u[j], bx(j));
                            odd = $dpbusd(odd, u[j + 1], bx(j + 1));
                        }
                        _mm256_add_epi32(even, odd)
                    } else {
                        match KIND {
                            // 4-bit values: 8 pair sums of at most 2·15·127 each fit an i16.
                            Q4_0 | Q4_1 => {
                                let mut s = _mm256_maddubs_epi16(u[0], bx(0));
                                for j in 1..8 {
                                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u[j], bx(j)));
                                }
                                _mm256_madd_epi16(s, ones)
                            }
                            // 5-bit values: 4 at a time fit.
                            Q5_0 | Q5_1 => {
                                let mut lo = _mm256_maddubs_epi16(u[0], bx(0));
                                let mut hi = _mm256_maddubs_epi16(u[4], bx(4));
                                for j in 1..4 {
                                    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u[j], bx(j)));
                                    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u[j + 4], bx(j + 4)));
                                }
                                _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones))
                            }
                            // Signed 8-bit: |w|·sign(x, w), each product pair widened at once.
                            _ => {
                                let mut s = zero;
                                for (j, u) in u.iter().enumerate() {
                                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(*u, *u), _mm256_sign_epi8(bx(j), *u));
                                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                                }
                                s
                            }
                        }
                    };
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.d)), _mm256_cvtepi32_ps(sum), acc[t]);
                    if KIND != Q8_0 || VNNI {
                        acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.ds), acc[t]);
                    }
                }
            }
            for t in 0..N {
                _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
            }
        }
    };
}

integer_kernels!("avx2,fma,f16c", false, _mm256_dpbusd_epi32, _mm256_dpwssd_epi32);

/// The integer kernels through AVX-512 VNNI's 256-bit forms (AVX512VL): Intel server cores since Ice Lake,
/// AMD since Zen 4. 256 bits rather than 512: on Zen 4 a 512-bit operation is two 256-bit halves, and a group
/// of 8 rows is one 256-bit register.
pub mod avx512_vnni {
    use super::*;

    pub fn available() -> bool {
        super::available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    }

    integer_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", true, _mm256_dpbusd_epi32, _mm256_dpwssd_epi32);
}

/// The same through AVX-VNNI, the VEX-encoded 256-bit VNNI of client cores without AVX-512 (Intel since Alder
/// Lake).
pub mod avx_vnni {
    use super::*;

    pub fn available() -> bool {
        super::available() && is_x86_feature_detected!("avxvnni")
    }

    integer_kernels!("avx2,fma,f16c,avxvnni", true, _mm256_dpbusd_avx_epi32, _mm256_dpwssd_avx_epi32);
}

/// 8 half-precision weights as f32 (`BF = true`: bfloat16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen8<const BF: bool>(p: *const u16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    if BF {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    } else {
        _mm256_cvtph_ps(h)
    }
}

/// The fifth bits of 4 consecutive elements (from bit `first` on) of each of 8 rows (`qh`: one u32 per row)
/// as 0x10 in the bytes of those elements (byte 4·row + i for element `first + i`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: __m256i, first: i32) -> __m256i {
    let t = _mm256_srlv_epi32(qh, _mm256_set1_epi32(first));
    let spread = _mm256_shuffle_epi8(
        t,
        _mm256_set_epi64x(0x0c0c0c0c08080808, 0x0404040400000000, 0x0c0c0c0c08080808, 0x0404040400000000),
    );
    let bits = _mm256_set1_epi32(0x08040201);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `R` rows of f16 (`BF = false`) or bf16 weights against `N` f32 rows of `cols` elements: one accumulator per
/// (row, token), the same sequence of operations for a pair whatever `R` and `N` are (so a token's result
/// does not depend on its batch). Decode runs 2 rows × 1 token, prefill 2 rows × 4 tokens: enough chains to
/// hide the FMA latency, few enough loads per FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_half<const BF: bool, const R: usize, const N: usize>(
    rows: &[*const u8; R],
    cols: usize,
    x: &[*const u8; N],
) -> [[f32; N]; R] {
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut c = 0;
    while c + 8 <= cols {
        if N == 1 && c % (32 / R.min(4)) == 0 {
            // Decode streams each weight once, R rows side by side: R short streams that the hardware prefetcher
            // of some cores (Zen 4: half the bandwidth of one row at a time) does not follow. So the next tile's
            // bytes (its rows lie right after this tile's) are asked for in address order, as fast as this
            // tile's are read: one line per 64 bytes read. A prefetch past the matrix is dropped, never a fault.
            _mm_prefetch::<_MM_HINT_T0>((rows[0] as *const i8).wrapping_add(R * cols * 2 + R * 2 * c));
        }
        let mut w = [_mm256_setzero_ps(); R];
        for (r, w) in w.iter_mut().enumerate() {
            *w = widen8::<BF>((rows[r] as *const u16).add(c));
        }
        for t in 0..N {
            let xv = _mm256_loadu_ps((x[t] as *const f32).add(c));
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(w[r], xv, acc[r][t]);
            }
        }
        c += 8;
    }
    let mut out = [[0f32; N]; R];
    for r in 0..R {
        for t in 0..N {
            out[r][t] = super::half_row_tail::<BF>(rows[r], x[t] as *const f32, c, cols, hsum(acc[r][t]));
        }
    }
    out
}
