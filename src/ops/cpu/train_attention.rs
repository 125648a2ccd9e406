//! Causal attention for training on the CPU, forward and backward, without a score matrix: each query head
//! is a task, its rows go through in blocks of [`ROWS`], and a block's scores live only in that task's
//! scratch (`ROWS × keys` floats). The forward pass keeps each row's log-sum-exp so that the backward pass
//! rebuilds a block's probabilities from its scores in one step (as FlashAttention-2 does), instead of the
//! graph keeping `[heads, t, t]` probabilities per layer or the tensor ops allocating them again.
//!
//! Layout (that of `ops::autograd::attention`): `q` `[b, kv, groups · t, d]` (a KV head's query heads one
//! after another), `k`, `v` `[b, kv, total, d]`; query `i` of a head sees keys `j ≤ total − t + i`. The
//! output is `[b, t, heads · d]`, head `g · groups + m` for member `m` of KV head `g`. All f32, contiguous;
//! `d` a multiple of 16 (the micro-kernels' width).

use super::gemm::{product_wide, NR};
use super::{exp_nonpositive, pool};
use std::cell::RefCell;

/// Query rows per block.
const ROWS: usize = 32;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    pub batch: usize,
    pub kv_heads: usize,
    pub groups: usize,
    /// New tokens (query positions per head).
    pub t: usize,
    /// Keys per KV head (cached ones first): at least `t`.
    pub total: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl Dims {
    /// Whether these sizes can go through the tiled kernels (else the caller uses tensor ops).
    pub fn supported(&self) -> bool {
        self.head_dim > 0 && self.head_dim.is_multiple_of(NR) && self.t > 0 && self.total >= self.t
    }

    fn heads(&self) -> usize {
        self.kv_heads * self.groups
    }

    /// Keys visible to query `i`.
    fn visible(&self, i: usize) -> usize {
        self.total - self.t + i + 1
    }

    /// Keys padded to the micro-kernel's width (scratch rows).
    fn stride(&self) -> usize {
        self.total.next_multiple_of(NR)
    }

    /// The sizes every call relies on: `q` (and the output, its gradient, `dq`) `[b, heads, t, d]` floats, `k`
    /// and `v` `[b, kv, total, d]`.
    fn check(&self, q: usize, k: usize, v: usize) {
        assert!(self.supported(), "tiled attention: {self:?}");
        let d = self.head_dim;
        assert!(q == self.batch * self.heads() * self.t * d, "tiled attention: {q} query floats for {self:?}");
        assert!(k == self.batch * self.kv_heads * self.total * d && v == k, "tiled attention: keys / values {k} / {v}");
    }

    /// The query head of task `task` (one per batch row and head).
    fn head<'a>(&self, task: usize, k: &'a [f32], v: &'a [f32]) -> Head<'a> {
        let heads = self.heads();
        let (bi, head) = (task / heads, task % heads);
        let (g, m) = (head / self.groups, head % self.groups);
        let n = self.total * self.head_dim;
        let at = (bi * self.kv_heads + g) * n;
        Head {
            bi,
            head,
            first_row: (bi * self.kv_heads + g) * self.groups * self.t + m * self.t,
            k: &k[at..at + n],
            v: &v[at..at + n],
        }
    }
}

/// One query head: its batch row, its index among the heads, its first row in `q` (and `lse`, `dq`), and its
/// KV head's keys and values `[total, d]`.
struct Head<'a> {
    bi: usize,
    head: usize,
    first_row: usize,
    k: &'a [f32],
    v: &'a [f32],
}

/// A raw pointer written at disjoint places by the tasks of one call.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes its own rows (see each use); `Pool::run` returns only after all tasks.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Through a method, so that closures capture the whole (`Sync`) wrapper rather than its raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One task's scratch, reused across calls on the same thread (nothing allocated once warm).
#[derive(Default)]
struct Scratch {
    /// Keys, then values, transposed: `[d, stride]` each.
    kt: Vec<f32>,
    vt: Vec<f32>,
    /// A block's scores / probabilities `[ROWS, stride]`, its `dP` / `dS` likewise.
    s: Vec<f32>,
    ds: Vec<f32>,
    /// A block transposed `[stride, ROWS]` (for the key-side products).
    tr: Vec<f32>,
    /// A block's rows of `q` / `dO`, contiguous `[ROWS, d]`.
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `out[c · out_stride + r] = src[r · src_stride + c]` for `r < rows`, `c < cols`.
fn transpose_into(src: &[f32], rows: usize, src_stride: usize, cols: usize, out: &mut [f32], out_stride: usize) {
    for r in 0..rows {
        for (c, &x) in src[r * src_stride..][..cols].iter().enumerate() {
            out[c * out_stride + r] = x;
        }
    }
}

/// A head's keys (or values) `[total, d]` as `[d, stride]`, the columns past `total` zero (they meet
/// probabilities of 0, which must not meet stale values from an earlier call: 0 · ∞ is not 0).
fn transpose_keys(kh: &[f32], dims: &Dims, out: &mut [f32]) {
    let (d, total, stride) = (dims.head_dim, dims.total, dims.stride());
    transpose_into(kh, total, d, d, out, stride);
    for row in out.chunks_exact_mut(stride).take(d) {
        row[total..].fill(0.0);
    }
}

/// The softmax weights of query rows `first..first + n` of a head (`qb`, `[n, d]`) over its transposed keys
/// `kt` (`[d, stride]`), in `s` (`[n, stride]`); see [`probabilities`].
#[allow(clippy::too_many_arguments)] // the block's operands, its rows, and its log-sum-exps (given or made)
fn block_probabilities(
    dims: &Dims,
    qb: &[f32],
    kt: &[f32],
    s: &mut [f32],
    first: usize,
    n: usize,
    lse: &mut [f32],
    known: bool,
) {
    let (d, stride) = (dims.head_dim, dims.stride());
    let width = dims.visible(first + n - 1).next_multiple_of(NR);
    assert!(qb.len() >= n * d && kt.len() >= d * stride && s.len() >= n * stride && n <= ROWS);
    // SAFETY: n query rows of d floats; d transposed key rows of `stride ≥ width` floats; n score rows of
    // `stride` floats (all asserted above).
    unsafe { product_wide(qb.as_ptr(), d, kt.as_ptr(), stride, d, n, width, s.as_mut_ptr(), stride, false) };
    probabilities(dims, s, first, n, lse, known);
}

/// Softmax weights of a block's scores in place: `s` `[n, stride]` holds `q · k`; on return `p = exp(scale ·
/// s − lse)` for visible keys, 0 past them. With `lse` given (the backward pass) it is used; otherwise
/// it is computed and written.
fn probabilities(dims: &Dims, s: &mut [f32], first: usize, n: usize, lse: &mut [f32], known: bool) {
    let stride = dims.stride();
    for (r, row) in s.chunks_exact_mut(stride).take(n).enumerate() {
        let vis = dims.visible(first + r);
        let (seen, unseen) = row.split_at_mut(vis);
        unseen.fill(0.0);
        if !known {
            let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * dims.scale));
            let sum: f32 = seen.iter().map(|&x| exp_nonpositive(x * dims.scale - max)).sum();
            // A score that is not finite (a diverging run) makes the row NaN, as the tensor ops would: the
            // exponential below maps NaN to 0 and would hide it from the trainer's checks.
            let finite = max.is_finite() && seen.iter().all(|x| x.is_finite());
            lse[r] = if finite { max + sum.ln() } else { f32::NAN };
        }
        let l = lse[r];
        if l.is_nan() {
            seen.fill(f32::NAN);
            continue;
        }
        // At most a rounding above 0 (lse ≥ the maximum), where the exponential is still exact.
        for x in seen.iter_mut() {
            *x = exp_nonpositive(*x * dims.scale - l);
        }
    }
}

/// The output `o` (`[b, t, heads · d]`) and each query row's log-sum-exp `lse` (`[b, kv, groups · t]`).
pub fn forward(dims: &Dims, q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], lse: &mut [f32]) {
    let Dims { batch, t, head_dim: d, .. } = *dims;
    let heads = dims.heads();
    dims.check(q.len(), k.len(), v.len());
    assert!(o.len() == q.len() && lse.len() == batch * heads * t);
    let stride = dims.stride();
    let (out, lse_out) = (Shared(o.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    pool::pool().run(batch * heads, &|task| {
        let Head { bi, head, first_row, k: kh, v: vh } = dims.head(task, k, v);
        SCRATCH.with(|sc| {
            let sc = &mut *sc.borrow_mut();
            sc.kt.resize(d * stride, 0.0);
            sc.s.resize(ROWS * stride, 0.0);
            sc.rows.resize(ROWS * d, 0.0);
            transpose_keys(kh, dims, &mut sc.kt);
            for i0 in (0..t).step_by(ROWS) {
                let n = ROWS.min(t - i0);
                let qb = &q[(first_row + i0) * d..][..n * d];
                // SAFETY: this task alone writes the log-sum-exps of its head's rows.
                let lse = unsafe { std::slice::from_raw_parts_mut(lse_out.at(first_row + i0), n) };
                block_probabilities(dims, qb, &sc.kt, &mut sc.s, i0, n, lse, false);
                // The block's outputs, gathered contiguous, then put at their place in [b, t, heads · d].
                let keys = dims.visible(i0 + n - 1);
                // SAFETY: n probability rows (`stride` apart) over `keys ≤ total` value rows of d floats.
                unsafe {
                    product_wide(sc.s.as_ptr(), stride, vh.as_ptr(), d, keys, n, d, sc.rows.as_mut_ptr(), d, false)
                };
                for r in 0..n {
                    // SAFETY: row (bi, i0 + r) of head `head`: d floats that only this task writes.
                    unsafe {
                        let dst = out.at(((bi * t + i0 + r) * heads + head) * d);
                        std::ptr::copy_nonoverlapping(sc.rows.as_ptr().add(r * d), dst, d);
                    }
                }
            }
        });
    });
}

/// The gradients `dq` (`[b, kv, groups · t, d]`), `dk` and `dv` (`[b, kv, total, d]`) from the output's
/// gradient `dout` (`[b, t, heads · d]`), the forward pass's output `o` and log-sum-exps `lse`.
#[allow(clippy::too_many_arguments)] // the three inputs, the forward's two results, the gradient
pub fn backward(
    dims: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Dims { batch, kv_heads, groups, t, total, head_dim: d, scale } = *dims;
    let heads = dims.heads();
    dims.check(q.len(), k.len(), v.len());
    assert!(o.len() == q.len() && dout.len() == q.len() && lse.len() == batch * heads * t);
    assert!(dq.len() == q.len() && dk.len() == k.len() && dv.len() == k.len());
    let stride = dims.stride();
    // Each query head adds into a key/value gradient of its own; a KV head's are summed at the end.
    let mut partial = vec![0f32; 2 * batch * heads * total * d];
    let (dq_out, part) = (Shared(dq.as_mut_ptr()), Shared(partial.as_mut_ptr()));
    pool::pool().run(batch * heads, &|task| {
        let Head { bi, head, first_row, k: kh, v: vh } = dims.head(task, k, v);
        // SAFETY: this task's own two `[total, d]` slices of `partial`.
        let (dk_h, dv_h) = unsafe {
            let base = part.at(task * 2 * total * d);
            (
                std::slice::from_raw_parts_mut(base, total * d),
                std::slice::from_raw_parts_mut(base.add(total * d), total * d),
            )
        };
        SCRATCH.with(|sc| {
            let sc = &mut *sc.borrow_mut();
            sc.kt.resize(d * stride, 0.0);
            sc.vt.resize(d * stride, 0.0);
            sc.s.resize(ROWS * stride, 0.0);
            sc.ds.resize(ROWS * stride, 0.0);
            sc.tr.resize(stride * ROWS, 0.0);
            sc.rows.resize(ROWS * d, 0.0);
            transpose_keys(kh, dims, &mut sc.kt);
            transpose_keys(vh, dims, &mut sc.vt);
            let mut lse_block = [0f32; ROWS];
            let mut delta = [0f32; ROWS];
            for i0 in (0..t).step_by(ROWS) {
                let n = ROWS.min(t - i0);
                let keys = dims.visible(i0 + n - 1);
                let width = keys.next_multiple_of(NR);
                let qb = &q[(first_row + i0) * d..][..n * d];
                lse_block[..n].copy_from_slice(&lse[first_row + i0..][..n]);
                // dO of the block's rows, contiguous, and D = rowsum(dO ⊙ O).
                for (r, dr) in delta[..n].iter_mut().enumerate() {
                    let at = ((bi * t + i0 + r) * heads + head) * d;
                    let (go, oo) = (&dout[at..at + d], &o[at..at + d]);
                    sc.rows[r * d..(r + 1) * d].copy_from_slice(go);
                    *dr = go.iter().zip(oo).map(|(a, b)| a * b).sum();
                }
                block_probabilities(dims, qb, &sc.kt, &mut sc.s, i0, n, &mut lse_block, true);
                // dV += Pᵀ · dO.
                transpose_into(&sc.s, n, stride, keys, &mut sc.tr, ROWS);
                // SAFETY (each product below): operands inside the scratch rows / the head's slices at the
                // strides given, n ≤ ROWS block rows, width ≤ stride, keys ≤ total.
                unsafe {
                    product_wide(sc.tr.as_ptr(), ROWS, sc.rows.as_ptr(), d, n, keys, d, dv_h.as_mut_ptr(), d, true)
                };
                // dP = dO · Vᵀ, then dS = P ⊙ (dP − D) (zero past the visible keys, where P is).
                unsafe {
                    product_wide(
                        sc.rows.as_ptr(),
                        d,
                        sc.vt.as_ptr(),
                        stride,
                        d,
                        n,
                        width,
                        sc.ds.as_mut_ptr(),
                        stride,
                        false,
                    );
                }
                for (r, &dr) in delta[..n].iter().enumerate() {
                    let (p, ds) = (&sc.s[r * stride..][..width], &mut sc.ds[r * stride..][..width]);
                    for (x, &p) in ds.iter_mut().zip(p) {
                        *x = p * (*x - dr);
                    }
                }
                // dQ = scale · dS · K (rows of this block only: written, not added).
                unsafe {
                    product_wide(sc.ds.as_ptr(), stride, kh.as_ptr(), d, keys, n, d, sc.rows.as_mut_ptr(), d, false);
                }
                for r in 0..n {
                    // SAFETY: row first_row + i0 + r of dq: d floats only this task writes.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dq_out.at((first_row + i0 + r) * d), d) };
                    for (x, &y) in dst.iter_mut().zip(&sc.rows[r * d..(r + 1) * d]) {
                        *x = y * scale;
                    }
                }
                // dK += dSᵀ · Q (scaled once at the end).
                transpose_into(&sc.ds, n, stride, keys, &mut sc.tr, ROWS);
                unsafe { product_wide(sc.tr.as_ptr(), ROWS, qb.as_ptr(), d, n, keys, d, dk_h.as_mut_ptr(), d, true) };
            }
        });
    });
    // A KV head's gradients: the sum over its query heads.
    let (dk_out, dv_out) = (Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    let partial = &partial;
    pool::pool().run(batch * kv_heads, &|task| {
        let (bi, g) = (task / kv_heads, task % kv_heads);
        let at = task * total * d;
        // SAFETY: this task alone writes KV head (bi, g)'s rows of dk and dv.
        let (dk_g, dv_g) = unsafe {
            (
                std::slice::from_raw_parts_mut(dk_out.at(at), total * d),
                std::slice::from_raw_parts_mut(dv_out.at(at), total * d),
            )
        };
        dk_g.fill(0.0);
        dv_g.fill(0.0);
        for m in 0..groups {
            let h = (bi * heads + g * groups + m) * 2 * total * d;
            let (pk, pv) = (&partial[h..h + total * d], &partial[h + total * d..h + 2 * total * d]);
            dk_g.iter_mut().zip(pk).for_each(|(x, y)| *x += y * scale);
            dv_g.iter_mut().zip(pv).for_each(|(x, y)| *x += y);
        }
    });
}
