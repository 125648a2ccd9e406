//! The 32-wide block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) regrouped at load for the CPU kernels: 8 rows at
//! a time, each column of blocks stored as the 8 rows' scales side by side, then their quants in slices of 4
//! elements × 8 rows. A kernel then multiplies 8 rows at once: one broadcast of 4 activations against one
//! 32-byte load of weights gives all 8 rows' partial sums in the lanes of one register, the scales of the 8
//! rows are one 16-byte load, and no horizontal sum is left at the end. Same bytes as the file's layout,
//! permuted; the original blocks of any row can be read back (embedding lookups, dequantization).

#![allow(clippy::needless_range_loop)] // lanes index several arrays at once

use super::blocks::{self, Q8Block, WeightKind};

/// Rows per group.
pub const GROUP: usize = 8;

/// The 32-wide types as the SIMD kernels' const generic `KIND` (row kernels and group kernels alike).
pub const Q4_0: u8 = 0;
pub const Q4_1: u8 = 1;
pub const Q5_0: u8 = 2;
pub const Q5_1: u8 = 3;
pub const Q8_0: u8 = 4;

/// A group's column of 8 blocks for the kernels' type code `code`: (its bytes, and where its mins, fifth bits
/// and quants start; 0 for a part the type does not have) — [`Parts::packed`], for the SIMD group kernels.
pub(super) fn column_layout(code: u8) -> (usize, usize, usize, usize) {
    let kind = match code {
        Q4_0 => WeightKind::Q4_0,
        Q4_1 => WeightKind::Q4_1,
        Q5_0 => WeightKind::Q5_0,
        Q5_1 => WeightKind::Q5_1,
        _ => WeightKind::Q8_0,
    };
    let (m, qh, qs) = Parts::of(kind).packed();
    (GROUP * kind.block_bytes(), m.unwrap_or(0), qh.unwrap_or(0), qs)
}

/// Where a block's parts lie: in the file's block, and in a group's column of 8 blocks.
#[derive(Clone, Copy)]
struct Parts {
    /// Offsets in the file's block of the min `m`, the fifth bits `qh`, and the quants.
    m: Option<usize>,
    qh: Option<usize>,
    qs: usize,
    /// Bytes of quants per block (16 nibble pairs or 32 signed bytes).
    qs_len: usize,
}

impl Parts {
    fn of(kind: WeightKind) -> Parts {
        match kind {
            WeightKind::Q4_0 => Parts { m: None, qh: None, qs: 2, qs_len: 16 },
            WeightKind::Q4_1 => Parts { m: Some(2), qh: None, qs: 4, qs_len: 16 },
            WeightKind::Q5_0 => Parts { m: None, qh: Some(2), qs: 6, qs_len: 16 },
            WeightKind::Q5_1 => Parts { m: Some(2), qh: Some(4), qs: 8, qs_len: 16 },
            WeightKind::Q8_0 => Parts { m: None, qh: None, qs: 2, qs_len: 32 },
            _ => unreachable!("{kind:?} is not packed"),
        }
    }

    /// Offsets in a group's column: scales at 0, then the mins, the fifth bits and the quant slices.
    fn packed(self) -> (Option<usize>, Option<usize>, usize) {
        let m = self.m.map(|_| 16);
        let qh = self.qh.map(|_| 16 + 16 * m.is_some() as usize);
        let qs = 16 + 16 * m.is_some() as usize + 32 * qh.is_some() as usize;
        (m, qh, qs)
    }
}

/// A weight matrix of a 32-wide block type in groups of 8 rows (the last group padded with zero blocks).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    kind: WeightKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Does this type have a packed layout?
    pub fn packs(kind: WeightKind) -> bool {
        matches!(kind, WeightKind::Q4_0 | WeightKind::Q4_1 | WeightKind::Q5_0 | WeightKind::Q5_1 | WeightKind::Q8_0)
    }

    /// Regroups `rows × cols` weights stored as `kind` blocks, row after row (the GGUF layout).
    pub fn pack(kind: WeightKind, bytes: &[u8], rows: usize, cols: usize) -> Self {
        assert!(Self::packs(kind) && cols.is_multiple_of(blocks::QK) && bytes.len() == rows * kind.row_bytes(cols));
        let (bb, nb) = (kind.block_bytes(), cols / blocks::QK);
        let groups = rows.div_ceil(GROUP);
        let mut data = vec![0u8; groups * nb * GROUP * bb];
        let parts = Parts::of(kind);
        let (pm, pqh, pqs) = parts.packed();
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &bytes[(r * nb + b) * bb..][..bb];
                let dst = &mut data[(g * nb + b) * GROUP * bb..][..GROUP * bb];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[0..2]);
                if let (Some(m), Some(pm)) = (parts.m, pm) {
                    dst[pm + 2 * lane..pm + 2 * lane + 2].copy_from_slice(&src[m..m + 2]);
                }
                if let (Some(qh), Some(pqh)) = (parts.qh, pqh) {
                    dst[pqh + 4 * lane..pqh + 4 * lane + 4].copy_from_slice(&src[qh..qh + 4]);
                }
                for k in 0..parts.qs_len / 4 {
                    let at = pqs + 32 * k + 4 * lane;
                    dst[at..at + 4].copy_from_slice(&src[parts.qs + 4 * k..parts.qs + 4 * k + 4]);
                }
            }
        }
        Self { kind, rows, cols, data }
    }

    pub fn kind(&self) -> WeightKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (the file's size of the matrix, plus the padding of the last group).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.data
    }

    /// Blocks per row.
    pub(super) fn blocks(&self) -> usize {
        self.cols / blocks::QK
    }

    /// Row `r`'s block `b` as the file stores it.
    fn block(&self, r: usize, b: usize, out: &mut [u8]) {
        let (bb, nb) = (self.kind.block_bytes(), self.blocks());
        let (g, lane) = (r / GROUP, r % GROUP);
        let src = &self.data[(g * nb + b) * GROUP * bb..][..GROUP * bb];
        let parts = Parts::of(self.kind);
        let (pm, pqh, pqs) = parts.packed();
        out[0..2].copy_from_slice(&src[2 * lane..2 * lane + 2]);
        if let (Some(m), Some(pm)) = (parts.m, pm) {
            out[m..m + 2].copy_from_slice(&src[pm + 2 * lane..pm + 2 * lane + 2]);
        }
        if let (Some(qh), Some(pqh)) = (parts.qh, pqh) {
            out[qh..qh + 4].copy_from_slice(&src[pqh + 4 * lane..pqh + 4 * lane + 4]);
        }
        for k in 0..parts.qs_len / 4 {
            let at = pqs + 32 * k + 4 * lane;
            out[parts.qs + 4 * k..parts.qs + 4 * k + 4].copy_from_slice(&src[at..at + 4]);
        }
    }

    /// Row `r` as the file stores it.
    pub fn row_blocks(&self, r: usize) -> Vec<u8> {
        let bb = self.kind.block_bytes();
        let mut out = vec![0u8; self.kind.row_bytes(self.cols)];
        for b in 0..self.blocks() {
            self.block(r, b, &mut out[b * bb..(b + 1) * bb]);
        }
        out
    }

    /// The whole matrix as the file stores it.
    pub fn unpacked(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_blocks(r)).collect()
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        blocks::dequantize_row(self.kind, &self.row_blocks(r))
    }

    /// Row `r`'s blocks `b0..b1` as f32 into the start of `out`.
    pub(super) fn dequantize_blocks(&self, r: usize, b0: usize, b1: usize, out: &mut [f32]) {
        let bb = self.kind.block_bytes();
        let mut block = [0u8; 34];
        for (b, dst) in (b0..b1).zip(out.chunks_exact_mut(blocks::QK)) {
            self.block(r, b, &mut block[..bb]);
            blocks::dequantize_slice(self.kind, &block[..bb], dst);
        }
    }

    /// Group `g`'s column of blocks `b` as f32: element `e` of the group's row `lane` into
    /// `out[e · stride + lane]`, for the 32 elements and 8 lanes (rows past the matrix read as zeros).
    pub(super) fn dequantize_column(&self, g: usize, b: usize, out: &mut [f32], stride: usize) {
        assert!(out.len() > 31 * stride + 7 && stride >= GROUP, "column output");
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if super::simd() {
            let column_bytes = GROUP * self.kind.block_bytes();
            let col = &self.data[(g * self.blocks() + b) * column_bytes..][..column_bytes];
            // SAFETY: `col` is one whole column of 8 blocks and `out` holds 32 strided rows of 8 (asserted).
            unsafe { simd::dequantize_column(self.kind, Parts::of(self.kind), col.as_ptr(), out.as_mut_ptr(), stride) };
            return;
        }
        let mut block = [0u8; 34];
        let mut values = [0f32; blocks::QK];
        let bb = self.kind.block_bytes();
        for lane in 0..GROUP {
            self.block(g * GROUP + lane, b, &mut block[..bb]);
            blocks::dequantize_slice(self.kind, &block[..bb], &mut values);
            for (e, v) in values.iter().enumerate() {
                out[e * stride + lane] = *v;
            }
        }
    }

    /// The whole matrix as f32, row after row (rows spread over the kernel threads).
    pub fn dequantize(&self) -> Vec<f32> {
        let (cols, bb) = (self.cols, self.kind.block_bytes());
        let mut out = vec![0f32; self.rows * cols];
        let base = out.as_mut_ptr() as usize;
        let pool = super::pool::pool();
        let per = self.rows.div_ceil(pool.threads() * 4).max(1);
        pool.run(self.rows.div_ceil(per), &|task| {
            let (mut block, mut values) = ([0u8; 34], Vec::with_capacity(blocks::QK));
            for r in task * per..((task + 1) * per).min(self.rows) {
                // SAFETY: each task writes its own rows.
                let row = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(r * cols), cols) };
                for (b, dst) in row.chunks_exact_mut(blocks::QK).enumerate() {
                    self.block(r, b, &mut block[..bb]);
                    values.clear();
                    blocks::dequantize_into(self.kind, &block[..bb], &mut values);
                    dst.copy_from_slice(&values);
                }
            }
        });
        out
    }

    /// The portable kernel on this layout: group `g`'s 8 rows against `n` activation rows (each `blocks()`
    /// [`Q8Block`]s, `stride` bytes apart from `x`), results into `out[t][lane]`.
    pub(super) fn group_portable(&self, g: usize, x: &[&[Q8Block]], out: &mut [[f32; GROUP]]) {
        let (bb, nb) = (self.kind.block_bytes(), self.blocks());
        let mut block = [0u8; 34];
        for o in out.iter_mut().take(x.len()) {
            *o = [0.0; GROUP];
        }
        for lane in 0..GROUP {
            let r = g * GROUP + lane;
            if r >= self.rows {
                break;
            }
            for b in 0..nb {
                self.block(r, b, &mut block[..bb]);
                for (t, xa) in x.iter().enumerate() {
                    out[t][lane] += blocks::dot_block_q8(self.kind, &block[..bb], &xa[b]);
                }
            }
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod simd {
    use super::Parts;
    use crate::ops::cpu::blocks::WeightKind;
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// [`super::PackedMatrix::dequantize_column`] with 8 rows per register: one 32-byte slice of quants holds 4
    /// elements of each of the 8 rows, so element `i` of the slice is a shift and a mask per 32-bit lane. The
    /// arithmetic is the scalar dequantization's, operation for operation (the same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_column(kind: WeightKind, parts: Parts, col: *const u8, out: *mut f32, stride: usize) {
        let (pm, pqh, pqs) = parts.packed();
        let d = _mm256_cvtph_ps(_mm_loadu_si128(col as *const __m128i));
        let m = pm.map(|o| _mm256_cvtph_ps(_mm_loadu_si128(col.add(o) as *const __m128i)));
        let qh = pqh.map(|o| _mm256_loadu_si256(col.add(o) as *const __m256i));
        let byte = _mm256_set1_epi32(0xff);
        let put = |e: usize, u: __m256i| {
            let w = match (kind, m) {
                (WeightKind::Q4_1 | WeightKind::Q5_1, Some(m)) => {
                    _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(u)), m)
                }
                (WeightKind::Q4_0, _) => {
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(u, _mm256_set1_epi32(8))))
                }
                (WeightKind::Q5_0, _) => {
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(u, _mm256_set1_epi32(16))))
                }
                _ => _mm256_mul_ps(d, _mm256_cvtepi32_ps(u)),
            };
            _mm256_storeu_ps(out.add(e * stride), w);
        };
        let high = |e: usize, u: __m256i| match qh {
            Some(qh) => {
                let bit = _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_set1_epi32(e as i32)), _mm256_set1_epi32(1));
                _mm256_or_si256(u, _mm256_slli_epi32(bit, 4))
            }
            None => u,
        };
        if kind == WeightKind::Q8_0 {
            for k in 0..8 {
                let v = _mm256_loadu_si256(col.add(pqs + 32 * k) as *const __m256i);
                // Byte i of each lane, sign-extended: shift it to the top, then arithmetically down.
                put(4 * k, _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
                put(4 * k + 1, _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
                put(4 * k + 2, _mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
                put(4 * k + 3, _mm256_srai_epi32(v, 24));
            }
            return;
        }
        // Nibble types: byte j of a row holds element j (low nibble) and element j + 16 (high nibble).
        let nibble = _mm256_set1_epi32(0x0f);
        for k in 0..4 {
            let v = _mm256_loadu_si256(col.add(pqs + 32 * k) as *const __m256i);
            for (i, b) in
                [v, _mm256_srli_epi32(v, 8), _mm256_srli_epi32(v, 16), _mm256_srli_epi32(v, 24)].into_iter().enumerate()
            {
                let b = _mm256_and_si256(b, byte);
                let e = 4 * k + i;
                put(e, high(e, _mm256_and_si256(b, nibble)));
                put(e + 16, high(e + 16, _mm256_srli_epi32(b, 4)));
            }
        }
    }
}
