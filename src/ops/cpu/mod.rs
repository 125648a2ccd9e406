//! Our CPU matrix kernels for weights kept as they were stored: GGML blocks (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K)
//! multiplied against activations quantized once per row to 8 bits, and f16/bf16 weights widened in
//! registers. [`matmul`] (row layout) and [`matmul_packed`] (8-row groups) serve one row (decode) and many
//! (in tiles of 4 tokens, so that a block of weights is unpacked once for 4 tokens), split over the kernel
//! threads by output rows. Which passes use them is `model::linear`'s decision.
//!
//! The SIMD kernel is chosen once per process from what the CPU reports (AVX2+FMA+F16C on x86); every other
//! CPU runs the portable kernels of `blocks.rs`, which the SIMD ones are tested against.

// `let out = out;` in the task closures captures the whole `Out` (Sync), not its raw pointer field.
#![allow(clippy::redundant_locals)]

pub mod attention;
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod avx2;
pub mod blocks;
pub mod gemm;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod packed;
pub mod pool;
pub mod train_attention;

pub use blocks::ActivationKind;
pub use blocks::WeightKind;
use blocks::{Activations, Q8Block, Q8KBlock};
pub use packed::PackedMatrix;
use packed::GROUP;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Tokens per tile of the prefill kernels.
const TILE: usize = 4;
/// Output rows per task of a prefill product (the weight rows a task streams while it walks the tokens).
const PREFILL_ROWS: usize = 16;
/// Tokens per task of a prefill product (so that one task's activations stay in the core's cache).
const PREFILL_TOKENS: usize = 64;

/// One weight row against 1 or [`TILE`] activation rows; `len` is blocks (quantized) or columns (half).
type Tile1 = unsafe fn(*const u8, usize, &[*const u8; 1]) -> [f32; 1];
type TileN = unsafe fn(*const u8, usize, &[*const u8; TILE]) -> [f32; TILE];

#[derive(Clone, Copy)]
struct Kernel {
    one: Tile1,
    tile: TileN,
}

/// Which kernels this process runs: `avx512-vnni` or `avx-vnni` (the AVX2 kernels with their integer sums
/// through VNNI), `avx2`, `neon` (with `+dotprod` where the packed 8-bit products use it) or `portable`.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "aarch64")]
    if simd() {
        return if neon::dotprod() { "neon+dotprod" } else { "neon" };
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd() {
        return match vnni() {
            Vnni::Avx512 => "avx512-vnni",
            Vnni::Avx => "avx-vnni",
            Vnni::None => "avx2",
        };
    }
    "portable"
}

/// Does `BILLION_CPU_KERNELS` (read once) ask for these kernels: `portable`, or `avx2` on a CPU with more?
fn kernels_asked(name: &str) -> bool {
    static ASKED: OnceLock<Option<String>> = OnceLock::new();
    ASKED.get_or_init(|| std::env::var("BILLION_CPU_KERNELS").ok()).as_deref() == Some(name)
}

fn simd() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        if kernels_asked("portable") {
            return false;
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            avx2::available()
        }
        // NEON is part of every aarch64 CPU.
        #[cfg(target_arch = "aarch64")]
        {
            true
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// The x86 integer dot-product instructions the kernels use on top of AVX2.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vnni {
    Avx512,
    Avx,
    None,
}

/// VNNI where the CPU has it and `BILLION_CPU_KERNELS` does not ask for `avx2` (or `portable`).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn vnni() -> Vnni {
    static VNNI: OnceLock<Vnni> = OnceLock::new();
    *VNNI.get_or_init(|| {
        if !simd() || kernels_asked("avx2") {
            Vnni::None
        } else if avx2::avx512_vnni::available() {
            Vnni::Avx512
        } else if avx2::avx_vnni::available() {
            Vnni::Avx
        } else {
            Vnni::None
        }
    })
}

/// The f32 GEMM's AVX-512 micro-kernel, where the CPU has it and `BILLION_CPU_KERNELS` does not ask for `avx2`
/// (or `portable`).
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| simd() && !kernels_asked("avx2") && is_x86_feature_detected!("avx512f"))
}

/// Are the 8-bit kernels' products fast enough that a prefill of Q8_0 weights is better through them than
/// through the f32 GEMM over dequantized tiles? With VNNI (one instruction per 4 byte products).
pub fn fast_integer_products() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        vnni() != Vnni::None
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// The portable kernel with the SIMD kernels' signature.
unsafe fn portable<const N: usize>(kind: WeightKind, row: *const u8, len: usize, x: &[*const u8; N]) -> [f32; N] {
    let row = std::slice::from_raw_parts(row, kind.row_bytes(len * kind.block_elems()));
    let mut out = [0f32; N];
    for (o, &x) in out.iter_mut().zip(x) {
        // SAFETY: the caller passes activation rows of `len` blocks (or columns) of the kind's activation type.
        let act = match kind.activation() {
            ActivationKind::Q8 => Activations::Q8(std::slice::from_raw_parts(x as *const Q8Block, len)),
            ActivationKind::Q8K => Activations::Q8K(std::slice::from_raw_parts(x as *const Q8KBlock, len)),
            ActivationKind::F32 => Activations::F32(std::slice::from_raw_parts(x as *const f32, len)),
        };
        *o = blocks::dot_row(kind, row, act);
    }
    out
}

macro_rules! portable_kernels {
    ($($kind:ident),*) => {
        fn portable_kernel(kind: WeightKind) -> Kernel {
            match kind {
                $(WeightKind::$kind => Kernel {
                    one: |r, l, x| unsafe { portable::<1>(WeightKind::$kind, r, l, x) },
                    tile: |r, l, x| unsafe { portable::<TILE>(WeightKind::$kind, r, l, x) },
                },)*
            }
        }
    };
}
portable_kernels!(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, F16, BF16);

/// The K-quants' row kernels of a SIMD module (`dot_q45k`, `dot_q6k`), or `None` for another type.
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! k_quant_kernels {
    ($isa:ident, $kind:expr) => {
        match $kind {
            WeightKind::Q4K => Some(Kernel { one: $isa::dot_q45k::<false, 1>, tile: $isa::dot_q45k::<false, TILE> }),
            WeightKind::Q5K => Some(Kernel { one: $isa::dot_q45k::<true, 1>, tile: $isa::dot_q45k::<true, TILE> }),
            WeightKind::Q6K => Some(Kernel { one: $isa::dot_q6k::<1>, tile: $isa::dot_q6k::<TILE> }),
            _ => None,
        }
    };
}

fn kernel(kind: WeightKind) -> Kernel {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd() {
        use packed::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
        if let Some(k) = x86_k_quant_kernel(kind, vnni()) {
            return k;
        }
        use avx2::dot_q8;
        return match kind {
            WeightKind::Q4_0 => Kernel { one: dot_q8::<Q4_0, 1>, tile: dot_q8::<Q4_0, TILE> },
            WeightKind::Q4_1 => Kernel { one: dot_q8::<Q4_1, 1>, tile: dot_q8::<Q4_1, TILE> },
            WeightKind::Q5_0 => Kernel { one: dot_q8::<Q5_0, 1>, tile: dot_q8::<Q5_0, TILE> },
            WeightKind::Q5_1 => Kernel { one: dot_q8::<Q5_1, 1>, tile: dot_q8::<Q5_1, TILE> },
            WeightKind::Q8_0 => Kernel { one: dot_q8::<Q8_0, 1>, tile: dot_q8::<Q8_0, TILE> },
            // With SIMD, half weights go through `matmul_half` (several rows per tile), never this table.
            _ => portable_kernel(kind),
        };
    }
    // On ARM the K-quants' rows (the 32-wide types are packed into groups, see `group_kernel`).
    #[cfg(target_arch = "aarch64")]
    if simd() && neon::dotprod() {
        if let Some(k) = k_quant_kernels!(neon, kind) {
            return k;
        }
    }
    portable_kernel(kind)
}

/// The activations of a product, converted once (reused buffers: a decode step allocates nothing here).
#[derive(Default)]
struct Scratch {
    q8: Vec<Q8Block>,
    q8k: Vec<Q8KBlock>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Raw pointer to the output, written at disjoint places by the tasks of one product.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements, and `Pool::run` returns only after all of them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Can the kernels take this weight with rows of `cols` elements?
pub fn supports(kind: WeightKind, cols: usize) -> bool {
    cols.is_multiple_of(kind.block_elems()) && cols > 0
}

/// `y[t, r] = Σ_c W[r, c] · x[t, c]` for `t < n`: `w` holds `rows` rows of `cols` elements of `kind` (as
/// stored in GGUF), `x` is `n × cols` f32, `y` is `n × rows`.
pub fn matmul(kind: WeightKind, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    assert!(supports(kind, cols), "{kind:?} rows of {cols} elements");
    assert_eq!(w.len(), rows * kind.row_bytes(cols), "weight bytes");
    assert_eq!(x.len(), n * cols, "activation length");
    assert_eq!(y.len(), n * rows, "output length");
    if n == 0 || rows == 0 {
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
    if simd() && kind.activation() == ActivationKind::F32 {
        return matmul_half(kind == WeightKind::BF16, w, rows, cols, x, n, y);
    }
    with_activations(kind, x, n, cols, |act, act_stride| {
        let len = cols / kind.block_elems();
        let k = kernel(kind);
        let row_bytes = kind.row_bytes(cols);
        let out = Out(y.as_mut_ptr());
        let wp = w.as_ptr() as usize;
        let xrow = |t: usize| (act + t * act_stride) as *const u8;
        spread(rows, n, 8, PREFILL_ROWS, &|rs, t, count| {
            let out = out;
            for r in rs {
                let w = (wp + r * row_bytes) as *const u8;
                // SAFETY: r < rows and t + count ≤ n, so rows, activations and outputs are inside their buffers.
                if count == TILE {
                    let v = unsafe { (k.tile)(w, len, &[xrow(t), xrow(t + 1), xrow(t + 2), xrow(t + 3)]) };
                    for (i, v) in v.into_iter().enumerate() {
                        unsafe { *out.0.add((t + i) * rows + r) = v };
                    }
                } else {
                    unsafe { *out.0.add(t * rows + r) = (k.one)(w, len, &[xrow(t)])[0] };
                }
            }
        });
    });
}

/// Spreads one product over the kernel threads and calls `f(units, t, count)` for each tile: `units` a range
/// of the weight's units (rows, or 8-row groups), `count` tokens from `t` on (1, or [`TILE`] while that many
/// are left in the task's tokens). Decode (`n` = 1) runs of a multiple of `decode_min` units, enough of them
/// to even out the threads; prefill tasks of `prefill_units` units × [`PREFILL_TOKENS`] tokens, consecutive
/// tasks sharing a token range so that the threads stream different weights over the same activations.
fn spread(
    units: usize,
    n: usize,
    decode_min: usize,
    prefill_units: usize,
    f: &(dyn Fn(std::ops::Range<usize>, usize, usize) + Sync),
) {
    let pool = pool::pool();
    if n == 1 {
        let per = units.div_ceil(pool.threads() * 8).max(decode_min).next_multiple_of(decode_min);
        pool.run(units.div_ceil(per), &|task| f(task * per..((task + 1) * per).min(units), 0, 1));
        return;
    }
    let unit_tasks = units.div_ceil(prefill_units);
    pool.run(unit_tasks * n.div_ceil(PREFILL_TOKENS), &|task| {
        let (tt, ut) = (task / unit_tasks, task % unit_tasks);
        let (t1, u1) = (((tt + 1) * PREFILL_TOKENS).min(n), ((ut + 1) * prefill_units).min(units));
        let mut t = tt * PREFILL_TOKENS;
        while t < t1 {
            let count = if t + TILE <= t1 { TILE } else { 1 };
            f(ut * prefill_units..u1, t, count);
            t += count;
        }
    });
}

/// `v` plus `w[k] · x[k]` for the columns `from..cols` a SIMD loop over the half-precision row `row` left,
/// added one by one in order.
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn half_row_tail<const BF: bool>(row: *const u8, x: *const f32, from: usize, cols: usize, mut v: f32) -> f32 {
    for k in from..cols {
        let h = (row as *const u16).add(k).read_unaligned();
        let wv = if BF { f32::from_bits((h as u32) << 16) } else { half::f16::from_bits(h).to_f32() };
        v += wv * *x.add(k);
    }
    v
}

/// `R` half-precision rows against `N` f32 rows (2 × 1, 2 × 4, or one row against either); `put(r, t, value)`.
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
fn half_tile(bf: bool, rows: &[*const u8], cols: usize, x: &[*const u8], put: &mut impl FnMut(usize, usize, f32)) {
    macro_rules! tile {
        ($r:literal, $n:literal) => {{
            let rr: [*const u8; $r] = rows.try_into().expect("row count");
            let xx: [*const u8; $n] = x.try_into().expect("token count");
            #[cfg(not(target_arch = "aarch64"))]
            use avx2 as isa;
            #[cfg(target_arch = "aarch64")]
            use neon as isa;
            // SAFETY: every row holds `cols` halves and every activation row `cols` floats.
            let o = unsafe {
                if bf {
                    isa::gemv_half::<true, $r, $n>(&rr, cols, &xx)
                } else {
                    isa::gemv_half::<false, $r, $n>(&rr, cols, &xx)
                }
            };
            for (i, o) in o.iter().enumerate() {
                for (t, v) in o.iter().enumerate() {
                    put(i, t, *v);
                }
            }
        }};
    }
    match (rows.len(), x.len()) {
        (2, 1) => tile!(2, 1),
        (2, 4) => tile!(2, 4),
        (1, 4) => tile!(1, 4),
        (1, 1) => tile!(1, 1),
        other => unreachable!("half tile {other:?}"),
    }
}

/// [`matmul`] for f16 / bf16 weights with the SIMD kernels: 2 rows at a time against 1 token (decode) or 4
/// (prefill).
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
fn matmul_half(bf: bool, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    let out = Out(y.as_mut_ptr());
    let (wp, xp) = (w.as_ptr() as usize, x.as_ptr() as usize);
    let row = |r: usize| (wp + r * cols * 2) as *const u8;
    let xrow = |t: usize| (xp + t * cols * 4) as *const u8;
    let put = |r0: usize, t0: usize| {
        move |i: usize, t: usize, v: f32| {
            let out = out;
            // SAFETY: the tiles below stay inside rows × n.
            unsafe { *out.0.add((t0 + t) * rows + r0 + i) = v };
        }
    };
    // Two rows at a time against 1 or 4 tokens; single rows where fewer are left. Decode also measured with 4 rows
    // side by side and with 1 (2-core Zen 4, SmolLM2 F16): 54–56 and 57–59 tok/s on one thread against 70–73.
    spread(rows, n, 8, PREFILL_ROWS, &|rs, t, count| {
        let xs = [xrow(t), xrow(t + 1.min(count - 1)), xrow(t + 2.min(count - 1)), xrow(t + 3.min(count - 1))];
        let mut r = rs.start;
        while r < rs.end {
            let k = if r + 2 <= rs.end { 2 } else { 1 };
            let pair = [row(r), row(r + k - 1)];
            half_tile(bf, &pair[..k], cols, &xs[..count], &mut put(r, t));
            r += k;
        }
    });
}

/// Runs `f(activations, stride)` with the `n` rows of `x` in the form `kind` multiplies (quantized once per
/// row into this thread's reused buffers; f32 rows as they are): row t starts at `activations + t · stride`
/// bytes.
fn with_activations<R>(kind: WeightKind, x: &[f32], n: usize, cols: usize, f: impl FnOnce(usize, usize) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let pool = pool::pool();
        let (act, stride): (*const u8, usize) = match kind.activation() {
            ActivationKind::F32 => (x.as_ptr() as *const u8, cols * 4),
            ActivationKind::Q8 => {
                let nb = cols / blocks::QK;
                s.q8.resize(n * nb, Q8Block::default());
                quantize_rows(pool, x, cols, &mut s.q8, nb, blocks::quantize_q8);
                (s.q8.as_ptr() as *const u8, nb * std::mem::size_of::<Q8Block>())
            }
            ActivationKind::Q8K => {
                let nb = cols / blocks::QK_K;
                s.q8k.resize(n * nb, Q8KBlock::default());
                quantize_rows(pool, x, cols, &mut s.q8k, nb, blocks::quantize_q8k);
                (s.q8k.as_ptr() as *const u8, nb * std::mem::size_of::<Q8KBlock>())
            }
        };
        f(act as usize, stride)
    })
}

/// One packed group of 8 rows against 1 or [`TILE`] activation rows.
type Group1 = unsafe fn(*const u8, usize, &[*const u8; 1], &mut [[f32; GROUP]; 1]);
type GroupN = unsafe fn(*const u8, usize, &[*const u8; TILE], &mut [[f32; GROUP]; TILE]);

/// The packed group kernels of a SIMD module (`gemv_packed`), or `None` for a type without a packed layout.
#[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! group_kernels {
    ($isa:ident, $kind:expr) => {{
        use packed::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
        let pair: (Group1, GroupN) = match $kind {
            WeightKind::Q4_0 => ($isa::gemv_packed::<Q4_0, 1>, $isa::gemv_packed::<Q4_0, TILE>),
            WeightKind::Q4_1 => ($isa::gemv_packed::<Q4_1, 1>, $isa::gemv_packed::<Q4_1, TILE>),
            WeightKind::Q5_0 => ($isa::gemv_packed::<Q5_0, 1>, $isa::gemv_packed::<Q5_0, TILE>),
            WeightKind::Q5_1 => ($isa::gemv_packed::<Q5_1, 1>, $isa::gemv_packed::<Q5_1, TILE>),
            WeightKind::Q8_0 => ($isa::gemv_packed::<Q8_0, 1>, $isa::gemv_packed::<Q8_0, TILE>),
            _ => return None,
        };
        Some(pair)
    }};
}

fn group_kernel(kind: WeightKind) -> Option<(Group1, GroupN)> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if simd() {
        return x86_group_kernel(kind, vnni());
    }
    #[cfg(target_arch = "aarch64")]
    if simd() && neon::dotprod() {
        return group_kernels!(neon, kind);
    }
    let _ = kind;
    None
}

/// The x86 kernels of the integer products at one VNNI level: the packed groups' (none for a type without a
/// packed layout), and the K-quants' rows (none for another type). The CPU must have that level.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn x86_group_kernel(kind: WeightKind, level: Vnni) -> Option<(Group1, GroupN)> {
    use avx2::{avx512_vnni, avx_vnni};
    match level {
        Vnni::Avx512 => group_kernels!(avx512_vnni, kind),
        Vnni::Avx => group_kernels!(avx_vnni, kind),
        Vnni::None => group_kernels!(avx2, kind),
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn x86_k_quant_kernel(kind: WeightKind, level: Vnni) -> Option<Kernel> {
    use avx2::{avx512_vnni, avx_vnni};
    match level {
        Vnni::Avx512 => k_quant_kernels!(avx512_vnni, kind),
        Vnni::Avx => k_quant_kernels!(avx_vnni, kind),
        Vnni::None => k_quant_kernels!(avx2, kind),
    }
}

/// `y[r] = Σ_c W[r, c] · x[c]` for an f32 `W` (`rows × cols`, row-major): one row of activations, the
/// weight's rows spread over the kernel threads, four at a time so that their sums run side by side.
pub fn gemv_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight length");
    assert_eq!(x.len(), cols, "activation length");
    assert_eq!(y.len(), rows, "output length");
    let out = Out(y.as_mut_ptr());
    let per = rows.div_ceil(pool::pool().threads() * 4).max(16).next_multiple_of(4);
    pool::pool().run(rows.div_ceil(per), &|task| {
        let out = out;
        let (r0, r1) = (task * per, ((task + 1) * per).min(rows));
        let mut r = r0;
        while r < r1 {
            let take = (r1 - r).min(4);
            let mut sums = [0f32; 4];
            dot_rows(&w[r * cols..(r + take) * cols], cols, x, &mut sums[..take]);
            for (i, s) in sums[..take].iter().enumerate() {
                // SAFETY: r + i < rows; tasks own disjoint row ranges.
                unsafe { *out.0.add(r + i) = *s };
            }
            r += take;
        }
    });
}

/// `sums[i] = W[i] · x` for the (up to 4) rows of `w`, eight lanes of partial sums per row.
pub fn dot_rows(w: &[f32], cols: usize, x: &[f32], sums: &mut [f32]) {
    let n = sums.len();
    let mut acc = [[0f32; 8]; 4];
    let whole = cols / 8 * 8;
    for c in (0..whole).step_by(8) {
        let xs = &x[c..c + 8];
        for (i, acc) in acc.iter_mut().enumerate().take(n) {
            let ws = &w[i * cols + c..i * cols + c + 8];
            for l in 0..8 {
                acc[l] += ws[l] * xs[l];
            }
        }
    }
    for (i, s) in sums.iter_mut().enumerate() {
        let tail: f32 = (whole..cols).map(|c| w[i * cols + c] * x[c]).sum();
        *s = acc[i].iter().sum::<f32>() + tail;
    }
}

/// `y[t, r] = Σ_c W[r, c] · x[t, c]` for `t < n` with a packed `W` (`rows × cols`); `x` is `n × cols`, `y`
/// is `n × rows`.
pub fn matmul_packed(w: &PackedMatrix, x: &[f32], n: usize, y: &mut [f32]) {
    let (kind, rows, cols) = (w.kind(), w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "activation length");
    assert_eq!(y.len(), n * rows, "output length");
    if n == 0 || rows == 0 {
        return;
    }
    let nb = w.blocks();
    let group_bytes = nb * GROUP * kind.block_bytes();
    let groups = rows.div_ceil(GROUP);
    let simd = group_kernel(kind);
    with_activations(kind, x, n, cols, |act, stride| {
        let out = Out(y.as_mut_ptr());
        let base = w.data().as_ptr() as usize;
        // Results of group g for tokens t.. into y (the padded lanes of the last group are dropped).
        let store = |g: usize, t: usize, res: &[[f32; GROUP]]| {
            let out = out;
            for (i, r) in res.iter().enumerate() {
                for (lane, v) in r.iter().enumerate().take(rows - g * GROUP) {
                    // SAFETY: t + i < n and g·GROUP + lane < rows.
                    unsafe { *out.0.add((t + i) * rows + g * GROUP + lane) = *v };
                }
            }
        };
        let run = |g: usize, t: usize, count: usize| {
            let xrow = |i: usize| (act + (t + i) * stride) as *const u8;
            let gp = (base + g * group_bytes) as *const u8;
            match simd {
                Some((_, tile)) if count == TILE => {
                    let mut res = [[0f32; GROUP]; TILE];
                    // SAFETY: the group and the activation rows are inside their buffers.
                    unsafe { tile(gp, nb, &[xrow(0), xrow(1), xrow(2), xrow(3)], &mut res) };
                    store(g, t, &res);
                }
                Some((one, _)) => {
                    for i in 0..count {
                        let mut res = [[0f32; GROUP]; 1];
                        // SAFETY: as above.
                        unsafe { one(gp, nb, &[xrow(i)], &mut res) };
                        store(g, t + i, &res);
                    }
                }
                None => {
                    let mut xs: [&[Q8Block]; TILE] = [&[]; TILE];
                    for (i, x) in xs.iter_mut().enumerate().take(count) {
                        // SAFETY: each activation row holds `nb` blocks.
                        *x = unsafe { std::slice::from_raw_parts(xrow(i) as *const Q8Block, nb) };
                    }
                    let mut res = [[0f32; GROUP]; TILE];
                    w.group_portable(g, &xs[..count], &mut res[..count]);
                    store(g, t, &res[..count]);
                }
            }
        };
        spread(groups, n, 1, PREFILL_ROWS / GROUP, &|gs, t, count| gs.for_each(|g| run(g, t, count)));
    });
}

/// Quantizes each of the `n` activation rows into its `nb` blocks, the rows spread over the threads.
fn quantize_rows<B: Send>(
    pool: &pool::Pool,
    x: &[f32],
    cols: usize,
    out: &mut [B],
    nb: usize,
    f: fn(&[f32], &mut [B]),
) {
    let n = x.len() / cols;
    if n < 8 {
        for (xr, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)) {
            f(xr, o);
        }
        return;
    }
    let base = out.as_mut_ptr() as usize;
    let per = n.div_ceil(pool.threads() * 4);
    pool.run(n.div_ceil(per), &|task| {
        for t in task * per..((task + 1) * per).min(n) {
            // SAFETY: each task writes its own rows' blocks.
            let o = unsafe { std::slice::from_raw_parts_mut((base as *mut B).add(t * nb), nb) };
            f(&x[t * cols..(t + 1) * cols], o);
        }
    });
}

/// `e^x` for `x ≤ 0` (softmax after its maximum is taken out), to ~2 ulp, in operations the compiler
/// vectorizes: `x = k·ln 2 + r` with |r| ≤ ln 2 / 2, `e^r` by its Taylor series to r⁶, `2^k` built in the
/// exponent bits. Below −87 the result is 0 (f32 underflow).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // k as an integer from the bits (`shifted` keeps ROUND's exponent, so its mantissa counts k): integer
    // operations the compiler vectorizes, where `k as i32` (a saturating cast) is done one lane at a time.
    let ki = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((ki + 127) as u32) << 23);
    if x <= -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::blocks::*;
    use super::*;

    /// `e^x` within 2 ulp of the exact value over the whole range, and its `2^k` taken from the bits equals the
    /// saturating cast's to the bit.
    #[test]
    fn exp_nonpositive_is_exact_to_two_ulp() {
        for i in 0..=200_000 {
            let x = -88.0 * i as f32 / 200_000.0;
            let got = exp_nonpositive(x);
            if x <= -87.0 {
                assert_eq!(got, 0.0);
                continue;
            }
            let want = (x as f64).exp();
            assert!(((got as f64 - want) / want).abs() < 2.5e-7, "e^{x}: {got} vs {want}");
            let k = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let by_cast = f32::from_bits(((k as i32 + 127) as u32) << 23);
            let shifted = x * std::f32::consts::LOG2_E + 12_582_912.0;
            let by_bits =
                f32::from_bits(((shifted.to_bits() as i32 - 12_582_912f32.to_bits() as i32 + 127) as u32) << 23);
            assert_eq!(by_cast.to_bits(), by_bits.to_bits(), "2^k at {x}");
        }
    }

    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// Every weight type with a kernel, and candle's name for it.
    pub(super) const KINDS: [(WeightKind, GgmlDType); 10] = [
        (WeightKind::Q4_0, GgmlDType::Q4_0),
        (WeightKind::Q4_1, GgmlDType::Q4_1),
        (WeightKind::Q5_0, GgmlDType::Q5_0),
        (WeightKind::Q5_1, GgmlDType::Q5_1),
        (WeightKind::Q8_0, GgmlDType::Q8_0),
        (WeightKind::Q4K, GgmlDType::Q4K),
        (WeightKind::Q5K, GgmlDType::Q5K),
        (WeightKind::Q6K, GgmlDType::Q6K),
        (WeightKind::F16, GgmlDType::F16),
        (WeightKind::BF16, GgmlDType::BF16),
    ];

    /// Random `rows × cols` weights stored as `kind`: their bytes, and candle's dequantization of them.
    pub(super) fn weights(kind: GgmlDType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let w = crate::testing::seeded_randn(seed, 0.0, 1.0, &[rows, cols]);
        let q = QTensor::quantize(&w, kind).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (bytes, dense)
    }

    /// Our reading of every block layout equals candle's dequantization of the same bytes (candle reads them
    /// as llama.cpp does).
    #[test]
    fn block_layouts_read_as_candle_reads_them() {
        for (kind, g) in KINDS {
            let (bytes, dense) = weights(g, 3, 512, 1);
            let rb = kind.row_bytes(512);
            for r in 0..3 {
                let ours = dequantize_row(kind, &bytes[r * rb..(r + 1) * rb]);
                assert_eq!(ours, dense[r * 512..(r + 1) * 512], "{kind:?} row {r}");
            }
        }
    }

    /// The portable dot product is the dequantized weights times the dequantized activations, up to float
    /// rounding; and the activation quantization is within half a step of the input.
    #[test]
    fn portable_dot_is_the_dequantized_product() {
        let cols = 768;
        let x = crate::testing::seeded_randn(2, 0.0, 1.0, &[cols]).to_vec1::<f32>().unwrap();
        let mut q8 = vec![Q8Block::default(); cols / QK];
        quantize_q8(&x, &mut q8);
        let mut q8k = vec![Q8KBlock::default(); cols / QK_K];
        quantize_q8k(&x, &mut q8k);
        let x8: Vec<f32> = q8.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect();
        let x8k: Vec<f32> = q8k.iter().flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32)).collect();
        for (a, b) in x.iter().zip(&x8) {
            assert!((a - b).abs() <= q8[0].d.max(1e-6) * 0.51 + 0.05, "{a} vs {b}");
        }
        for (kind, g) in KINDS {
            let (bytes, dense) = weights(g, 1, cols, 3);
            let (act, xq) = match kind.activation() {
                ActivationKind::Q8 => (Activations::Q8(&q8), &x8),
                ActivationKind::Q8K => (Activations::Q8K(&q8k), &x8k),
                ActivationKind::F32 => (Activations::F32(&x), &x),
            };
            let ours = dot_row(kind, &bytes, act);
            let want: f64 = dense.iter().zip(xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = dense.iter().zip(xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            assert!(((ours as f64) - want).abs() <= 1e-5 * scale, "{kind:?}: {ours} vs {want}");
        }
    }

    /// The SIMD kernels (decode and prefill tiles, over the pool) equal the portable ones, for every type,
    /// row counts that do not divide the tasks and token counts that do not divide the tiles.
    #[test]
    fn simd_kernels_match_the_portable_ones() {
        if !simd() {
            eprintln!("no SIMD kernel on this CPU; the portable kernels are the ones in use");
            return;
        }
        // Half-precision rows also of a width off the 8-wide vectors (the kernel's scalar tail).
        let shapes = KINDS.iter().map(|&(k, g)| (k, g, 512)).chain([(WeightKind::F16, GgmlDType::F16, 100)]);
        for (kind, g, cols) in shapes.chain([(WeightKind::BF16, GgmlDType::BF16, 100)]) {
            let rows = 37;
            let (bytes, _) = weights(g, rows, cols, 4);
            for n in [1, 3, 4, 9, 70] {
                let x = crate::testing::seeded_randn(5 + n as u64, 0.0, 1.0, &[n, cols]).flatten_all().unwrap();
                let x = x.to_vec1::<f32>().unwrap();
                let mut y = vec![0f32; n * rows];
                matmul(kind, &bytes, rows, cols, &x, n, &mut y);
                let rb = kind.row_bytes(cols);
                for t in 0..n {
                    let xr = &x[t * cols..(t + 1) * cols];
                    let (mut q8, mut q8k) =
                        (vec![Q8Block::default(); cols / QK], vec![Q8KBlock::default(); cols / QK_K]);
                    let act = match kind.activation() {
                        ActivationKind::Q8 => {
                            quantize_q8(xr, &mut q8);
                            Activations::Q8(&q8)
                        }
                        ActivationKind::Q8K => {
                            quantize_q8k(xr, &mut q8k);
                            Activations::Q8K(&q8k)
                        }
                        ActivationKind::F32 => Activations::F32(xr),
                    };
                    for r in 0..rows {
                        let want = dot_row(kind, &bytes[r * rb..(r + 1) * rb], act);
                        let got = y[t * rows + r];
                        // On ARM the K-quants' kernels take the portable float steps: the same bits.
                        if cfg!(target_arch = "aarch64")
                            && matches!(kind, WeightKind::Q4K | WeightKind::Q5K | WeightKind::Q6K)
                        {
                            assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} n {n} t {t} r {r}: {got} vs {want}");
                        }
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{kind:?} n {n} t {t} r {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The packed layout reads back as the file's bytes, and its products (SIMD and portable) equal the
    /// row-layout kernels' for rows that do not fill the last group and token counts off the tiles.
    #[test]
    fn packed_matrices_multiply_as_the_rows_do() {
        for (kind, g) in KINDS.into_iter().filter(|(k, _)| PackedMatrix::packs(*k)) {
            let (rows, cols) = (21, 256);
            let (bytes, _) = weights(g, rows, cols, 8);
            let p = PackedMatrix::pack(kind, &bytes, rows, cols);
            assert_eq!(p.unpacked(), bytes, "{kind:?}");
            assert_eq!(p.bytes(), 24 * kind.row_bytes(cols));
            for n in [1, 2, 5, 70] {
                let x = crate::testing::seeded_randn(9, 0.0, 1.0, &[n, cols])
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let (mut want, mut got) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                matmul(kind, &bytes, rows, cols, &x, n, &mut want);
                matmul_packed(&p, &x, n, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{kind:?} n {n} at {i}: {a} vs {b}");
                }
                // The portable kernel on the packed layout gives the row kernel's exact sums.
                let mut xq = vec![Q8Block::default(); n * cols / QK];
                for (xr, o) in x.chunks_exact(cols).zip(xq.chunks_exact_mut(cols / QK)) {
                    quantize_q8(xr, o);
                }
                let xs: Vec<&[Q8Block]> = xq.chunks_exact(cols / QK).collect();
                let mut res = vec![[0f32; GROUP]; n];
                for gi in 0..rows.div_ceil(GROUP) {
                    p.group_portable(gi, &xs, &mut res);
                    for (t, r) in res.iter().enumerate() {
                        for (lane, v) in r.iter().enumerate().filter(|(l, _)| gi * GROUP + l < rows) {
                            let row = &bytes[(gi * GROUP + lane) * kind.row_bytes(cols)..][..kind.row_bytes(cols)];
                            assert_eq!(*v, dot_row(kind, row, Activations::Q8(xs[t])), "{kind:?}");
                        }
                    }
                }
            }
            // Batch invariance on the packed layout too.
            let x =
                crate::testing::seeded_randn(10, 0.0, 1.0, &[6, cols]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut all = vec![0f32; 6 * rows];
            matmul_packed(&p, &x, 6, &mut all);
            for t in 0..6 {
                let mut one = vec![0f32; rows];
                matmul_packed(&p, &x[t * cols..(t + 1) * cols], 1, &mut one);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{kind:?} token {t}");
            }
        }
    }

    /// The SIMD kernels of a packed group (AVX2, or NEON's `sdot`) against the portable one on the same
    /// layout, for one token and a tile of tokens.
    #[test]
    fn simd_group_kernels_match_the_portable_one() {
        eprintln!("kernels: {}", isa());
        for (kind, g) in KINDS.into_iter().filter(|(k, _)| PackedMatrix::packs(*k)) {
            let Some((one, tile)) = group_kernel(kind) else {
                eprintln!("{kind:?}: no SIMD group kernel on this CPU");
                continue;
            };
            let (rows, cols) = (16, 256);
            let (bytes, _) = weights(g, rows, cols, 12);
            let p = PackedMatrix::pack(kind, &bytes, rows, cols);
            let x = crate::testing::seeded_randn(13, 0.0, 1.0, &[TILE, cols]).flatten_all().unwrap();
            let x = x.to_vec1::<f32>().unwrap();
            let mut xq = vec![Q8Block::default(); TILE * cols / QK];
            for (xr, o) in x.chunks_exact(cols).zip(xq.chunks_exact_mut(cols / QK)) {
                quantize_q8(xr, o);
            }
            let xs: Vec<&[Q8Block]> = xq.chunks_exact(cols / QK).collect();
            let ptrs: [*const u8; TILE] = std::array::from_fn(|t| xs[t].as_ptr() as *const u8);
            let group_bytes = p.blocks() * GROUP * kind.block_bytes();
            for gi in 0..rows / GROUP {
                let mut want = vec![[0f32; GROUP]; TILE];
                p.group_portable(gi, &xs, &mut want);
                let gp = p.data()[gi * group_bytes..].as_ptr();
                let (mut got_tile, mut got_one) = ([[0f32; GROUP]; TILE], [[0f32; GROUP]; 1]);
                // SAFETY: one whole group and TILE activation rows of the matrix's width.
                unsafe { tile(gp, p.blocks(), &ptrs, &mut got_tile) };
                for t in 0..TILE {
                    unsafe { one(gp, p.blocks(), &[ptrs[t]], &mut got_one) };
                    assert_eq!(got_one[0], got_tile[t], "{kind:?}: one token against the tile");
                    for (a, b) in got_tile[t].iter().zip(&want[t]) {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{kind:?} group {gi} token {t}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The VNNI kernels (every level this CPU has) give the AVX2 kernels' results: the same bits for the types
    /// whose integer sums are the same (4- and 5-bit groups, K-quants); for Q8_0, whose weights VNNI takes as
    /// w + 128 with 128·d·Σq taken back off in f32, within float rounding of that offset.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn vnni_kernels_give_the_avx2_results() {
        let levels: Vec<Vnni> =
            [(Vnni::Avx512, avx2::avx512_vnni::available()), (Vnni::Avx, avx2::avx_vnni::available())]
                .into_iter()
                .filter_map(|(level, present)| present.then_some(level))
                .collect();
        if !avx2::available() || levels.is_empty() {
            eprintln!("no VNNI on this CPU: the AVX2 kernels are the ones in use");
            return;
        }
        let cols = 512;
        let x = crate::testing::seeded_randn(21, 0.0, 1.0, &[TILE, cols]).flatten_all().unwrap();
        let x = x.to_vec1::<f32>().unwrap();
        let mut xq = vec![Q8Block::default(); TILE * cols / QK];
        let mut xk = vec![Q8KBlock::default(); TILE * cols / QK_K];
        for (t, xr) in x.chunks_exact(cols).enumerate() {
            quantize_q8(xr, &mut xq[t * cols / QK..(t + 1) * cols / QK]);
            quantize_q8k(xr, &mut xk[t * cols / QK_K..(t + 1) * cols / QK_K]);
        }
        let q8: [*const u8; TILE] = std::array::from_fn(|t| xq[t * cols / QK..].as_ptr() as *const u8);
        let q8k: [*const u8; TILE] = std::array::from_fn(|t| xk[t * cols / QK_K..].as_ptr() as *const u8);
        for level in levels {
            for (kind, g) in KINDS {
                let (bytes, _) = weights(g, 16, cols, 22);
                if let Some((one, tile)) = x86_group_kernel(kind, level) {
                    let (ref_one, ref_tile) = x86_group_kernel(kind, Vnni::None).unwrap();
                    let p = PackedMatrix::pack(kind, &bytes, 16, cols);
                    let group_bytes = p.blocks() * GROUP * kind.block_bytes();
                    for gi in 0..2 {
                        let gp = p.data()[gi * group_bytes..].as_ptr();
                        let (mut got, mut want) = ([[0f32; GROUP]; TILE], [[0f32; GROUP]; TILE]);
                        let (mut got1, mut want1) = ([[0f32; GROUP]; 1], [[0f32; GROUP]; 1]);
                        // SAFETY: one whole group, and TILE activation rows of the matrix's width.
                        unsafe {
                            tile(gp, p.blocks(), &q8, &mut got);
                            ref_tile(gp, p.blocks(), &q8, &mut want);
                            one(gp, p.blocks(), &[q8[1]], &mut got1);
                            ref_one(gp, p.blocks(), &[q8[1]], &mut want1);
                        }
                        assert_eq!(got1[0], got[1], "{level:?} {kind:?}: one token against the tile");
                        for (a, b) in got.iter().flatten().chain(&got1[0]).zip(want.iter().flatten().chain(&want1[0])) {
                            if kind == WeightKind::Q8_0 {
                                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{level:?} {kind:?}: {a} vs {b}");
                            } else {
                                assert_eq!(a.to_bits(), b.to_bits(), "{level:?} {kind:?}: {a} vs {b}");
                            }
                        }
                    }
                }
                if let Some(k) = x86_k_quant_kernel(kind, level) {
                    let r = x86_k_quant_kernel(kind, Vnni::None).unwrap();
                    let rb = kind.row_bytes(cols);
                    for row in 0..16 {
                        let w = bytes[row * rb..].as_ptr();
                        // SAFETY: one row of `cols` elements, and TILE activation rows of that width.
                        let (got, want) = unsafe { ((k.tile)(w, cols / QK_K, &q8k), (r.tile)(w, cols / QK_K, &q8k)) };
                        let (got1, want1) =
                            unsafe { ((k.one)(w, cols / QK_K, &[q8k[2]]), (r.one)(w, cols / QK_K, &[q8k[2]])) };
                        assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "{level:?} {kind:?} row {row}");
                        assert_eq!(got1[0].to_bits(), want1[0].to_bits(), "{level:?} {kind:?} row {row}");
                    }
                }
            }
        }
    }

    /// A token's result does not depend on how many tokens share the product (batch invariance: the decode
    /// kernel and the prefill tile give the same bits).
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        for (kind, g) in KINDS {
            let (rows, cols) = (20, 256);
            let (bytes, _) = weights(g, rows, cols, 6);
            let x =
                crate::testing::seeded_randn(7, 0.0, 1.0, &[9, cols]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut all = vec![0f32; 9 * rows];
            matmul(kind, &bytes, rows, cols, &x, 9, &mut all);
            for t in 0..9 {
                let mut one = vec![0f32; rows];
                matmul(kind, &bytes, rows, cols, &x[t * cols..(t + 1) * cols], 1, &mut one);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{kind:?} token {t}");
            }
        }
    }
}
