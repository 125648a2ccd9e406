//! GGML block layouts as stored in GGUF files (and in candle's quantized tensors, byte for byte), the
//! activation blocks our kernels multiply them with, and the portable dot products — the reference every SIMD
//! kernel is tested against, and the path on CPUs without one.
//!
//! Every weight type is read as *unsigned* integers `u` with an offset (`w = d·u − m`, or `d·(u − 8)` …), so
//! one integer product `Σ u·q` against the signed 8-bit activations serves all of them; the offsets become a
//! product with the activation block's sum, which is computed once per activation block. The integer sums of
//! a block are exact; only the float accumulation over blocks may differ in order between kernels.

use half::{bf16, f16};

/// Elements per block of the 32-wide types and of the activation blocks that go with them.
pub const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// Weight types with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    F16,
    BF16,
}

/// What the activations are turned into before the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationKind {
    /// [`Q8Block`]s of 32.
    Q8,
    /// [`Q8KBlock`]s of 256.
    Q8K,
    /// Plain f32 (half-precision weights).
    F32,
}

impl WeightKind {
    pub fn from_ggml(d: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match d {
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            G::F16 => Self::F16,
            G::BF16 => Self::BF16,
            _ => return None,
        })
    }

    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
            Self::F16 => G::F16,
            Self::BF16 => G::BF16,
        }
    }

    pub fn from_dtype(d: candle_core::DType) -> Option<Self> {
        match d {
            candle_core::DType::F16 => Some(Self::F16),
            candle_core::DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            Self::F16 | Self::BF16 => 1,
            _ => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub fn activation(self) -> ActivationKind {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => ActivationKind::Q8K,
            Self::F16 | Self::BF16 => ActivationKind::F32,
            _ => ActivationKind::Q8,
        }
    }

    /// Bytes of one row of `cols` elements.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }
}

/// 32 activations as signed 8-bit integers: `x ≈ d·q`; `ds = d·Σq` carries the weights' offsets.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8Block {
    pub d: f32,
    pub ds: f32,
    pub qs: [i8; QK],
}

/// 256 activations as signed 8-bit integers with the sums of each 16 (the K-quants' sub-block offsets).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for Q8Block {
    fn default() -> Self {
        Self { d: 0.0, ds: 0.0, qs: [0; QK] }
    }
}

impl Default for Q8KBlock {
    fn default() -> Self {
        Self { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] }
    }
}

/// Scale so that the largest magnitude maps to 127, and its inverse (0 for an all-zero block).
fn scale_for(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

pub fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let (d, id) = scale_for(xs);
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.ds = d * sum as f32;
    }
}

pub fn quantize_q8k(x: &[f32], out: &mut [Q8KBlock]) {
    debug_assert_eq!(x.len(), out.len() * QK_K);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (d, id) = scale_for(xs);
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = d;
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The unsigned values of a 32-block's 4-bit quants in element order: low nibbles are elements 0–15, high
/// nibbles 16–31.
#[inline]
fn nibbles32(qs: &[u8]) -> [u8; QK] {
    let mut u = [0u8; QK];
    for j in 0..16 {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
    u
}

/// Adds the fifth bit (`qh`, little-endian, bit j for element j) as 16.
#[inline]
fn with_high_bits(mut u: [u8; QK], qh: &[u8]) -> [u8; QK] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, v) in u.iter_mut().enumerate() {
        *v |= (((h >> j) & 1) as u8) << 4;
    }
    u
}

#[inline]
fn idot(u: &[u8], q: &[i8]) -> i32 {
    u.iter().zip(q).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// A Q4_K / Q5_K super-block's eight 6-bit (scale, min) pairs.
#[inline]
pub(crate) fn k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// The unsigned 0..63 values of a Q6_K super-block in element order (the stored value is `u − 32`).
#[inline]
pub(crate) fn q6k_values(b: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut u = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        for l in 0..32 {
            let o = 128 * n + l;
            u[o] = (ql[l] & 0xf) | ((qh[l] & 3) << 4);
            u[o + 32] = (ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4);
            u[o + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            u[o + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    u
}

/// The unsigned values of a Q4_K (no `qh`) or Q5_K super-block in element order.
#[inline]
fn k_values(qs: &[u8], qh: Option<&[u8]>) -> [u8; QK_K] {
    let mut u = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            let mut lo = qs[32 * j + l] & 0xf;
            let mut hi = qs[32 * j + l] >> 4;
            if let Some(qh) = qh {
                lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            }
            u[64 * j + l] = lo;
            u[64 * j + 32 + l] = hi;
        }
    }
    u
}

/// A Q4_K or Q5_K super-block: its scale and min scale, the eight sub-blocks' scales and mins, and the
/// unsigned values in element order.
fn k_block(kind: WeightKind, b: &[u8]) -> (f32, f32, [u8; 8], [u8; 8], [u8; QK_K]) {
    let (sc, m) = k_scales_mins(&b[4..16]);
    let u = match kind {
        WeightKind::Q4K => k_values(&b[16..144], None),
        _ => k_values(&b[48..176], Some(&b[16..48])),
    };
    (f16_at(b, 0), f16_at(b, 2), sc, m, u)
}

/// One block of a 32-wide type against its activation block.
#[inline]
pub fn dot_block_q8(kind: WeightKind, b: &[u8], a: &Q8Block) -> f32 {
    match kind {
        WeightKind::Q4_0 => {
            let d = f16_at(b, 0);
            d * a.d * idot(&nibbles32(&b[2..18]), &a.qs) as f32 - 8.0 * d * a.ds
        }
        WeightKind::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            d * a.d * idot(&nibbles32(&b[4..20]), &a.qs) as f32 + m * a.ds
        }
        WeightKind::Q5_0 => {
            let d = f16_at(b, 0);
            let u = with_high_bits(nibbles32(&b[6..22]), &b[2..6]);
            d * a.d * idot(&u, &a.qs) as f32 - 16.0 * d * a.ds
        }
        WeightKind::Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let u = with_high_bits(nibbles32(&b[8..24]), &b[4..8]);
            d * a.d * idot(&u, &a.qs) as f32 + m * a.ds
        }
        WeightKind::Q8_0 => {
            let s: i32 = b[2..34].iter().zip(&a.qs).map(|(&w, &q)| w as i8 as i32 * q as i32).sum();
            f16_at(b, 0) * a.d * s as f32
        }
        _ => unreachable!("{kind:?} does not take Q8 blocks"),
    }
}

/// Dot product of one weight row (`row`: its blocks) with one activation row — the portable kernel.
/// Activations are `Q8Block`s, `Q8KBlock`s or f32 as [`WeightKind::activation`] says.
pub fn dot_row(kind: WeightKind, row: &[u8], act: Activations<'_>) -> f32 {
    let bb = kind.block_bytes();
    match (kind, act) {
        (WeightKind::F16, Activations::F32(x)) => {
            row.chunks_exact(2).zip(x).map(|(h, v)| f16::from_le_bytes([h[0], h[1]]).to_f32() * v).sum()
        }
        (WeightKind::BF16, Activations::F32(x)) => {
            row.chunks_exact(2).zip(x).map(|(h, v)| bf16::from_le_bytes([h[0], h[1]]).to_f32() * v).sum()
        }
        (_, Activations::Q8(x)) => row.chunks_exact(bb).zip(x).map(|(b, a)| dot_block_q8(kind, b, a)).sum(),
        (_, Activations::Q8K(x)) => {
            let mut acc = 0f32;
            for (b, a) in row.chunks_exact(bb).zip(x) {
                acc += match kind {
                    WeightKind::Q4K | WeightKind::Q5K => {
                        let (d, dmin, sc, m, u) = k_block(kind, b);
                        let (mut sumi, mut summ) = (0i32, 0i32);
                        for s in 0..8 {
                            sumi += sc[s] as i32 * idot(&u[32 * s..32 * s + 32], &a.qs[32 * s..32 * s + 32]);
                            summ += m[s] as i32 * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32);
                        }
                        d * a.d * sumi as f32 - dmin * a.d * summ as f32
                    }
                    WeightKind::Q6K => {
                        let u = q6k_values(b);
                        let sc = &b[192..208];
                        let mut sumi = 0i32;
                        for s in 0..16 {
                            let dot =
                                idot(&u[16 * s..16 * s + 16], &a.qs[16 * s..16 * s + 16]) - 32 * a.bsums[s] as i32;
                            sumi += sc[s] as i8 as i32 * dot;
                        }
                        f16_at(b, 208) * a.d * sumi as f32
                    }
                    _ => unreachable!("{kind:?} does not take Q8K blocks"),
                };
            }
            acc
        }
        _ => unreachable!("{kind:?} with the wrong activation kind"),
    }
}

/// One activation row in the form its weight type multiplies.
#[derive(Clone, Copy)]
pub enum Activations<'a> {
    Q8(&'a [Q8Block]),
    Q8K(&'a [Q8KBlock]),
    F32(&'a [f32]),
}

/// The row of weights as f32.
pub fn dequantize_row(kind: WeightKind, row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / kind.block_bytes() * kind.block_elems());
    dequantize_into(kind, row, &mut out);
    out
}

/// Appends the f32 values of whole blocks `row` to `out`.
pub fn dequantize_into(kind: WeightKind, row: &[u8], out: &mut Vec<f32>) {
    let at = out.len();
    out.resize(at + row.len() / kind.block_bytes() * kind.block_elems(), 0.0);
    dequantize_slice(kind, row, &mut out[at..]);
}

/// Writes the f32 values of whole blocks `row` to the start of `out` (which holds at least that many).
pub fn dequantize_slice(kind: WeightKind, row: &[u8], out: &mut [f32]) {
    if matches!(kind, WeightKind::F16 | WeightKind::BF16) && cfg!(target_endian = "little") {
        // SAFETY: every bit pattern is a valid u16; only an aligned slice is used.
        let (before, halves, after) = unsafe { row.align_to::<u16>() };
        if before.is_empty() && after.is_empty() {
            // Whole slices, so that the conversion is vectorized (F16C where the CPU has it); as many values as
            // both hold, as below.
            let n = halves.len().min(out.len());
            let (halves, out) = (&halves[..n], &mut out[..n]);
            if kind == WeightKind::F16 {
                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                halves.reinterpret_cast::<f16>().convert_to_f32_slice(out);
            } else {
                out.iter_mut().zip(halves).for_each(|(o, &h)| *o = f32::from_bits((h as u32) << 16));
            }
            return;
        }
    }
    let (bb, be) = (kind.block_bytes(), kind.block_elems());
    for (b, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        // `w = d·u + m` or `d·(u − o)` for the 32-wide types, rounded as llama.cpp rounds them (plain loops over
        // arrays, which the compiler vectorizes).
        let affine = |out: &mut [f32], u: [u8; QK], d: f32, m: f32| {
            for (o, u) in out.iter_mut().zip(u) {
                *o = d * u as f32 + m;
            }
        };
        let offset = |out: &mut [f32], u: [u8; QK], d: f32, o: f32| {
            for (w, u) in out.iter_mut().zip(u) {
                *w = d * (u as f32 - o);
            }
        };
        match kind {
            WeightKind::F16 => out[0] = f16_at(b, 0),
            WeightKind::BF16 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            WeightKind::Q4_0 => offset(out, nibbles32(&b[2..18]), f16_at(b, 0), 8.0),
            WeightKind::Q4_1 => affine(out, nibbles32(&b[4..20]), f16_at(b, 0), f16_at(b, 2)),
            WeightKind::Q5_0 => offset(out, with_high_bits(nibbles32(&b[6..22]), &b[2..6]), f16_at(b, 0), 16.0),
            WeightKind::Q5_1 => affine(out, with_high_bits(nibbles32(&b[8..24]), &b[4..8]), f16_at(b, 0), f16_at(b, 2)),
            WeightKind::Q8_0 => {
                let d = f16_at(b, 0);
                for (o, &w) in out.iter_mut().zip(&b[2..34]) {
                    *o = d * w as i8 as f32;
                }
            }
            WeightKind::Q4K | WeightKind::Q5K => {
                let (d, dmin, sc, m, u) = k_block(kind, b);
                for (i, (o, u)) in out.chunks_exact_mut(32).zip(u.chunks_exact(32)).enumerate() {
                    let (scale, min) = (d * sc[i] as f32, dmin * m[i] as f32);
                    for (o, &u) in o.iter_mut().zip(u) {
                        *o = scale * u as f32 - min;
                    }
                }
            }
            WeightKind::Q6K => {
                let d = f16_at(b, 208);
                let u = q6k_values(b);
                for (i, (o, u)) in out.chunks_exact_mut(16).zip(u.chunks_exact(16)).enumerate() {
                    let scale = d * b[192 + i] as i8 as f32;
                    for (o, &u) in o.iter_mut().zip(u) {
                        *o = scale * (u as f32 - 32.0);
                    }
                }
            }
        }
    }
}
