//! f32 matrix products against weights kept as stored (GGML blocks, packed 8-row groups, f16 / bf16), each
//! weight tile dequantized into a small f32 panel right before it is used: no full-precision copy of a matrix
//! is ever made, and the result is the f32 product of the dequantized weights. Every output element is summed
//! in one fixed order (blocks of [`KC`] reduction steps, each accumulated from zero by FMA, then added in
//! order), whatever the number of activation rows or threads: a row's result does not depend on the rows
//! beside it.
//!
//! Two shapes: `y = x·Wᵀ` ([`matmul_wt`], a layer's forward pass) and `dx = dy·W` ([`matmul_w`], the input
//! gradient of a frozen weight while training). Both cut the weight side into panels of [`KC`] reduction
//! steps × [`NR`] outputs, laid out so that the micro-kernel reads 16 consecutive floats per step, and walk the
//! activation rows 6 at a time with the 12 accumulators of a 6 × 16 tile in registers (the shape of the
//! BLIS / llamafile kernels for AVX2: two FMAs per broadcast activation), or 12 at a time with AVX-512.

// `let c = c;` in the task closure captures the whole `Out` (Sync), not its raw pointer field.
#![allow(clippy::redundant_locals)]

use super::blocks::{self, WeightKind};
use super::packed::{PackedMatrix, GROUP};
use super::pool;
use std::cell::RefCell;

/// Outputs per micro-panel (two 8-lane vectors).
pub(super) const NR: usize = 16;
/// Activation rows per micro-kernel call (AVX-512's 32 registers hold a 12 × 16 tile: see `avx512`).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
const MR_AVX512: usize = 12;
/// Reduction steps per panel: a micro-panel (KC × NR floats, 16 KiB) stays in L1 while the rows stream past.
/// A multiple of every block width (32, 256), so that a panel of `x·Wᵀ` starts at a block boundary.
const KC: usize = 256;
/// Most outputs per task (a multiple of [`NR`]); fewer where that leaves threads idle.
const NC: usize = 128;

/// A weight matrix as stored, `rows × cols`.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// Rows of `kind` (blocks, or halves) one after another, as GGUF stores them.
    Rows { kind: WeightKind, bytes: &'a [u8], rows: usize, cols: usize },
    /// The 8-row groups of our kernels.
    Packed(&'a PackedMatrix),
    /// Plain f32 rows.
    F32 { values: &'a [f32], rows: usize, cols: usize },
}

impl Weights<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Weights::Rows { rows, .. } | Weights::F32 { rows, .. } => *rows,
            Weights::Packed(p) => p.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weights::Rows { cols, .. } | Weights::F32 { cols, .. } => *cols,
            Weights::Packed(p) => p.cols(),
        }
    }

    /// Elements per block along a row: a range of columns read at once starts at a multiple of it.
    fn block(&self) -> usize {
        match self {
            Weights::Rows { kind, .. } => kind.block_elems(),
            Weights::Packed(p) => p.kind().block_elems(),
            Weights::F32 { .. } => 1,
        }
    }

    fn check(&self) {
        let (rows, cols) = (self.rows(), self.cols());
        match self {
            Weights::Rows { kind, bytes, .. } => {
                assert!(cols.is_multiple_of(kind.block_elems()), "{kind:?} rows of {cols} elements");
                assert_eq!(bytes.len(), rows * kind.row_bytes(cols), "weight bytes");
            }
            Weights::F32 { values, .. } => assert_eq!(values.len(), rows * cols, "weight length"),
            Weights::Packed(_) => {}
        }
    }

    /// Row `r`'s columns `c0..c1` as f32 into `out[..c1 - c0]`; `c0` is a multiple of [`Weights::block`], `c1`
    /// one too or the row's end.
    fn row_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        let out = &mut out[..c1 - c0];
        match *self {
            Weights::Rows { kind, bytes, cols, .. } => {
                let row = &bytes[r * kind.row_bytes(cols)..][..kind.row_bytes(cols)];
                let (b0, b1) = (c0 / kind.block_elems(), c1 / kind.block_elems());
                let part = &row[b0 * kind.block_bytes()..b1 * kind.block_bytes()];
                blocks::dequantize_slice(kind, part, out);
            }
            Weights::Packed(p) => p.dequantize_blocks(r, c0 / blocks::QK, c1 / blocks::QK, out),
            Weights::F32 { values, cols, .. } => out.copy_from_slice(&values[r * cols + c0..r * cols + c1]),
        }
    }
}

/// `y = x·Wᵀ`: `x` is `m × cols` (row-major), `y` is `m × rows`.
pub fn matmul_wt(w: Weights<'_>, x: &[f32], m: usize, y: &mut [f32]) {
    w.check();
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "activation length");
    assert_eq!(y.len(), m * n, "output length");
    // B[kk][j] = W[j][kk]: each output row j of the task is dequantized over the panel's reduction range and
    // scattered into its lane of its micro-panel.
    gemm(x, m, k, n, y, 1, &|j0, j1, k0, k1, panel, row| {
        let kc = k1 - k0;
        if let Weights::Packed(p) = w {
            // A group's 8 rows are 8 lanes of a micro-panel (tasks start at multiples of 16 rows).
            for g in j0 / GROUP..j1.div_ceil(GROUP) {
                let (s, lane) = ((g * GROUP - j0) / NR, (g * GROUP - j0) % NR);
                for b in k0 / blocks::QK..k1 / blocks::QK {
                    let at = s * kc * NR + (b * blocks::QK - k0) * NR + lane;
                    p.dequantize_column(g, b, &mut panel[at..], NR);
                }
            }
            return;
        }
        // Eight rows at a time fill eight lanes of a micro-panel: each 8 × 8 square of them is transposed in
        // registers rather than written a float at a time (tasks start at multiples of 16 rows).
        let mut j = j0;
        let kc8 = kc - kc % GROUP;
        while j + GROUP <= j1 {
            let rows8 = &mut row[..GROUP * kc];
            for (c, r) in rows8.chunks_exact_mut(kc).enumerate() {
                w.row_range(j + c, k0, k1, r);
            }
            let (s, lane) = ((j - j0) / NR, (j - j0) % NR);
            let micro = &mut panel[s * kc * NR..(s + 1) * kc * NR];
            for kk in (0..kc8).step_by(GROUP) {
                transpose8(&rows8[kk..], kc, &mut micro[kk * NR + lane..], NR, GROUP);
            }
            for kk in kc8..kc {
                for c in 0..GROUP {
                    micro[kk * NR + lane + c] = rows8[c * kc + kk];
                }
            }
            j += GROUP;
        }
        for j in j..j1 {
            w.row_range(j, k0, k1, row);
            let (s, lane) = ((j - j0) / NR, (j - j0) % NR);
            let micro = &mut panel[s * kc * NR..(s + 1) * kc * NR];
            for (kk, v) in row[..kc].iter().enumerate() {
                micro[kk * NR + lane] = *v;
            }
        }
    });
}

/// `dx = dy·W`: `dy` is `m × rows` (row-major), `dx` is `m × cols`.
pub fn matmul_w(w: Weights<'_>, dy: &[f32], m: usize, dx: &mut [f32]) {
    w.check();
    let (k, n) = (w.rows(), w.cols());
    assert_eq!(dy.len(), m * k, "gradient length");
    assert_eq!(dx.len(), m * n, "output length");
    // B[kk][j] = W[kk][j]: each weight row of the panel's reduction range is dequantized over the task's columns
    // (a whole number of blocks) and cut into the micro-panels.
    gemm(dy, m, k, n, dx, w.block(), &|j0, j1, k0, k1, panel, row| {
        let kc = k1 - k0;
        if let Weights::Packed(p) = w {
            // A group's column of blocks (8 weight rows × 32 columns), turned into 8 rows of the micro-panels.
            let column = &mut row[..GROUP * blocks::QK];
            for g in k0 / GROUP..k1.div_ceil(GROUP) {
                for b in j0 / blocks::QK..j1 / blocks::QK {
                    p.dequantize_column(g, b, column, GROUP);
                    let lanes = GROUP.min(k1 - g * GROUP);
                    let kk = g * GROUP - k0;
                    for e0 in (0..blocks::QK).step_by(GROUP) {
                        // 8 elements × 8 rows, transposed into 8 rows of 8 consecutive columns.
                        let j = b * blocks::QK + e0 - j0;
                        let at = ((j / NR) * kc + kk) * NR + j % NR;
                        transpose8(&column[e0 * GROUP..(e0 + GROUP) * GROUP], GROUP, &mut panel[at..], NR, lanes);
                    }
                }
            }
            return;
        }
        for kk in k0..k1 {
            w.row_range(kk, j0, j1, row);
            for (s, chunk) in row[..j1 - j0].chunks(NR).enumerate() {
                panel[(s * kc + kk - k0) * NR..][..chunk.len()].copy_from_slice(chunk);
            }
        }
    });
}

/// `out[r · stride + c] = block[c · block_stride + r]` for an 8 × 8 square (8 runs of 8 floats, `block_stride`
/// apart), rows `r < rows`.
fn transpose8(block: &[f32], block_stride: usize, out: &mut [f32], stride: usize, rows: usize) {
    assert!(block_stride >= GROUP && block.len() >= 7 * block_stride + GROUP);
    assert!(out.len() > (rows.max(1) - 1) * stride + 7);
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::simd() && rows == GROUP {
        // SAFETY: bounds asserted above.
        unsafe { avx2::transpose8(block.as_ptr(), block_stride, out.as_mut_ptr(), stride) };
        return;
    }
    for r in 0..rows {
        for c in 0..GROUP {
            out[r * stride + c] = block[c * block_stride + r];
        }
    }
}

/// Raw pointer to the output, written at disjoint tiles by the tasks of one product.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles, and `Pool::run` returns only after all of them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// A task's panel and the row it dequantizes through (reused: a product allocates nothing once warm).
#[derive(Default)]
struct Scratch {
    panel: Vec<f32>,
    row: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// What fills a panel: `fill(j0, j1, k0, k1, panel, row)` writes B[k0..k1][j0..j1] as micro-panels
/// `panel[s][kk][lane]` (`s` = (j − j0) / NR, `kk` from 0; lanes past `j1` are left as they are, zero).
type Fill<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// `C (m × n) = A (m × k) · B (k × n)`, B given through `fill`. A task takes a range of outputs (starting at a
/// multiple of `align`) and every row: each panel is dequantized once per product.
fn gemm(a: &[f32], m: usize, k: usize, n: usize, c: &mut [f32], align: usize, fill: &Fill<'_>) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // About three tasks per thread (so that uneven ones even out), at most NC outputs each.
    let pool = pool::pool();
    // Block widths are powers of two, so the larger of the two is a multiple of both.
    let unit = NR.max(align);
    let nc = n.div_ceil(pool.threads() * 3).clamp(1, NC.max(unit)).next_multiple_of(unit);
    let out = Out(c.as_mut_ptr());
    let a = a.as_ptr() as usize;
    let micro = micro_kernels();
    let tile = tile_rows(micro.len(), k);
    pool.run(n.div_ceil(nc), &|task| {
        let c = out;
        let (j0, j1) = (task * nc, ((task + 1) * nc).min(n));
        let (t0, t1) = (0, m);
        let panels = (j1 - j0).div_ceil(NR);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            s.panel.resize(panels * KC * NR, 0.0);
            s.row.resize((GROUP * KC).max(nc), 0.0);
            for k0 in (0..k).step_by(KC) {
                let k1 = (k0 + KC).min(k);
                let kc = k1 - k0;
                let panel = &mut s.panel[..panels * kc * NR];
                if (j1 - j0) % NR != 0 {
                    // The last micro-panel's lanes past n: zeros, so that they add nothing (never stored).
                    panel[(panels - 1) * kc * NR..].fill(0.0);
                }
                fill(j0, j1, k0, k1, panel, &mut s.row);
                for p in 0..panels {
                    let (jp, nr) = (j0 + p * NR, NR.min(j1 - j0 - p * NR));
                    let b = panel[p * kc * NR..].as_ptr();
                    let mut t = t0;
                    while t < t1 {
                        let rows = tile.min(t1 - t);
                        // SAFETY: rows t..t + rows of A have k ≥ k1 columns; the tile of C at (t, jp) of `rows ×
                        // nr` is inside C and written by this task only; the micro-panel holds kc × NR floats.
                        unsafe {
                            let ap = (a as *const f32).add(t * k + k0);
                            let cp = c.0.add(t * n + jp);
                            micro[rows - 1](ap, k, b, NR, kc, cp, n, nr, k0 > 0);
                        }
                        t += rows;
                    }
                }
            }
        });
    });
}

/// `C[0..rows][0..nr] (+)= A[0..rows][0..kc] · B[0..kc][0..NR]`: A rows `lda` apart, B rows `ldb` apart, C rows
/// `ldc` apart; `add` accumulates into C instead of overwriting it.
type Micro = unsafe fn(*const f32, usize, *const f32, usize, usize, *mut f32, usize, usize, bool);

/// `C[0..m][0..n] (+)= A[0..m][0..k] · B[0..k][0..n]` (`n` a multiple of [`NR`]) through the micro-kernels,
/// [`NR`] columns × the micro-kernels' rows at a time: A rows `lda` apart, B rows `ldb` apart, C rows `ldc` apart; `add`
/// accumulates into C. Each output is summed over `k` in order, as in the products above.
///
/// # Safety
/// A's `m` rows hold `k` floats, B's `k` rows `n`, C's `m` rows `n`, at the strides given.
#[allow(clippy::too_many_arguments)] // the product's operands, with the sizes
pub(super) unsafe fn product_wide(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    m: usize,
    n: usize,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    debug_assert!(n.is_multiple_of(NR));
    let micro = micro_kernels();
    let tile = tile_rows(micro.len(), lda);
    for j in (0..n).step_by(NR) {
        for t in (0..m).step_by(tile) {
            let rows = tile.min(m - t);
            micro[rows - 1](a.add(t * lda), lda, b.add(j), ldb, k, c.add(t * ldc + j), ldc, NR, add);
        }
    }
}

/// Rows per tile for A rows `lda` floats apart: the micro-kernels' tile, but at most 6 rows where the stride is
/// a multiple of 2 KiB — a tile's rows are read side by side, and 12 rows 4 KiB apart are 12 lines of one
/// 8-way L1 set (measured: 2048-wide products at 110–115 GFLOP/s with 12 rows, 150 with 6, 180–200 for 576-wide
/// ones with 12).
fn tile_rows(kernels: usize, lda: usize) -> usize {
    if (lda * 4).is_multiple_of(2048) {
        kernels.min(6)
    } else {
        kernels
    }
}

/// The micro-kernels of this CPU, one per row count from 1 to their tile's rows (the slice's length): 6
/// rows, or 12 with AVX-512.
fn micro_kernels() -> &'static [Micro] {
    macro_rules! by_rows {
        ($($m:ident)::+) => {
            &[$($m)::+::<1>, $($m)::+::<2>, $($m)::+::<3>, $($m)::+::<4>, $($m)::+::<5>, $($m)::+::<6>]
        };
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if super::simd() {
        if super::avx512() {
            use avx512::micro;
            return &[
                micro::<1>,
                micro::<2>,
                micro::<3>,
                micro::<4>,
                micro::<5>,
                micro::<6>,
                micro::<7>,
                micro::<8>,
                micro::<9>,
                micro::<10>,
                micro::<11>,
                micro::<MR_AVX512>,
            ];
        }
        return by_rows!(avx2::micro);
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd() {
        return by_rows!(neon::micro);
    }
    by_rows!(micro)
}

/// The portable micro-kernel (plain multiply-adds the compiler can vectorize).
#[allow(clippy::too_many_arguments)] // the micro-kernel's operands, as BLIS passes them
unsafe fn micro<const M: usize>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    add: bool,
) {
    let mut acc = [[0f32; NR]; M];
    for kk in 0..kc {
        let bk = std::slice::from_raw_parts(b.add(kk * ldb), NR);
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = *a.add(i * lda + kk);
            for (o, bv) in acc.iter_mut().zip(bk) {
                *o += av * bv;
            }
        }
    }
    store(&acc, c, ldc, nr, add);
}

/// Writes (or adds) a tile's first `nr` columns into C.
#[inline(always)]
unsafe fn store<const M: usize>(acc: &[[f32; NR]; M], c: *mut f32, ldc: usize, nr: usize, add: bool) {
    for (i, acc) in acc.iter().enumerate() {
        let row = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        if add {
            row.iter_mut().zip(acc).for_each(|(o, v)| *o += v);
        } else {
            row.copy_from_slice(&acc[..nr]);
        }
    }
}

/// The micro-kernel on ARM: the 6 × 16 tile as 24 four-lane accumulators, one multiply-add by a scalar
/// (`fmla` by element) per row and vector.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::NR;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    #[allow(clippy::too_many_arguments)] // the micro-kernel's operands, as BLIS passes them
    pub unsafe fn micro<const M: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        add: bool,
    ) {
        let mut acc = [[vdupq_n_f32(0.0); 4]; M];
        for kk in 0..kc {
            let bp = b.add(kk * ldb);
            let bv = [vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8)), vld1q_f32(bp.add(12))];
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = *a.add(i * lda + kk);
                for (acc, bv) in acc.iter_mut().zip(&bv) {
                    *acc = vfmaq_n_f32(*acc, *bv, av);
                }
            }
        }
        let mut tile = [[0f32; NR]; M];
        for (row, acc) in tile.iter_mut().zip(&acc) {
            for (j, v) in acc.iter().enumerate() {
                vst1q_f32(row.as_mut_ptr().add(4 * j), *v);
            }
        }
        super::store(&tile, c, ldc, nr, add);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2 {
    use super::NR;
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// `out[r · stride + c] = block[c · block_stride + r]` for an 8 × 8 square (unpack, shuffle, swap halves).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn transpose8(block: *const f32, block_stride: usize, out: *mut f32, stride: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(block.add(block_stride * i)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        let rows = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        for (i, v) in rows.into_iter().enumerate() {
            _mm256_storeu_ps(out.add(i * stride), v);
        }
    }

    /// The 6 × 16 tile (or fewer rows): per reduction step two loads of B, one broadcast of each row's
    /// activation, two FMAs per row.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)] // the micro-kernel's operands, as BLIS passes them
    pub unsafe fn micro<const M: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        add: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(kk * ldb));
            let b1 = _mm256_loadu_ps(b.add(kk * ldb + 8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let row = c.add(i * ldc);
            if nr == NR {
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if add {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
                }
                _mm256_storeu_ps(row, v0);
                _mm256_storeu_ps(row.add(8), v1);
            } else {
                let mut tile = [[0f32; NR]; 1];
                _mm256_storeu_ps(tile[0].as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(tile[0].as_mut_ptr().add(8), acc[1]);
                super::store(&tile, row, ldc, nr, add);
            }
        }
    }
}

/// The micro-kernel with AVX-512: a 12 × 16 tile, one 16-lane register per row (12 accumulators of the 32
/// registers), so a reduction step is one load of B and 12 multiply-adds with the row's activation broadcast
/// from memory — half the instructions per multiply-add of the 6 × 16 AVX2 tile (on Zen 4, which runs a
/// 512-bit operation as two 256-bit halves, the arithmetic peak is the same; what the wider tile saves is the
/// issue slots and loads around it). Each output is summed over `k` in the same order, by the same fused
/// multiply-adds, as in the AVX2 kernel: the results are the same bits.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx512 {
    use super::NR;
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512f")]
    #[allow(clippy::too_many_arguments)] // the micro-kernel's operands, as BLIS passes them
    pub unsafe fn micro<const M: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        nr: usize,
        add: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); M];
        for kk in 0..kc {
            let bv = _mm512_loadu_ps(b.add(kk * ldb));
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i * lda + kk)), bv, *acc);
            }
        }
        // The first `nr` lanes of each row (all 16 but at the matrix's edge).
        let lanes: __mmask16 = if nr >= NR { 0xffff } else { (1u16 << nr) - 1 };
        for (i, acc) in acc.iter().enumerate() {
            let row = c.add(i * ldc);
            let v = if add { _mm512_add_ps(*acc, _mm512_maskz_loadu_ps(lanes, row)) } else { *acc };
            _mm512_mask_storeu_ps(row, lanes, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::tests::{weights, KINDS};
    use candle_core::quantized::GgmlDType;

    /// The AVX-512 tile gives the AVX2 tile's bits (the same fused multiply-adds in the same order), for whole and
    /// partial tiles, written and added.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn avx512_tiles_equal_the_avx2_ones() {
        if !super::super::avx512() {
            eprintln!("AVX-512 not in use (not on this CPU, or BILLION_CPU_KERNELS): the AVX2 micro-kernel is");
            return;
        }
        let (m, k) = (12, 300);
        let a = crate::testing::seeded_randn(31, 0.0, 1.0, &[m * k]).to_vec1::<f32>().unwrap();
        let b = crate::testing::seeded_randn(32, 0.0, 1.0, &[k * NR]).to_vec1::<f32>().unwrap();
        let start = crate::testing::seeded_randn(33, 0.0, 1.0, &[m * NR]).to_vec1::<f32>().unwrap();
        for (nr, add) in [(NR, false), (NR, true), (11, false), (11, true)] {
            let (mut wide, mut narrow) = (start.clone(), start.clone());
            // SAFETY: A holds m rows of k, B k rows of NR, C m rows of NR.
            unsafe {
                avx512::micro::<12>(a.as_ptr(), k, b.as_ptr(), NR, k, wide.as_mut_ptr(), NR, nr, add);
                for half in 0..2 {
                    let (ap, cp) = (a[half * 6 * k..].as_ptr(), narrow[half * 6 * NR..].as_mut_ptr());
                    avx2::micro::<6>(ap, k, b.as_ptr(), NR, k, cp, NR, nr, add);
                }
            }
            assert_eq!(
                wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                narrow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "nr {nr} add {add}"
            );
        }
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0), "{what} at {i}: {g} vs {w}");
        }
    }

    /// Both shapes equal the f64 product of the dequantized weights, for every stored form, sizes off every
    /// tile (rows, outputs, reduction), and a reduction longer than one panel.
    #[test]
    fn products_equal_the_dequantized_ones() {
        for (kind, g) in KINDS {
            for (rows, cols) in [(37, 512), (70, 768)] {
                let (bytes, dense) = weights(g, rows, cols, 11);
                let packed = PackedMatrix::packs(kind).then(|| PackedMatrix::pack(kind, &bytes, rows, cols));
                let mut forms = vec![
                    Weights::Rows { kind, bytes: &bytes, rows, cols },
                    Weights::F32 { values: &dense, rows, cols },
                ];
                if let Some(p) = &packed {
                    forms.push(Weights::Packed(p));
                }
                for m in [1, 5, 13, 100] {
                    let x = crate::testing::seeded_randn(m as u64, 0.0, 1.0, &[m, cols]);
                    let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let dy = crate::testing::seeded_randn(50 + m as u64, 0.0, 1.0, &[m, rows]);
                    let dy = dy.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let mut want_y = vec![0f64; m * rows];
                    let mut want_dx = vec![0f64; m * cols];
                    for t in 0..m {
                        for r in 0..rows {
                            for c in 0..cols {
                                let w = dense[r * cols + c] as f64;
                                want_y[t * rows + r] += x[t * cols + c] as f64 * w;
                                want_dx[t * cols + c] += dy[t * rows + r] as f64 * w;
                            }
                        }
                    }
                    for w in &forms {
                        let mut y = vec![f32::NAN; m * rows];
                        matmul_wt(*w, &x, m, &mut y);
                        close(&y, &want_y, &format!("{kind:?} x·Wᵀ m {m} {rows}×{cols}"));
                        let mut dx = vec![f32::NAN; m * cols];
                        matmul_w(*w, &dy, m, &mut dx);
                        close(&dx, &want_dx, &format!("{kind:?} dy·W m {m} {rows}×{cols}"));
                    }
                }
            }
        }
    }

    /// Half and f32 rows whose width is off the 8 × 8 squares the panels are filled by (a scalar tail), with
    /// more rows than one square, and half rows at an odd byte offset (converted one by one).
    #[test]
    fn rows_off_the_squares_and_unaligned_halves_multiply_exactly() {
        for (kind, g) in [(WeightKind::F16, GgmlDType::F16), (WeightKind::BF16, GgmlDType::BF16)] {
            let (rows, cols, m) = (21, 100, 7);
            let (bytes, dense) = weights(g, rows, cols, 3);
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let x =
                crate::testing::seeded_randn(4, 0.0, 1.0, &[m, cols]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut want = vec![0f64; m * rows];
            for t in 0..m {
                for r in 0..rows {
                    want[t * rows + r] = (0..cols).map(|c| x[t * cols + c] as f64 * dense[r * cols + c] as f64).sum();
                }
            }
            let forms = [
                Weights::Rows { kind, bytes: &bytes, rows, cols },
                Weights::Rows { kind, bytes: &shifted[1..], rows, cols },
                Weights::F32 { values: &dense, rows, cols },
            ];
            let mut first: Option<Vec<f32>> = None;
            for w in forms {
                let mut y = vec![f32::NAN; m * rows];
                matmul_wt(w, &x, m, &mut y);
                close(&y, &want, &format!("{kind:?} {rows}×{cols}"));
                // The same floats in, the same order of additions: equal to the bit whatever the storage.
                match &first {
                    Some(f) => assert!(f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?}"),
                    None => first = Some(y),
                }
            }
        }
    }

    /// A packed group's column reads as candle's dequantization of the same blocks, bit for bit (the SIMD path
    /// where the CPU has it).
    #[test]
    fn packed_columns_dequantize_exactly() {
        for (kind, g) in KINDS.into_iter().filter(|(k, _)| PackedMatrix::packs(*k)) {
            let (rows, cols) = (13, 96);
            let (bytes, dense) = weights(g, rows, cols, 21);
            let p = PackedMatrix::pack(kind, &bytes, rows, cols);
            let mut out = vec![f32::NAN; 32 * 10];
            for grp in 0..2 {
                for b in 0..3 {
                    p.dequantize_column(grp, b, &mut out, 10);
                    for lane in 0..GROUP {
                        let r = grp * GROUP + lane;
                        for e in 0..32 {
                            let got = out[e * 10 + lane];
                            if r < rows {
                                let want = dense[r * cols + b * 32 + e];
                                assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} row {r} col {}", b * 32 + e);
                            } else {
                                assert_eq!(got, 0.0, "{kind:?} padding row {r}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transposes_8_by_8() {
        let block: Vec<f32> = (0..64).map(|i| i as f32).collect();
        for rows in [8, 5] {
            let mut out = vec![-1f32; 8 * 10];
            transpose8(&block, GROUP, &mut out, 10, rows);
            for r in 0..8 {
                for c in 0..8 {
                    let want = if r < rows { block[c * 8 + r] } else { -1.0 };
                    assert_eq!(out[r * 10 + c], want, "rows {rows} r {r} c {c}");
                }
            }
        }
    }

    /// A row's result is the same bits whether it is multiplied alone or among others.
    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        let (rows, cols) = (50, 640);
        let (bytes, _) = weights(GgmlDType::Q4_1, rows, cols, 3);
        let w = Weights::Rows { kind: WeightKind::Q4_1, bytes: &bytes, rows, cols };
        let m = 130;
        let x = crate::testing::seeded_randn(4, 0.0, 1.0, &[m, cols]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut all = vec![0f32; m * rows];
        matmul_wt(w, &x, m, &mut all);
        for t in [0, 7, 97, 129] {
            let mut one = vec![0f32; rows];
            matmul_wt(w, &x[t * cols..(t + 1) * cols], 1, &mut one);
            assert_eq!(one, all[t * rows..(t + 1) * rows], "row {t}");
        }
        let dy = crate::testing::seeded_randn(5, 0.0, 1.0, &[m, rows]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut all = vec![0f32; m * cols];
        matmul_w(w, &dy, m, &mut all);
        for t in [0, 64, 129] {
            let mut one = vec![0f32; cols];
            matmul_w(w, &dy[t * rows..(t + 1) * rows], 1, &mut one);
            assert_eq!(one, all[t * cols..(t + 1) * cols], "row {t}");
        }
    }
}
