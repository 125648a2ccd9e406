//! Fused ops of the inference path with our own CUDA kernels (`kernels/kernels.cu`); on other devices (or
//! shapes the kernels don't take) each falls back to the composition of candle ops it replaces.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};

/// Causal mask for `t` new tokens after `offset` cached ones: `[t, offset + t]`, -inf above the diagonal.
pub fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..total).map(move |j| if j > offset + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)
}

/// Attention probabilities: `softmax(scores + causal mask)` over the last dim. `scores` `[.., rows, total]`:
/// each group of `t` rows are the queries of `t` new tokens after `offset` cached ones (`total = offset + t`);
/// query `i` may attend to columns `0..=offset + i`. On CUDA (t > 1) our kernel masks while it normalises and
/// `mask` is not needed; elsewhere `mask` (`[t, total]`, from `causal_mask`) is added first, and
/// without one the scores are a single token's (nothing to mask).
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, t: usize, offset: usize) -> Result<Tensor> {
    if t > 1 && scores.device().is_cuda() {
        return scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { t, offset });
    }
    match mask {
        Some(m) => {
            let total = scores.dim(D::Minus1)?;
            let rows = scores.elem_count() / total;
            let s = scores.reshape((rows / t, t, total))?.broadcast_add(m)?;
            candle_nn::ops::softmax_last_dim(&s)?.reshape(scores.shape())
        }
        None => candle_nn::ops::softmax_last_dim(scores),
    }
}

/// Attention probabilities for rows holding sequences of different lengths (see [`SpanSoftmax`]): `scores`
/// `[b, .., rows, total]` with `total = prefix + offset + t`, `starts` (u32 `[b]`, on the scores' device) the
/// first own column of each sequence. Columns of a shared prefix are always visible; own columns from the
/// sequence's start up to the query itself.
pub fn span_softmax(scores: &Tensor, starts: &Tensor, t: usize, offset: usize, prefix: usize) -> Result<Tensor> {
    scores.contiguous()?.apply_op2_no_bwd(starts, &SpanSoftmax { t, offset, prefix })
}

/// [`span_softmax`] after a shared prefix whose scores are a tensor of their own: `shared` `[kv, seqs * g * t,
/// prefix_cols]` (every row's queries times the one prefix; columns from `prefix` on are padding, probability
/// 0), `own` `[seqs, kv, g * t, offset + t]`, `starts` (u32 `[seqs]`). Returns the probabilities in those two
/// layouts, contiguous views of one buffer: neither side is copied to meet its value product (joining them cost
/// four strided copies of the scores per layer).
pub fn span_softmax_split(
    shared: &Tensor,
    own: &Tensor,
    starts: &Tensor,
    t: usize,
    offset: usize,
    prefix: usize,
) -> Result<(Tensor, Tensor)> {
    let (seqs, kv, gt, own_total) = own.dims4()?;
    let (skv, shared_rows, prefix_cols) = shared.dims3()?;
    if skv != kv || shared_rows != seqs * gt || own_total != offset + t || !gt.is_multiple_of(t) || prefix > prefix_cols
    {
        candle_core::bail!(
            "span-softmax-split: shared scores {:?} and own scores {:?} for {t} new tokens after {offset}",
            shared.dims(),
            own.dims()
        );
    }
    let op = SpanSoftmaxSplit { t, offset, prefix, prefix_cols, kv, seqs };
    let flat = shared.contiguous()?.apply_op3_no_bwd(&own.contiguous()?, starts, &op)?;
    let n_shared = kv * seqs * gt * prefix_cols;
    let probs_shared = flat.narrow(0, 0, n_shared)?.reshape((kv, seqs * gt, prefix_cols))?;
    let probs_own = flat.narrow(0, n_shared, seqs * kv * gt * own_total)?.reshape((seqs, kv, gt, own_total))?;
    Ok((probs_shared, probs_own))
}

struct SpanSoftmaxSplit {
    t: usize,
    offset: usize,
    prefix: usize,
    prefix_cols: usize,
    kv: usize,
    seqs: usize,
}

impl SpanSoftmaxSplit {
    /// The kernel's loop on the CPU (f32 math), for tests against the joined path.
    fn cpu<T: candle_core::WithDType>(&self, shared: &[T], own: &[T], starts: &[u32]) -> Vec<T> {
        let (p, cols) = (self.prefix, self.prefix_cols);
        let rows = shared.len() / cols.max(1);
        let own_total = own.len() / rows.max(1);
        let per_seq = rows / self.seqs.max(1);
        let gt = per_seq / self.kv.max(1);
        let mut y = vec![T::zero(); shared.len() + own.len()];
        let (ys, yo) = y.split_at_mut(shared.len());
        for row in 0..rows {
            let (b, rem) = (row / per_seq, row % per_seq);
            let (k, i) = (rem / gt, rem % gt);
            let srow = (k * self.seqs + b) * gt + i;
            let sr = &shared[srow * cols..srow * cols + p];
            let xr = &own[row * own_total..(row + 1) * own_total];
            let hi = own_total.min(self.offset + i % self.t + 1);
            let lo = (starts[b] as usize).min(hi);
            let f = |v: T| v.to_f64() as f32;
            let m = sr.iter().chain(&xr[lo..hi]).fold(f32::NEG_INFINITY, |m, &v| m.max(f(v)));
            let sum: f32 = sr.iter().chain(&xr[lo..hi]).map(|&v| (f(v) - m).exp()).sum();
            for (j, &v) in sr.iter().enumerate() {
                ys[srow * cols + j] = T::from_f64(((f(v) - m).exp() / sum) as f64);
            }
            for j in lo..hi {
                yo[row * own_total + j] = T::from_f64(((f(xr[j]) - m).exp() / sum) as f64);
            }
        }
        y
    }
}

impl candle_core::CustomOp3 for SpanSoftmaxSplit {
    fn name(&self) -> &'static str {
        "span-softmax-split"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        o: &CpuStorage,
        ol: &Layout,
        st: &CpuStorage,
        stl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let strided = || candle_core::Error::Msg("span-softmax-split: strided input".into());
        let ((s1, s2), (o1, o2), (t1, t2)) = (
            l.contiguous_offsets().ok_or_else(strided)?,
            ol.contiguous_offsets().ok_or_else(strided)?,
            stl.contiguous_offsets().ok_or_else(strided)?,
        );
        let CpuStorage::U32(starts) = st else { candle_core::bail!("span-softmax-split: starts must be u32") };
        let starts = &starts[t1..t2];
        let out = match (s, o) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(self.cpu(&a[s1..s2], &b[o1..o2], starts)),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(self.cpu(&a[s1..s2], &b[o1..o2], starts)),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => CpuStorage::F16(self.cpu(&a[s1..s2], &b[o1..o2], starts)),
            _ => candle_core::bail!("span-softmax-split: unsupported or mismatched dtypes"),
        };
        Ok((out, Shape::from(l.shape().elem_count() + ol.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
        o: &candle_core::cuda_backend::CudaStorage,
        ol: &Layout,
        st: &candle_core::cuda_backend::CudaStorage,
        stl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let rows = l.shape().elem_count() / self.prefix_cols.max(1);
        let own_total = ol.shape().elem_count() / rows.max(1);
        let per_seq = rows / self.seqs.max(1);
        let args = [rows, own_total, self.t, self.offset, self.prefix, self.prefix_cols, per_seq, self.kv, self.seqs]
            .map(|v| v as i32);
        let out = cuda::span_softmax_split(s, l, o, ol, st, stl, cuda::grid_for_warps(rows), &args)?;
        Ok((out, Shape::from(l.shape().elem_count() + ol.shape().elem_count())))
    }
}

/// Set `BILLION_CUDA_MMA_ATTENTION=0` to run batched attention through CUDA-core kernels and composed ops instead
/// of the tensor-core kernels (for comparisons).
pub const MMA_ATTENTION_ENV: &str = "BILLION_CUDA_MMA_ATTENTION";

/// Set `BILLION_CUDA_SMALL_GEMM=0` to run the batch engine's products of at most 16 rows (a speculative
/// verification, a small batch's step) through cuBLAS instead of our tensor-core kernel (for comparisons).
pub const SMALL_GEMM_ENV: &str = "BILLION_CUDA_SMALL_GEMM";

/// Whether the tensor-core attention kernels are on (read once per process).
pub fn mma_attention_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var(MMA_ATTENTION_ENV).is_ok_and(|v| v == "0"))
}

/// How the span attention kernel covers a pass: `(heads per block, query positions per block, threads)`. A block
/// takes the query heads of one KV group together where the group has at most 8 (they share every staged key /
/// value tile), with at least 4 warps of 16 query positions each; larger groups take one head per block.
pub fn span_attention_blocks(heads: usize, kv_heads: usize) -> (usize, usize, u32) {
    let group = heads / kv_heads.max(1);
    let (hb, warps) = if (1..=8).contains(&group) { (group, group * 4usize.div_ceil(group)) } else { (1, 4) };
    (hb, 16 * warps / hb, 32 * warps as u32)
}

/// Attention of `t` new tokens per row on tensor cores, written as `[b, t, heads · d]` (the O projection's
/// layout): `q` `[b, heads, t, d]` (rotated and scaled), `k_buf` / `v_buf` the cache's whole buffers `[b, kv,
/// capacity, d]` with this pass's keys and values at columns `prev..prev + t`, `starts` (u32 `[b]`) each row's
/// first own column, `prefix` the keys and values `[1, kv, p, d]` every row sees first. Query i sees the prefix and
/// its row's columns `start..=prev + i` (nothing: zeros). One kernel: no scores in memory, no transposes. `None`
/// where it does not apply (only CUDA, bf16, head dim 64 or 128); the caller then composes the ops.
pub fn span_attention(
    q: &Tensor,
    k_buf: &Tensor,
    v_buf: &Tensor,
    starts: &Tensor,
    prefix: Option<(&Tensor, &Tensor)>,
    prev: usize,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        cuda::span_attention(q, k_buf, v_buf, starts, prefix, prev)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_buf, v_buf, starts, prefix, prev);
        Ok(None)
    }
}

/// `silu(gate) * up` in one kernel on CUDA.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.device().is_cuda() && gate.is_contiguous() && up.is_contiguous() && gate.shape() == up.shape() {
        return gate.apply_op2_no_bwd(up, &SwiGlu);
    }
    candle_nn::ops::silu(gate)? * up
}

/// Index of the largest value along the last dim (u32), one kernel on CUDA (candle's argmax reduction is a
/// visible share of a fast decode step).
pub fn argmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && x.is_contiguous() && x.dtype() == candle_core::DType::F32 {
        return x.apply_op1_no_bwd(&ArgmaxLast);
    }
    x.argmax(D::Minus1)
}

/// How one row of a batch draws its next token in [`sample_rows`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowDraw {
    /// 0 (or below): greedy.
    pub temperature: f32,
    /// 1.0: off.
    pub top_p: f32,
    /// 0: off.
    pub top_k: u32,
    pub seed: u64,
    /// Which draw of the row's sequence this is (a fresh random stream per draw).
    pub draw: u32,
}

/// Words of [`RowDraw`] per row, as the kernel reads them.
const DRAW_WORDS: usize = 6;

impl RowDraw {
    fn words(&self) -> [u32; DRAW_WORDS] {
        let seed = self.seed;
        [self.temperature.to_bits(), self.top_p.to_bits(), self.top_k, seed as u32, (seed >> 32) as u32, self.draw]
    }
}

/// Each row's next token from `logits` `[rows, vocab]` (f32), drawn where the logits are (one kernel on CUDA, so
/// a batch's logits never cross to the host): greedy rows take the argmax; the others sample
/// softmax(logits / T) restricted to the top-k, then to the smallest top set whose mass reaches top-p
/// (transformers' order), by the Gumbel-max trick with uniforms hashed from (seed, draw, token). The CPU runs
/// the same algorithm, so a seed gives the same tokens on either device up to float rounding.
pub fn sample_rows(logits: &Tensor, draws: &[RowDraw]) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    if draws.len() != rows || logits.rank() != 2 {
        candle_core::bail!("sample_rows: {} draws for logits of shape {:?}", draws.len(), logits.dims());
    }
    let words: Vec<u32> = draws.iter().flat_map(|d| d.words()).collect();
    let params = Tensor::from_vec(words, (rows, DRAW_WORDS), logits.device())?;
    logits.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(&params, &SampleRows)
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E3779B97F4A7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^ (x >> 31)
}

/// Bisection steps for the top-k and top-p thresholds (as in the kernel).
const BISECT_STEPS: usize = 32;

/// The largest threshold `a` in `[lo, 0]` with `keep(a)` (true at `lo`), by bisection.
fn bisect(mut a: f32, keep: impl Fn(f32) -> bool) -> f32 {
    let mut b = 0f32;
    for _ in 0..BISECT_STEPS {
        let mid = 0.5 * (a + b);
        if keep(mid) {
            a = mid;
        } else {
            b = mid;
        }
    }
    a
}

/// One row of [`sample_rows`] on the CPU: the kernel's algorithm, step for step.
fn sample_row(x: &[f32], d: &RowDraw) -> u32 {
    let argmax = |score: &dyn Fn(usize) -> Option<f32>| {
        let (mut best, mut idx) = (f32::NEG_INFINITY, 0usize);
        for j in 0..x.len() {
            if let Some(v) = score(j) {
                if v > best {
                    (best, idx) = (v, j);
                }
            }
        }
        idx as u32
    };
    if d.temperature.is_nan() || d.temperature <= 0.0 {
        return argmax(&|j| Some(x[j]));
    }
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / d.temperature;
    let z = |j: usize| (x[j] - mx) * inv_t;
    let zmin = |lo: f32| (0..x.len()).map(z).filter(|&v| v >= lo).fold(f32::INFINITY, f32::min);
    let mut lo = f32::NEG_INFINITY;
    let k = d.top_k as usize;
    if k > 0 && k < x.len() {
        lo = bisect(zmin(lo), |t| (0..x.len()).filter(|&j| z(j) >= t).count() >= k);
    }
    if d.top_p > 0.0 && d.top_p < 1.0 {
        let mass = |t: f32| (0..x.len()).map(z).filter(|&v| v >= t).map(f32::exp).sum::<f32>();
        let total = mass(lo);
        lo = lo.max(bisect(zmin(lo), |t| mass(t) >= d.top_p * total));
    }
    let key = splitmix64(d.seed ^ splitmix64(d.draw as u64));
    argmax(&|j| {
        let v = z(j);
        (v >= lo).then(|| {
            let u = ((splitmix64(key.wrapping_add(j as u64)) >> 40) as f32 + 0.5) * (1.0 / 16777216.0);
            v - (-u.ln()).ln()
        })
    })
}

struct SampleRows;

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::U32(words)) = (s, p) else {
            candle_core::bail!("sample_rows: expected f32 logits and u32 draws")
        };
        let (rows, n) = l.shape().dims2()?;
        let (x, words) = (&x[l.start_offset()..], &words[pl.start_offset()..]);
        let out = (0..rows)
            .map(|r| {
                let w = &words[r * DRAW_WORDS..(r + 1) * DRAW_WORDS];
                let d = RowDraw {
                    temperature: f32::from_bits(w[0]),
                    top_p: f32::from_bits(w[1]),
                    top_k: w[2],
                    seed: w[3] as u64 | (w[4] as u64) << 32,
                    draw: w[5],
                };
                sample_row(&x[r * n..(r + 1) * n], &d)
            })
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
        p: &candle_core::cuda_backend::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let (rows, n) = l.shape().dims2()?;
        Ok((cuda::sample_rows(s, l, p, pl, rows, n)?, Shape::from(rows)))
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CausalSoftmax {
    t: usize,
    offset: usize,
}

struct SwiGlu;

/// Softmax over the visible columns of each row: query `i` (of `t` new tokens after `offset` own cached
/// columns) of sequence `b` sees the `prefix` shared columns, then own columns `starts[b]..=offset + i`.
struct SpanSoftmax {
    t: usize,
    offset: usize,
    prefix: usize,
}

impl SpanSoftmax {
    /// `(rows, total, rows per sequence)` of contiguous scores for `seqs` sequences, checked.
    fn shape(&self, l: &Layout, seqs: usize) -> Result<(usize, usize, usize)> {
        let total = *l.dims().last().expect("scores have a last dim");
        let rows = l.shape().elem_count() / total.max(1);
        let per_seq = rows / seqs.max(1);
        if self.prefix + self.offset + self.t != total || per_seq * seqs != rows || !per_seq.is_multiple_of(self.t) {
            candle_core::bail!(
                "span-softmax: {rows} x {total} scores for {seqs} sequences of {} new tokens after {} own and {} shared",
                self.t,
                self.offset,
                self.prefix
            );
        }
        Ok((rows, total, per_seq))
    }

    fn cpu<T: candle_core::WithDType>(&self, x: &[T], starts: &[u32], total: usize, per_seq: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        let rows = x.len() / total.max(1);
        // Rows split over the cores; each row: max, one exp per visible column, then the scale (f32 math).
        // (Small score tensors, as in a decode step, stay on this thread: spawning would cost more.)
        let per = if x.len() < 1 << 16 { rows.max(1) } else { crate::util::items_per_thread(rows) };
        std::thread::scope(|scope| {
            for (part, (xs, ys)) in x.chunks(per * total).zip(y.chunks_mut(per * total)).enumerate() {
                scope.spawn(move || {
                    let mut e = vec![0f32; total];
                    for (i, (xr, yr)) in xs.chunks(total).zip(ys.chunks_mut(total)).enumerate() {
                        let r = part * per + i;
                        let lo = self.prefix + starts[r / per_seq] as usize;
                        let hi = total.min(self.prefix + self.offset + r % self.t + 1);
                        let visible = |j: usize| j < self.prefix || j >= lo;
                        let m = (0..hi)
                            .filter(|&j| visible(j))
                            .fold(f32::NEG_INFINITY, |m, j| m.max(xr[j].to_f64() as f32));
                        let mut sum = 0f32;
                        for j in 0..hi {
                            e[j] = if visible(j) { (xr[j].to_f64() as f32 - m).exp() } else { 0.0 };
                            sum += e[j];
                        }
                        // A padding query sees nothing: its row stays zero (no 0 / 0).
                        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                        for j in 0..hi {
                            yr[j] = T::from_f64((e[j] * inv) as f64);
                        }
                    }
                });
            }
        });
        y
    }
}

impl CustomOp2 for SpanSoftmax {
    fn name(&self) -> &'static str {
        "span-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, st: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let starts = match st {
            CpuStorage::U32(v) => &v[sl.start_offset()..sl.start_offset() + sl.shape().elem_count()],
            _ => candle_core::bail!("span-softmax: starts must be u32"),
        };
        let (_, total, per_seq) = self.shape(l, starts.len())?;
        let (o1, o2) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("span-softmax: strided".into()))?;
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(self.cpu(&x[o1..o2], starts, total, per_seq)),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.cpu(&x[o1..o2], starts, total, per_seq)),
            CpuStorage::F16(x) => CpuStorage::F16(self.cpu(&x[o1..o2], starts, total, per_seq)),
            _ => candle_core::bail!("span-softmax: unsupported dtype"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
        st: &candle_core::cuda_backend::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let (rows, total, per_seq) = self.shape(l, sl.shape().elem_count())?;
        let args = [rows, total, self.t, self.offset, self.prefix, per_seq].map(|v| v as i32);
        Ok((cuda::span_softmax(s, l, st, sl, cuda::grid_for_warps(rows), &args)?, l.shape().clone()))
    }
}

struct ArgmaxLast;

fn cpu_unused(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name}: the CPU path does not use this op")
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let total = *l.dims().last().expect("scores have a last dim");
        let rows = l.shape().elem_count() / total;
        if self.offset + self.t != total || !rows.is_multiple_of(self.t) {
            candle_core::bail!(
                "causal-softmax: {rows} x {total} scores for {} new tokens after {}",
                self.t,
                self.offset
            );
        }
        let cfg = cuda::grid_for_warps(rows);
        let args = [rows as i32, total as i32, self.t as i32, self.offset as i32];
        Ok((cuda::unary(s, l, "causal_softmax", cfg, &args)?, l.shape().clone()))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::cuda_backend::CudaStorage,
        gl: &Layout,
        u: &candle_core::cuda_backend::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        Ok((cuda::swiglu(g, gl, u, ul)?, gl.shape().clone()))
    }
}

impl CustomOp1 for ArgmaxLast {
    fn name(&self) -> &'static str {
        "argmax-last"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unused(self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::cuda_backend::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        let dims = l.dims();
        let n = *dims.last().expect("argmax over a last dim");
        let out_shape: Shape = dims[..dims.len() - 1].into();
        Ok((cuda::argmax(s, l, n)?, out_shape))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::{DType, Layout, Result};
    use half::{bf16, f16};
    use std::sync::{Arc, Mutex};

    /// Our kernels as build.rs compiled them: machine code for the build's compute capability and PTX for
    /// newer cards. Loading machine code takes milliseconds; the driver's compile of the PTX took ~7 s on a
    /// first run (it is cached per machine afterwards).
    const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

    /// Our kernel `name` on `dev`'s context (the module is loaded once per context).
    pub fn kernel(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        static MODULES: Mutex<Vec<(usize, Arc<CudaModule>)>> = Mutex::new(Vec::new());
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let key = ctx.cu_ctx() as usize;
        let module = {
            let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
            match modules.iter().find(|(k, _)| *k == key) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = ctx.load_module(Ptx::from_binary(FATBIN.to_vec())).map_err(candle_core::Error::wrap)?;
                    modules.push((key, m.clone()));
                    m
                }
            }
        };
        module.load_function(name).map_err(|e| candle_core::Error::Msg(format!("CUDA kernel {name}: {e}")))
    }

    /// A grid-stride loop over `n` elements: 256 threads a block, as many blocks as cover `n` (at most 65,535).
    pub fn grid_stride(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256).clamp(1, 65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per row, 8 warps per block.
    pub fn grid_for_warps(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: ((rows as u32).div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// The kernel-name suffix of a float dtype.
    pub fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            dt => candle_core::bail!("no fused CUDA kernel for {dt:?}"),
        })
    }

    fn wrap(dev: &CudaDevice, s: CudaStorageSlice) -> CudaStorage {
        CudaStorage { slice: s, device: dev.clone() }
    }

    /// Same-shape unary kernel `name_{dtype}(x, y, args...)` over a contiguous input.
    pub fn unary(s: &CudaStorage, l: &Layout, name: &str, cfg: LaunchConfig, args: &[i32]) -> Result<CudaStorage> {
        unary_with(s, l, None, name, cfg, args)
    }

    /// `span_softmax_{dtype}(x, starts, y, args...)`: scores and per-sequence starts (u32).
    pub fn span_softmax(
        s: &CudaStorage,
        l: &Layout,
        st: &CudaStorage,
        sl: &Layout,
        cfg: LaunchConfig,
        args: &[i32],
    ) -> Result<CudaStorage> {
        unary_with(s, l, Some((st, sl)), "span_softmax", cfg, args)
    }

    /// `name_{dtype}(x, [u32 side input,] y, args...)` over a contiguous input, output of its shape.
    fn unary_with(
        s: &CudaStorage,
        l: &Layout,
        side: Option<(&CudaStorage, &Layout)>,
        name: &str,
        cfg: LaunchConfig,
        args: &[i32],
    ) -> Result<CudaStorage> {
        let dev = s.device();
        let n = l.shape().elem_count();
        let strided = || candle_core::Error::Msg(format!("{name}: input not contiguous"));
        let (o1, o2) = l.contiguous_offsets().ok_or_else(strided)?;
        let side = match side {
            None => None,
            Some((st, sl)) => {
                let (s1, s2) = sl.contiguous_offsets().ok_or_else(strided)?;
                let CudaStorageSlice::U32(v) = &st.slice else { candle_core::bail!("{name}: expected u32 input") };
                Some(v.slice(s1..s2))
            }
        };
        let f = kernel(dev, &format!("{name}_{}", suffix(s.dtype())?))?;
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty, $x:expr, $variant:ident) => {{
                let x = $x.slice(o1..o2);
                // SAFETY: the kernel writes every element of `y`.
                let y: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n)? };
                let mut b = stream.launch_builder(&f);
                b.arg(&x);
                if let Some(side) = &side {
                    b.arg(side);
                }
                b.arg(&y);
                for a in args {
                    b.arg(a);
                }
                unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
                wrap(dev, CudaStorageSlice::$variant(y))
            }};
        }
        Ok(match &s.slice {
            CudaStorageSlice::F32(x) => run!(f32, x, F32),
            CudaStorageSlice::BF16(x) => run!(bf16, x, BF16),
            CudaStorageSlice::F16(x) => run!(f16, x, F16),
            _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
        })
    }

    /// `span_softmax_split_{dtype}(shared, own, starts, y, args...)`: `y` holds both probability tensors.
    #[allow(clippy::too_many_arguments)]
    pub fn span_softmax_split(
        s: &CudaStorage,
        l: &Layout,
        o: &CudaStorage,
        ol: &Layout,
        st: &CudaStorage,
        stl: &Layout,
        cfg: LaunchConfig,
        args: &[i32],
    ) -> Result<CudaStorage> {
        let dev = s.device();
        let strided = || candle_core::Error::Msg("span_softmax_split: input not contiguous".into());
        let (s1, s2) = l.contiguous_offsets().ok_or_else(strided)?;
        let (o1, o2) = ol.contiguous_offsets().ok_or_else(strided)?;
        let (t1, t2) = stl.contiguous_offsets().ok_or_else(strided)?;
        let CudaStorageSlice::U32(starts) = &st.slice else { candle_core::bail!("span_softmax_split: u32 starts") };
        let starts = starts.slice(t1..t2);
        let n = (s2 - s1) + (o2 - o1);
        let f = kernel(dev, &format!("span_softmax_split_{}", suffix(s.dtype())?))?;
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty, $a:expr, $b:expr, $variant:ident) => {{
                let (a, b) = ($a.slice(s1..s2), $b.slice(o1..o2));
                // SAFETY: the kernel writes every element of `y` (both halves).
                let y: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n)? };
                let mut builder = stream.launch_builder(&f);
                builder.arg(&a).arg(&b).arg(&starts).arg(&y);
                for v in args {
                    builder.arg(v);
                }
                unsafe { builder.launch(cfg) }.map_err(candle_core::Error::wrap)?;
                wrap(dev, CudaStorageSlice::$variant(y))
            }};
        }
        Ok(match (&s.slice, &o.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => run!(f32, a, b, F32),
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => run!(bf16, a, b, BF16),
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => run!(f16, a, b, F16),
            _ => candle_core::bail!("span_softmax_split: unsupported or mismatched dtypes"),
        })
    }

    /// See [`super::span_attention`].
    pub fn span_attention(
        q: &candle_core::Tensor,
        k_buf: &candle_core::Tensor,
        v_buf: &candle_core::Tensor,
        starts: &candle_core::Tensor,
        prefix: Option<(&candle_core::Tensor, &candle_core::Tensor)>,
        prev: usize,
    ) -> Result<Option<candle_core::Tensor>> {
        use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = q.device() else { return Ok(None) };
        let (b, nh, t, d) = q.dims4()?;
        let (kb, nkv, cap, kd) = k_buf.dims4()?;
        let bf16_all = [q, k_buf, v_buf].iter().all(|x| x.dtype() == DType::BF16)
            && prefix.is_none_or(|(k, v)| k.dtype() == DType::BF16 && v.dtype() == DType::BF16);
        if !bf16_all
            || ![64, 128].contains(&d)
            || kd != d
            || kb != b
            || nkv == 0
            || nh % nkv != 0
            || v_buf.dims() != k_buf.dims()
            || !k_buf.is_contiguous()
            || !v_buf.is_contiguous()
            || prev + t > cap
            || starts.dtype() != DType::U32
            || starts.elem_count() != b
        {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        let (hb, queries, threads) = super::span_attention_blocks(nh, nkv);
        let q = q.contiguous()?;
        let starts = starts.contiguous()?;
        let (kp, vp, p) = match prefix {
            Some((k, v)) => (Some(k.contiguous()?), Some(v.contiguous()?), k.dim(2)?),
            None => (None, None, 0),
        };
        let ptr = |x: &Option<candle_core::Tensor>| x.as_ref().map_or(Ok(0), |x| storage_ptr(x, &stream));
        // SAFETY: the kernel writes every element of `out` (each query row of each head).
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * t * nh * d)? };
        let f = kernel(dev, &format!("span_attention_mma_{d}"))?;
        use Arg::{I, P};
        let args = [
            P(storage_ptr(&q, &stream)?),
            P(storage_ptr(k_buf, &stream)?),
            P(storage_ptr(v_buf, &stream)?),
            P(ptr(&kp)?),
            P(ptr(&vp)?),
            P(storage_ptr(&starts, &stream)?),
            P(slice_ptr(&out, &stream)),
            I(t as i32),
            I(prev as i32),
            I(cap as i32),
            I(p as i32),
            I(nh as i32),
            I(nkv as i32),
            I(hb as i32),
            P(0),
        ];
        // Inputs are freed in stream order, after the kernel has read them.
        launch(&stream, &f, false, (t.div_ceil(queries) as u32, (nh / hb) as u32, b as u32), threads, 0, &args)?;
        Ok(Some(tensor_of(out, dev, (b, t, nh * d))?))
    }

    /// The training attention's forward on tensor cores (`span_attention_lse_mma`, causal): `q` `[b, heads, t, d]`
    /// already scaled, `k`, `v` `[b, kv, total, d]` (query i sees columns `0..=total - t + i`), all bf16 and
    /// contiguous, d 64 or 128 → the output `[b, t, heads · d]` and each query row's log-sum-exp `[b, heads, t]`
    /// (f32), which the backward pass rebuilds the probabilities from.
    pub fn train_attention_forward(
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = q.device() else { candle_core::bail!("train attention: not on CUDA") };
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, total, _) = k.dims4()?;
        let stream = dev.cuda_stream();
        let (hb, queries, threads) = super::span_attention_blocks(nh, nkv);
        let starts = candle_core::Tensor::zeros(b, DType::U32, q.device())?;
        // SAFETY: the kernel writes every element of both (each query row of each head).
        let out: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * t * nh * d)? };
        let lse: CudaSlice<f32> = unsafe { dev.alloc::<f32>(b * nh * t)? };
        use Arg::{I, P};
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let args = [
            P(storage_ptr(&q, &stream)?),
            P(storage_ptr(&k, &stream)?),
            P(storage_ptr(&v, &stream)?),
            P(storage_ptr(&starts, &stream)?),
            P(slice_ptr(&out, &stream)),
            I(t as i32),
            I((total - t) as i32),
            I(total as i32),
            I(nh as i32),
            I(nkv as i32),
            I(hb as i32),
            P(slice_ptr(&lse, &stream)),
        ];
        let f = kernel(dev, &format!("span_attention_lse_mma_{d}"))?;
        launch(&stream, &f, false, (t.div_ceil(queries) as u32, (nh / hb) as u32, b as u32), threads, 0, &args)?;
        Ok((tensor_of(out, dev, (b, t, nh * d))?, tensor_of(lse, dev, (b, nh, t))?))
    }

    /// The training attention's backward pass (`attention_delta`, `attention_dq_mma`, `attention_dkdv_mma`):
    /// from the forward's inputs, its output `out` and lse, and the output's gradient `g` `[b, t, heads · d]`,
    /// the gradients of `q` (the scaled queries), `k` and `v` in their shapes. No score matrix is stored.
    pub fn train_attention_backward(
        q: &candle_core::Tensor,
        k: &candle_core::Tensor,
        v: &candle_core::Tensor,
        out: &candle_core::Tensor,
        g: &candle_core::Tensor,
        lse: &candle_core::Tensor,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
        use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = q.device() else { candle_core::bail!("train attention: not on CUDA") };
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, total, _) = k.dims4()?;
        let stream = dev.cuda_stream();
        let (q, k, v, out) = (aligned(q)?, aligned(k)?, aligned(v)?, aligned(out)?);
        let g = aligned(&g.to_dtype(DType::BF16)?)?;
        use Arg::{I, P};
        let rows = b * t * nh;
        // SAFETY: each kernel writes every element of its outputs.
        let delta: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows)? };
        let f = kernel(dev, "attention_delta")?;
        let args = [
            P(storage_ptr(&out, &stream)?),
            P(storage_ptr(&g, &stream)?),
            P(slice_ptr(&delta, &stream)),
            I(rows as i32),
            I(nh as i32),
            I(t as i32),
            I(d as i32),
        ];
        launch(&stream, &f, false, ((rows * 32).div_ceil(256) as u32, 1, 1), 256, 0, &args)?;
        let dq: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * nh * t * d)? };
        let dk: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * nkv * total * d)? };
        let dv: CudaSlice<bf16> = unsafe { dev.alloc::<bf16>(b * nkv * total * d)? };
        let common = [
            P(storage_ptr(&q, &stream)?),
            P(storage_ptr(&k, &stream)?),
            P(storage_ptr(&v, &stream)?),
            P(storage_ptr(&g, &stream)?),
            P(storage_ptr(lse, &stream)?),
            P(slice_ptr(&delta, &stream)),
        ];
        let sizes = [I(t as i32), I(total as i32), I(nh as i32), I(nkv as i32)];
        let rows_per_block = 16 * TRAIN_ATTENTION_WARPS;
        let f = kernel(dev, &format!("attention_dq_mma_{d}"))?;
        let args: Vec<Arg> = common.iter().copied().chain([P(slice_ptr(&dq, &stream))]).chain(sizes).collect();
        let grid = (t.div_ceil(rows_per_block) as u32, nh as u32, b as u32);
        launch(&stream, &f, false, grid, 32 * TRAIN_ATTENTION_WARPS as u32, 0, &args)?;
        // A block per query head; with groups, each head's share of dK / dV in f32, added up afterwards.
        let groups = nh / nkv;
        // SAFETY: with groups the key-value kernel writes every element (each head's share of each key row).
        let part: Option<CudaSlice<f32>> =
            if groups > 1 { Some(unsafe { dev.alloc::<f32>(2 * b * nh * total * d)? }) } else { None };
        let part_ptr = part.as_ref().map_or(0, |p| slice_ptr(p, &stream));
        let f = kernel(dev, &format!("attention_dkdv_mma_{d}"))?;
        let outs = [P(slice_ptr(&dk, &stream)), P(slice_ptr(&dv, &stream)), P(part_ptr)];
        let args: Vec<Arg> = common.iter().copied().chain(outs).chain(sizes).collect();
        let grid = (total.div_ceil(rows_per_block) as u32, nh as u32, b as u32);
        launch(&stream, &f, false, grid, 32 * TRAIN_ATTENTION_WARPS as u32, 0, &args)?;
        if part.is_some() {
            let n = b * nkv * total * d;
            let f = kernel(dev, "attention_sum_groups")?;
            let args = [
                P(part_ptr),
                P(slice_ptr(&dk, &stream)),
                P(slice_ptr(&dv, &stream)),
                Arg::P(n as u64), // a 64-bit count, in the 8-byte slot
                I(groups as i32),
                I((total * d) as i32),
            ];
            launch(&stream, &f, false, (n.div_ceil(256).min(65_535) as u32, 1, 1), 256, 0, &args)?;
        }
        let dq = tensor_of(dq, dev, (b, nh, t, d))?;
        Ok((dq, tensor_of(dk, dev, (b, nkv, total, d))?, tensor_of(dv, dev, (b, nkv, total, d))?))
    }

    /// The training loss over bf16 logits `[rows, n]` and u32 targets `[rows]` in one kernel
    /// (`cross_entropy_rows_bf16`): each row's negative log-likelihood (f32 `[rows]`) and, `with_grad`, the
    /// logits' gradient `softmax - onehot` (bf16 `[rows, n]`).
    pub fn cross_entropy_rows(
        logits: &candle_core::Tensor,
        targets: &candle_core::Tensor,
        with_grad: bool,
    ) -> Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
        use crate::ops::launch::{launch, slice_ptr, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = logits.device() else { candle_core::bail!("cross entropy: not on CUDA") };
        let (rows, n) = logits.dims2()?;
        if logits.dtype() != DType::BF16 || targets.dtype() != DType::U32 || targets.dims() != [rows] {
            candle_core::bail!("cross entropy: bf16 logits [rows, n] and u32 targets [rows] expected");
        }
        let stream = dev.cuda_stream();
        let (logits, targets) = (logits.contiguous()?, targets.contiguous()?);
        // SAFETY: the kernel writes every element of both (one block per row).
        let loss: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows)? };
        let d: Option<CudaSlice<bf16>> = if with_grad { Some(unsafe { dev.alloc::<bf16>(rows * n)? }) } else { None };
        let args = [
            Arg::P(storage_ptr(&aligned(&logits)?, &stream)?),
            Arg::P(storage_ptr(&targets, &stream)?),
            Arg::P(slice_ptr(&loss, &stream)),
            Arg::P(d.as_ref().map_or(0, |d| slice_ptr(d, &stream))),
            Arg::I(n as i32),
        ];
        let f = kernel(dev, "cross_entropy_rows_bf16")?;
        launch(&stream, &f, false, (rows as u32, 1, 1), 512, 0, &args)?;
        let d = d.map(|d| tensor_of(d, dev, (rows, n))).transpose()?;
        Ok((tensor_of(loss, dev, rows)?, d))
    }

    /// Adapter ranks the fused LoRA kernels are built for (`LORA_RANKS` in kernels.cu).
    pub const LORA_RANKS: [usize; 5] = [4, 8, 16, 32, 64];

    /// Columns a thread owns in the column-wise LoRA kernels (`LORA_COLS` in kernels.cu).
    fn lora_cols_per_thread(r: usize) -> usize {
        (32 / r).clamp(1, 8)
    }

    /// Rows a lane owns in `lora_rows` (`LORA_ROWS_PER_LANE` in kernels.cu).
    fn lora_rows_per_lane(r: usize) -> usize {
        match r {
            16.. => 1,
            8.. => 2,
            _ => 4,
        }
    }

    /// Rows of a block in `lora_expand`: each thread reads its columns' part of M once per block, which for B
    /// (`[cols, r]`, a thread's values contiguous, so a warp's loads touch 32 lines) pays over more rows on wide
    /// outputs. Measured on an H100 over 2,048 rows at rank 8: B over 512 / 2,048 / 8,192 columns fastest at
    /// 16 / 32 / 64 rows (7.2, 14.7, 37.1 µs), A at 16.
    fn lora_expand_rows(a_layout: bool, cols: usize) -> usize {
        match (a_layout, cols) {
            (true, _) | (false, ..=512) => LORA_MIN_EXPAND_ROWS,
            (false, ..=2048) => 32,
            _ => 64,
        }
    }

    /// The fewest rows of a `lora_expand` block (its grid's second dimension is at most 65,535).
    const LORA_MIN_EXPAND_ROWS: usize = 16;

    /// Blocks (of 4 warps) a LoRA pass aims for: eight per SM of an H100 / H200. These passes stream small
    /// contractions; with two blocks per SM they ran at 0.4–1.1 TB/s (too few loads in flight).
    const LORA_BLOCKS: usize = 1056;

    /// The dropout mask of a fused LoRA pass: the seed of `ops::backward::dropout_f32` and its 16-bit
    /// threshold (0: no dropout, [`LoraMask::NONE`]).
    #[derive(Clone, Copy)]
    pub struct LoraMask {
        pub seed: u64,
        pub threshold: u32,
    }

    impl LoraMask {
        pub const NONE: LoraMask = LoraMask { seed: 0, threshold: 0 };
    }

    /// The rank-r contraction of the rows: `scale · Σ_i keep(t, i) · x[t, i] · M(k, i)` for `x` `[rows, cols]`,
    /// M `a` `[r, cols]` (`a_layout`) or `b` `[cols, r]`, as `splits` partial sums over column ranges: f32
    /// `[splits, rows, r]` (the passes that read it add them).
    fn lora_rows(
        x: &candle_core::Tensor,
        m: &candle_core::Tensor,
        a_layout: bool,
        mask: LoraMask,
        scale: f32,
    ) -> Result<(candle_core::Tensor, usize)> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("lora: not on CUDA") };
        let (rows, cols) = x.dims2()?;
        let r = if a_layout { m.dim(0)? } else { m.dim(1)? };
        let stream = dev.cuda_stream();
        let row_blocks = rows.div_ceil(32 * lora_rows_per_lane(r));
        let splits = LORA_BLOCKS.div_ceil(row_blocks).clamp(1, (cols / 128).max(1));
        let split = cols.div_ceil(splits).next_multiple_of(8);
        let splits = cols.div_ceil(split);
        let part = uninit(dev, DType::F32, (splits * rows, r))?;
        let args = [
            Arg::P(storage_ptr(x, &stream)?),
            Arg::P(storage_ptr(m, &stream)?),
            Arg::P(storage_ptr(&part, &stream)?),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
            Arg::I(split as i32),
            Arg::F(scale),
            Arg::P(mask.seed),
            Arg::I(mask.threshold as i32),
        ];
        let layout = if a_layout { "a" } else { "b" };
        let f = kernel(dev, &format!("lora_rows_{layout}_{}_{r}", suffix(x.dtype())?))?;
        launch(&stream, &f, false, (row_blocks as u32, splits as u32, 1), 128, 0, &args)?;
        Ok((part, splits))
    }

    /// The rank-r contraction of the columns: `Σ_t keep(t, i) · x[t, i] · u[t, k]` for `x` `[rows, cols]`, `u`
    /// the sum of `splits` runs of f32 `[rows, r]` → f32 `[cols, r]`, or `[r, cols]` with `transpose`.
    fn lora_cols(
        x: &candle_core::Tensor,
        (u, u_splits): (&candle_core::Tensor, usize),
        mask: LoraMask,
        transpose: bool,
    ) -> Result<candle_core::Tensor> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("lora: not on CUDA") };
        let (rows, cols) = x.dims2()?;
        let r = u.dim(1)?;
        let stream = dev.cuda_stream();
        let c = lora_cols_per_thread(r);
        let col_blocks = cols.div_ceil(32 * c);
        // Shared memory: the warps' sums, and the split's rows of u (within the 48 KB a launch may ask for).
        let red_bytes = 4 * 32 * (c * r + 1) * 4;
        let max_split = (48 * 1024 - red_bytes) / (4 * r);
        // Half the blocks of the other passes: each split's partial sums are written and read once more, by
        // the last block of their columns (so at most 32 splits where the rows allow: that block's tail grows
        // with them).
        let splits = (LORA_BLOCKS / 2)
            .div_ceil(col_blocks)
            .clamp(1, rows.div_ceil(32).min(LORA_MAX_COL_SPLITS))
            .max(rows.div_ceil(max_split));
        let split = rows.div_ceil(splits);
        let splits = rows.div_ceil(split);
        let smem = (red_bytes + split * r * 4) as u32;
        let out = uninit(dev, DType::F32, if transpose { (r, cols) } else { (cols, r) })?;
        // One split writes the result itself; several write their sums apart for the last one to add.
        let part = if splits > 1 { Some(uninit(dev, DType::F32, (splits * cols, r))?) } else { None };
        let done = lora_counters(dev, col_blocks)?;
        let out_ptr = storage_ptr(&out, &stream)?;
        let args = [
            Arg::P(storage_ptr(x, &stream)?),
            Arg::P(storage_ptr(u, &stream)?),
            Arg::I(u_splits as i32),
            Arg::P(part.as_ref().map(|p| storage_ptr(p, &stream)).transpose()?.unwrap_or(out_ptr)),
            Arg::P(out_ptr),
            Arg::P(storage_ptr(&done, &stream)?),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
            Arg::I(split as i32),
            Arg::I(transpose as i32),
            Arg::F(1.0),
            Arg::P(mask.seed),
            Arg::I(mask.threshold as i32),
        ];
        let f = kernel(dev, &format!("lora_cols_{}_{r}", suffix(x.dtype())?))?;
        launch(&stream, &f, false, (col_blocks as u32, splits as u32, 1), 128, smem, &args)?;
        Ok(out)
    }

    /// Row splits a `lora_cols` launch aims at most for.
    const LORA_MAX_COL_SPLITS: usize = 32;

    /// Column ranges a `lora_cols` launch may count its finished splits in (a pass over 131,072 columns at
    /// one column a lane).
    const LORA_COUNTERS: usize = 4096;

    /// The zeroed counters `lora_cols`' last blocks find their turn by (each resets its own), one set per
    /// stream: launches on one stream run one after another.
    fn lora_counters(dev: &CudaDevice, n: usize) -> Result<candle_core::Tensor> {
        static COUNTERS: Mutex<Vec<(usize, candle_core::Tensor)>> = Mutex::new(Vec::new());
        if n > LORA_COUNTERS {
            candle_core::bail!("lora: {n} column ranges, at most {LORA_COUNTERS}");
        }
        let key = dev.cuda_stream().cu_stream() as usize;
        let mut counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = counters.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let t = candle_core::Tensor::zeros(LORA_COUNTERS, DType::U32, &candle_core::Device::Cuda(dev.clone()))?;
        counters.push((key, t.clone()));
        Ok(t)
    }

    /// `base + keep ⊙ (p · Mᵀ)` for `base` `[rows, cols]`, `p` the sum of `splits` runs of f32 `[rows, r]`, M
    /// `a` `[r, cols]` (`a_layout`) or `b` `[cols, r]`, in base's dtype; and p summed, f32 `[rows, r]`.
    fn lora_expand(
        base: &candle_core::Tensor,
        (p, splits): (&candle_core::Tensor, usize),
        m: &candle_core::Tensor,
        a_layout: bool,
        mask: LoraMask,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = base.device() else { candle_core::bail!("lora: not on CUDA") };
        let (rows, cols) = base.dims2()?;
        let r = p.dim(1)?;
        let stream = dev.cuda_stream();
        let y = uninit(dev, base.dtype(), (rows, cols))?;
        let p_sum = uninit(dev, DType::F32, (rows, r))?;
        let threads = 128;
        let col_blocks = cols.div_ceil(threads * lora_cols_per_thread(r));
        let block_rows = lora_expand_rows(a_layout, cols);
        let args = [
            Arg::P(storage_ptr(base, &stream)?),
            Arg::P(storage_ptr(p, &stream)?),
            Arg::I(splits as i32),
            Arg::P(storage_ptr(m, &stream)?),
            Arg::P(storage_ptr(&y, &stream)?),
            Arg::P(storage_ptr(&p_sum, &stream)?),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
            Arg::I(block_rows as i32),
            Arg::P(mask.seed),
            Arg::I(mask.threshold as i32),
        ];
        let layout = if a_layout { "a" } else { "b" };
        let f = kernel(dev, &format!("lora_expand_{layout}_{}_{r}", suffix(base.dtype())?))?;
        let grid = (col_blocks as u32, rows.div_ceil(block_rows) as u32, 1);
        launch(&stream, &f, false, grid, threads as u32, (block_rows * r * 4) as u32, &args)?;
        Ok((y, p_sum))
    }

    /// A tensor of `shape` whose every element the caller's kernel writes.
    fn uninit(dev: &CudaDevice, dtype: DType, shape: (usize, usize)) -> Result<candle_core::Tensor> {
        let n = shape.0 * shape.1;
        // SAFETY: the caller's kernel writes every element before anything reads them.
        unsafe {
            match dtype {
                DType::F32 => tensor_of(dev.alloc::<f32>(n)?, dev, shape),
                DType::BF16 => tensor_of(dev.alloc::<bf16>(n)?, dev, shape),
                DType::F16 => tensor_of(dev.alloc::<f16>(n)?, dev, shape),
                dt => candle_core::bail!("no fused CUDA kernel for {dt:?}"),
            }
        }
    }

    /// The GGUF types our kernels dequantize to bf16, with each one's kernel (`dequantize_bf16_*`): it takes
    /// (blocks in, bf16 out, 32-value groups), one thread per 32 consecutive values.
    pub const DEQUANTIZE_BF16_KERNELS: [(candle_core::quantized::GgmlDType, &str); 8] = {
        use candle_core::quantized::GgmlDType;
        [
            (GgmlDType::Q8_0, "dequantize_bf16_q8_0"),
            (GgmlDType::Q4_0, "dequantize_bf16_q4_0"),
            (GgmlDType::Q4_1, "dequantize_bf16_q4_1"),
            (GgmlDType::Q5_0, "dequantize_bf16_q5_0"),
            (GgmlDType::Q5_1, "dequantize_bf16_q5_1"),
            (GgmlDType::Q4K, "dequantize_bf16_q4k"),
            (GgmlDType::Q5K, "dequantize_bf16_q5k"),
            (GgmlDType::Q6K, "dequantize_bf16_q6k"),
        ]
    };

    /// The kernel that dequantizes weights of this GGUF type to bf16, if there is one
    /// ([`DEQUANTIZE_BF16_KERNELS`]).
    pub fn dequantize_bf16_kernel(dtype: candle_core::quantized::GgmlDType) -> Option<&'static str> {
        DEQUANTIZE_BF16_KERNELS.iter().find(|(t, _)| *t == dtype).map(|&(_, name)| name)
    }

    /// The grid of a dequantization kernel over `groups` 32-value groups (256 threads a block).
    pub fn dequantize_grid(groups: usize) -> (u32, u32, u32) {
        (groups.div_ceil(256).min(65_535) as u32, 1, 1)
    }

    /// A quantized weight `[rows, cols]` on the GPU dequantized to bf16 by our kernels (see
    /// [`dequantize_bf16_kernel`]); `None` for other formats.
    pub fn dequantize_bf16(q: &candle_core::quantized::QTensor) -> Result<Option<candle_core::Tensor>> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let Some(name) = dequantize_bf16_kernel(q.dtype()) else { return Ok(None) };
        let candle_core::Device::Cuda(dev) = q.device() else { return Ok(None) };
        let (rows, cols) = q.shape().dims2()?;
        let groups = rows * cols / 32;
        let stream = dev.cuda_stream();
        let out = uninit(&dev, DType::BF16, (rows, cols))?;
        let args = [Arg::P(q.device_ptr()? as u64), Arg::P(storage_ptr(&out, &stream)?), Arg::P(groups as u64)];
        let f = kernel(&dev, name)?;
        launch(&stream, &f, false, dequantize_grid(groups), 256, 0, &args)?;
        Ok(Some(out))
    }

    /// Can the fused LoRA kernels take this layer: x `[rows, in]` in f32 / bf16 / f16 with rows in `lora_expand`'s
    /// grid, the adapter f32 of a built rank, both widths multiples of 8 and within `lora_cols`' counters.
    pub fn lora_fits(
        x_dtype: DType,
        adapter_dtype: DType,
        rank: usize,
        (rows, in_f, out_f): (usize, usize, usize),
    ) -> bool {
        (1..=65_535 * LORA_MIN_EXPAND_ROWS).contains(&rows)
            && matches!(x_dtype, DType::F32 | DType::BF16 | DType::F16)
            && adapter_dtype == DType::F32
            && LORA_RANKS.contains(&rank)
            && in_f.is_multiple_of(8)
            && out_f.is_multiple_of(8)
            && in_f.max(out_f) <= 32 * LORA_COUNTERS
    }

    /// The LoRA layer's forward pass over the frozen base's product `base` `[rows, out]`: `y = base + scale ·
    /// (keep ⊙ x) Aᵀ Bᵀ` and the rank-r activations `u = scale · (keep ⊙ x) Aᵀ` (f32 `[rows, r]`, kept for
    /// the backward pass). `x` `[rows, in]`, `a` `[r, in]`, `b` `[out, r]` f32.
    pub fn lora_forward(
        x: &candle_core::Tensor,
        base: &candle_core::Tensor,
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        scale: f32,
        mask: LoraMask,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let (x, base) = (aligned(x)?, aligned(&base.to_dtype(x.dtype())?)?);
        let (a, b) = (aligned(a)?, aligned(b)?);
        let (parts, splits) = lora_rows(&x, &a, true, mask, scale)?;
        lora_expand(&base, (&parts, splits), &b, false, LoraMask::NONE)
    }

    /// The LoRA layer's backward pass from the output's gradient `g` `[rows, out]` and the forward's `u`:
    /// `dx = dx_base + keep ⊙ (h A)` with `h = scale · g B`, `dA = hᵀ (keep ⊙ x)`, `dB = gᵀ u`, each only
    /// when asked for (`dx_base`: the frozen base's input gradient, given when dx is wanted).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        x: &candle_core::Tensor,
        g: &candle_core::Tensor,
        dx_base: Option<&candle_core::Tensor>,
        a: &candle_core::Tensor,
        b: &candle_core::Tensor,
        u: &candle_core::Tensor,
        scale: f32,
        mask: LoraMask,
        need_da: bool,
        need_db: bool,
    ) -> Result<LoraGrads> {
        let (x, g) = (aligned(x)?, aligned(&g.to_dtype(x.dtype())?)?);
        let (a, b) = (aligned(a)?, aligned(b)?);
        let db = if need_db { Some(lora_cols(&g, (u, 1), LoraMask::NONE, false)?) } else { None };
        if !need_da && dx_base.is_none() {
            return Ok(LoraGrads { dx: None, da: None, db });
        }
        let (h_parts, splits) = lora_rows(&g, &b, false, LoraMask::NONE, scale)?;
        let (dx, h) = match dx_base {
            Some(base) => {
                let (dx, h) = lora_expand(&aligned(&base.to_dtype(x.dtype())?)?, (&h_parts, splits), &a, true, mask)?;
                (Some(dx), (h, 1))
            }
            None => (None, (h_parts, splits)),
        };
        let da = if need_da { Some(lora_cols(&x, (&h.0, h.1), mask, true)?) } else { None };
        Ok(LoraGrads { dx, da, db })
    }

    /// Rotary embedding between the layouts of training (`rope_strided` in kernels.cu): `x` `[b, heads, t, d]`
    /// with any strides but a contiguous last dim, `tables` cos / sin `[t, rot / 2]` (none when rot is 0: a
    /// relayout); `y = scale · R(sign · θ) x` over
    /// the first `rot` dims of each head, the rest times `scale`. The result is `[b, heads, t, d]`, stored
    /// contiguously, or with `token_major` as `[b, t, heads, d]` memory (a transposed view: the layout of the
    /// projection a gradient goes back to).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_strided(
        x: &candle_core::Tensor,
        tables: Option<(&candle_core::Tensor, &candle_core::Tensor)>,
        rot: usize,
        interleaved: bool,
        scale: f32,
        sign: f32,
        token_major: bool,
    ) -> Result<candle_core::Tensor> {
        use crate::ops::launch::{launch, storage_ptr, view_ptr, Arg};
        let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("rope: not on CUDA") };
        let (b, h, t, d) = x.dims4()?;
        let stride = x.layout().stride();
        let tables_fit = match tables {
            Some((cos, sin)) => cos.dims2()? == (t, rot / 2) && sin.dims2()? == (t, rot / 2),
            None => rot == 0,
        };
        if stride[3] != 1 || rot > d || !rot.is_multiple_of(2) || !tables_fit {
            candle_core::bail!("rope: unexpected shapes {:?} (rot {rot}, strides {stride:?})", x.dims());
        }
        let stream = dev.cuda_stream();
        // The tables in x's dtype, kept alive until the launch (none: a relayout only).
        let tables = match tables {
            Some((cos, sin)) => Some((cos.to_dtype(x.dtype())?.contiguous()?, sin.to_dtype(x.dtype())?.contiguous()?)),
            None => None,
        };
        let (cos_ptr, sin_ptr) = match &tables {
            Some((cos, sin)) => (storage_ptr(cos, &stream)?, storage_ptr(sin, &stream)?),
            None => (0, 0),
        };
        let (y, ys) = if token_major {
            (uninit4(dev, x.dtype(), (b, t, h, d))?, [t * h * d, d, h * d])
        } else {
            (uninit4(dev, x.dtype(), (b, h, t, d))?, [h * t * d, t * d, d])
        };
        let x_ptr = view_ptr(x, &stream)?;
        // 16 bytes a load where every row, pair half and table row starts on a 16-byte boundary (2-byte types).
        let aligned16 = |p: u64| p.is_multiple_of(16);
        let vec = x.dtype().size_in_bytes() == 2
            && (if interleaved { rot.is_multiple_of(8) } else { (rot / 2).is_multiple_of(8) })
            && (d - rot).is_multiple_of(8)
            && stride[..3].iter().all(|s| s.is_multiple_of(8))
            && aligned16(x_ptr)
            && (rot == 0 || (aligned16(cos_ptr) && aligned16(sin_ptr)));
        let units = match (vec, interleaved) {
            (true, true) => rot / 8 + (d - rot) / 8,
            (true, false) => rot / 16 + (d - rot) / 8,
            (false, _) => rot / 2 + (d - rot),
        };
        let n = b * h * t * units;
        use Arg::{F, I, P};
        let args = [
            P(x_ptr),
            P(stride[0] as u64),
            P(stride[1] as u64),
            P(stride[2] as u64),
            P(cos_ptr),
            P(sin_ptr),
            P(storage_ptr(&y, &stream)?),
            P(ys[0] as u64),
            P(ys[1] as u64),
            P(ys[2] as u64),
            I(b as i32),
            I(h as i32),
            I(t as i32),
            I(d as i32),
            I(rot as i32),
            I(interleaved as i32),
            F(scale),
            F(sign),
        ];
        let name = if vec { "rope_strided_vec" } else { "rope_strided" };
        let f = kernel(dev, &format!("{name}_{}", suffix(x.dtype())?))?;
        launch(&stream, &f, false, (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1), 256, 0, &args)?;
        if token_major {
            y.transpose(1, 2)
        } else {
            Ok(y)
        }
    }

    /// `out` `[out_rows, cols]` zeros with `out[rows[i]] += g[i]` for `g` `[n, cols]` (f32 / bf16 / f16, cols
    /// even) and u32 `rows` `[n]`: the gradient of selecting rows (candle's index_add walks the rows in turn
    /// over one block per 1,024 columns: 1.1 ms for Llama-3.2-1B's 2,044 × 2,048).
    pub fn scatter_add_rows(
        g: &candle_core::Tensor,
        rows: &candle_core::Tensor,
        out_rows: usize,
    ) -> Result<candle_core::Tensor> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = g.device() else { candle_core::bail!("scatter rows: not on CUDA") };
        let (n, cols) = g.dims2()?;
        if rows.dims() != [n] || rows.dtype() != DType::U32 || !cols.is_multiple_of(2) {
            candle_core::bail!("scatter rows: [n, even cols] and u32 [n] rows expected");
        }
        let stream = dev.cuda_stream();
        let (g, rows) = (g.contiguous()?, rows.contiguous()?);
        let out = candle_core::Tensor::zeros((out_rows, cols), g.dtype(), g.device())?;
        let args = [
            Arg::P(storage_ptr(&g, &stream)?),
            Arg::P(storage_ptr(&rows, &stream)?),
            Arg::P(storage_ptr(&out, &stream)?),
            Arg::P(n as u64),
            Arg::I(cols as i32),
        ];
        let f = kernel(dev, &format!("scatter_add_rows_{}", suffix(g.dtype())?))?;
        let blocks = (n * cols / 2).div_ceil(256).clamp(1, 65_535) as u32;
        launch(&stream, &f, false, (blocks, 1, 1), 256, 0, &args)?;
        Ok(out)
    }

    /// `Σ x²` of a contiguous f32 tensor as a scalar f32 tensor: many blocks' partial sums, then one block's sum
    /// of those in order.
    pub fn sum_squares(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = x.device() else { candle_core::bail!("sum of squares: not on CUDA") };
        if x.dtype() != DType::F32 {
            candle_core::bail!("sum of squares: f32 expected");
        }
        let x = x.contiguous()?;
        let n = x.elem_count();
        let stream = dev.cuda_stream();
        let blocks = n.div_ceil(256 * 8).clamp(1, 1024);
        let partial = uninit(dev, DType::F32, (blocks, 1))?;
        let out = uninit(dev, DType::F32, (1, 1))?;
        let args = [Arg::P(storage_ptr(&x, &stream)?), Arg::P(n as u64), Arg::P(storage_ptr(&partial, &stream)?)];
        launch(&stream, &kernel(dev, "sum_squares_f32")?, false, (blocks as u32, 1, 1), 256, 0, &args)?;
        let args =
            [Arg::P(storage_ptr(&partial, &stream)?), Arg::I(blocks as i32), Arg::P(storage_ptr(&out, &stream)?)];
        launch(&stream, &kernel(dev, "sum_partials_f32")?, false, (1, 1, 1), 1024, 0, &args)?;
        out.reshape(())
    }

    /// `a + b` through one 16-byte-wide kernel when both are contiguous CUDA tensors of one float dtype and
    /// shape whose data start on 16-byte boundaries and whose size is whole 16-byte vectors; `None` otherwise.
    /// The backward pass's gradient sums take it (`install_grad_add`).
    pub fn add_same(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<Option<candle_core::Tensor>> {
        use crate::ops::launch::{launch, storage_ptr, Arg};
        let candle_core::Device::Cuda(dev) = a.device() else { return Ok(None) };
        let dtype = a.dtype();
        let n = a.elem_count();
        let whole = |t: &candle_core::Tensor| t.is_contiguous() && starts_on_16_bytes(t);
        // Sums that are themselves differentiated (second-order gradients) keep candle's tracked addition.
        if a.track_op() || b.track_op() {
            return Ok(None);
        }
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            || b.dtype() != dtype
            || a.shape() != b.shape()
            || !b.device().same_device(a.device())
            || !(n * dtype.size_in_bytes()).is_multiple_of(16)
            || n == 0
            || !whole(a)
            || !whole(b)
        {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        let y = uninit(dev, dtype, (n, 1))?;
        let args = [
            Arg::P(storage_ptr(a, &stream)?),
            Arg::P(storage_ptr(b, &stream)?),
            Arg::P(storage_ptr(&y, &stream)?),
            Arg::P(n as u64),
        ];
        let vectors = n * dtype.size_in_bytes() / 16;
        let f = kernel(dev, &format!("add_vec_{}", suffix(dtype)?))?;
        launch(&stream, &f, false, (vectors.div_ceil(256).clamp(1, 65_535) as u32, 1, 1), 256, 0, &args)?;
        Ok(Some(y.reshape(a.shape())?))
    }

    /// Route the backward pass's sums of two gradients through [`add_same`] where it applies.
    pub fn install_grad_add() {
        candle_core::backprop::set_grad_add(add_same);
    }

    /// A 4-d tensor of `shape` whose every element the caller's kernel writes.
    fn uninit4(dev: &CudaDevice, dtype: DType, shape: (usize, usize, usize, usize)) -> Result<candle_core::Tensor> {
        let (a, b, c, d) = shape;
        uninit(dev, dtype, (a * b * c, d))?.reshape(shape)
    }

    /// What [`lora_backward`] computed: the input's, A's and B's gradients.
    pub struct LoraGrads {
        pub dx: Option<candle_core::Tensor>,
        pub da: Option<candle_core::Tensor>,
        pub db: Option<candle_core::Tensor>,
    }

    /// Warps per block of the training attention's backward kernels (`TRAIN_ATT_WARPS` in kernels.cu).
    const TRAIN_ATTENTION_WARPS: usize = 4;

    /// Does `t`'s data start on a 16-byte boundary of its storage (our kernels load 16 bytes at a time)?
    fn starts_on_16_bytes(t: &candle_core::Tensor) -> bool {
        (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
    }

    /// `x` as it is when its data starts on a 16-byte boundary (our kernels load 8 bf16 at a time), else a
    /// compact copy (a view into a larger tensor at an odd offset).
    fn aligned(x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let x = x.contiguous()?;
        if starts_on_16_bytes(&x) {
            Ok(x)
        } else {
            x.copy()
        }
    }

    /// A slice our kernel filled, as a tensor of `shape` outside any graph.
    fn tensor_of<T: candle_core::cuda_backend::CudaDType>(
        s: CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<candle_core::Shape>,
    ) -> Result<candle_core::Tensor> {
        let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
        Ok(candle_core::Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false))
    }

    pub fn swiglu(g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<CudaStorage> {
        let dev = g.device();
        let n = gl.shape().elem_count();
        let bad = || candle_core::Error::Msg("swiglu: inputs not contiguous".into());
        let (g1, g2) = gl.contiguous_offsets().ok_or_else(bad)?;
        let (u1, u2) = ul.contiguous_offsets().ok_or_else(bad)?;
        let f = kernel(dev, &format!("swiglu_{}", suffix(g.dtype())?))?;
        let stream = dev.cuda_stream();
        // Eight values a thread where the kernel can (16-byte loads).
        let cfg = grid_stride(n.div_ceil(8));
        let n64 = n as u64;
        macro_rules! run {
            ($t:ty, $g:expr, $u:expr, $variant:ident) => {{
                let (gv, uv) = ($g.slice(g1..g2), $u.slice(u1..u2));
                // SAFETY: the kernel writes every element of `y`.
                let y: CudaSlice<$t> = unsafe { dev.alloc::<$t>(n)? };
                let mut b = stream.launch_builder(&f);
                b.arg(&gv).arg(&uv).arg(&y).arg(&n64);
                unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
                wrap(dev, CudaStorageSlice::$variant(y))
            }};
        }
        Ok(match (&g.slice, &u.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => run!(f32, a, b, F32),
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => run!(bf16, a, b, BF16),
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => run!(f16, a, b, F16),
            _ => candle_core::bail!("swiglu: unsupported or mismatched dtypes"),
        })
    }

    /// `sample_rows(x, params, out, n)`: one block of 1024 threads per row.
    pub fn sample_rows(
        s: &CudaStorage,
        l: &Layout,
        p: &CudaStorage,
        pl: &Layout,
        rows: usize,
        n: usize,
    ) -> Result<CudaStorage> {
        let dev = s.device();
        let bad = || candle_core::Error::Msg("sample_rows: inputs not contiguous".into());
        let (o1, o2) = l.contiguous_offsets().ok_or_else(bad)?;
        let (p1, p2) = pl.contiguous_offsets().ok_or_else(bad)?;
        let (CudaStorageSlice::F32(x), CudaStorageSlice::U32(w)) = (&s.slice, &p.slice) else {
            candle_core::bail!("sample_rows: expected f32 logits and u32 draws")
        };
        let f = kernel(dev, "sample_rows")?;
        let stream = dev.cuda_stream();
        let (x, w) = (x.slice(o1..o2), w.slice(p1..p2));
        // SAFETY: one block per row writes each element of `y`.
        let y: CudaSlice<u32> = unsafe { dev.alloc::<u32>(rows)? };
        let n32 = n as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&w).arg(&y).arg(&n32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(wrap(dev, CudaStorageSlice::U32(y)))
    }

    pub fn argmax(s: &CudaStorage, l: &Layout, n: usize) -> Result<CudaStorage> {
        let dev = s.device();
        let rows = l.shape().elem_count() / n.max(1);
        let (o1, o2) =
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("argmax: input not contiguous".into()))?;
        let CudaStorageSlice::F32(x) = &s.slice else { candle_core::bail!("argmax: expected f32") };
        let f = kernel(dev, "argmax_f32")?;
        let stream = dev.cuda_stream();
        let x = x.slice(o1..o2);
        // SAFETY: one block per row writes each element of `y`.
        let y: CudaSlice<u32> = unsafe { dev.alloc::<u32>(rows)? };
        let n32 = n as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&y).arg(&n32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(wrap(dev, CudaStorageSlice::U32(y)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    use crate::testing::seeded_randn;

    /// Our bf16 dequantization kernels give candle's f32 dequantization rounded to bf16.
    #[cfg(feature = "cuda")]
    #[test]
    fn dequantize_bf16_rounds_candles_dequantization() -> Result<()> {
        use candle_core::quantized::QTensor;
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let w = seeded_randn(140, 0.0, 0.5, &[48, 512]);
        for (dtype, _) in cuda::DEQUANTIZE_BF16_KERNELS {
            let q = QTensor::quantize_onto(&w, dtype, &gpu)?;
            let ours = cuda::dequantize_bf16(&q)?.expect("a kernel for this format").to_dtype(DType::F32)?;
            let want = q.dequantize(&gpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            // Equal but for a rounding tie the two compilers' fused multiply-adds may break apart: one bf16 step.
            let size = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= size / 128.0, "{dtype:?}: differs by {d} (largest {size})");
        }
        Ok(())
    }

    /// The split softmax equals the span softmax over the joined scores (CPU), and its kernel the CPU (CUDA).
    #[test]
    fn split_softmax_equals_the_joined_one() -> Result<()> {
        // 3 sequences, 2 KV heads x 2 query heads each, 2 new tokens after 3 own columns, a prefix of 5.
        let (seqs, kv, g, t, offset, prefix) = (3, 2, 2, 2, 3, 5);
        let shared = seeded_randn(3, 0.0, 2.0, &[kv, seqs * g * t, prefix]);
        let own = seeded_randn(4, 0.0, 2.0, &[seqs, kv, g * t, offset + t]);
        let starts = Tensor::new(&[0u32, 2, 4], &Device::Cpu)?;
        let joined =
            Tensor::cat(&[&shared.reshape((kv, seqs, g * t, prefix))?.transpose(0, 1)?.contiguous()?, &own], 3)?;
        let want = span_softmax(&joined, &starts, t, offset, prefix)?;
        let (ps, po) = span_softmax_split(&shared, &own, &starts, t, offset, prefix)?;
        // Padding columns after the prefix get probability 0 and change nothing else.
        let (pps, ppo) = span_softmax_split(&shared.pad_with_zeros(2, 0, 3)?, &own, &starts, t, offset, prefix)?;
        let dpad = (pps.narrow(2, 0, prefix)? - &ps)?.abs()?.max_all()?.to_scalar::<f32>()?
            + pps.narrow(2, prefix, 3)?.abs()?.max_all()?.to_scalar::<f32>()?
            + (ppo - &po)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(dpad < 1e-6, "padding columns changed the split softmax by {dpad}");
        let got = Tensor::cat(&[&ps.reshape((kv, seqs, g * t, prefix))?.transpose(0, 1)?, &po], 3)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "split softmax differs from the joined one by {d}");
        #[cfg(feature = "cuda")]
        if let Ok(gpu) = Device::new_cuda(0) {
            let (sg, og, stg) = (shared.to_device(&gpu)?, own.to_device(&gpu)?, starts.to_device(&gpu)?);
            let (gs, go) = span_softmax_split(&sg, &og, &stg, t, offset, prefix)?;
            let ds = (gs.to_device(&Device::Cpu)? - &ps)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let dov = (go.to_device(&Device::Cpu)? - &po)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(ds < 1e-5 && dov < 1e-5, "CUDA split softmax differs from the CPU by {ds} / {dov}");
        }
        Ok(())
    }

    #[test]
    fn span_attention_blocks_take_a_group_together() {
        // (heads per block, query positions per block, threads)
        assert_eq!(span_attention_blocks(32, 4), (8, 16, 256)); // TinyLlama
        assert_eq!(span_attention_blocks(32, 8), (4, 16, 128)); // Llama-3.2-1B
        assert_eq!(span_attention_blocks(32, 32), (1, 64, 128)); // Llama-2-7B
        assert_eq!(span_attention_blocks(9, 3), (3, 32, 192)); // SmolLM2-135M
        assert_eq!(span_attention_blocks(64, 4), (1, 64, 128)); // a group of 16: one head a block
    }

    /// The tensor-core span attention against a plain loop over the visible columns (where a GPU is present):
    /// rows with different starts, a row whose first queries see nothing (zeros), with and without a prefix.
    #[cfg(feature = "cuda")]
    #[test]
    fn span_attention_on_cuda_matches_a_plain_loop() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        // Groups of 2, 8, 1 and 3 query heads per KV head: blocks of 2, 8, 1 and 3 heads (4, 8, 4 and 6 warps).
        // The second geometry crosses several key / value stages, of the prefix and of the rows' own columns, with
        // partly filled halves.
        let geometries = [(3usize, 37usize, 6usize, 48usize, 7usize), (2, 100, 6, 120, 90)];
        let heads = [(64usize, 4usize, 2usize), (128, 4, 2), (64, 8, 1), (128, 8, 1), (64, 3, 3), (128, 6, 2)];
        for ((d, nh, nkv), (b, t, prev, cap, p)) in heads.into_iter().flat_map(|h| geometries.map(|g| (h, g))) {
            let bf = |t: Tensor| t.to_dtype(DType::BF16).and_then(|t| t.to_dtype(DType::F32));
            let q = bf(seeded_randn(11, 0.0, 0.5, &[b, nh, t, d]))?;
            let k = bf(seeded_randn(12, 0.0, 1.0, &[b, nkv, cap, d]))?;
            let v = bf(seeded_randn(13, 0.0, 1.0, &[b, nkv, cap, d]))?;
            let kp = bf(seeded_randn(14, 0.0, 1.0, &[1, nkv, p, d]))?;
            let vp = bf(seeded_randn(15, 0.0, 1.0, &[1, nkv, p, d]))?;
            let starts = [0u32, 3, 8][..b].to_vec();
            let (qv, kv, vv) = (
                q.flatten_all()?.to_vec1::<f32>()?,
                k.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            );
            let (kpv, vpv) = (kp.flatten_all()?.to_vec1::<f32>()?, vp.flatten_all()?.to_vec1::<f32>()?);
            for with_prefix in [false, true] {
                let g16 = |x: &Tensor| x.to_dtype(DType::BF16).and_then(|x| x.to_device(&gpu));
                let st = Tensor::new(starts.as_slice(), &gpu)?;
                let (gkp, gvp) = (g16(&kp)?, g16(&vp)?);
                let prefix = with_prefix.then_some((&gkp, &gvp));
                let got = span_attention(&g16(&q)?, &g16(&k)?, &g16(&v)?, &st, prefix, prev)?.expect("applies");
                let got = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                let mut worst = 0f32;
                for bi in 0..b {
                    for h in 0..nh {
                        let g = h / (nh / nkv);
                        for i in 0..t {
                            let qr = &qv[((bi * nh + h) * t + i) * d..][..d];
                            let mut cols: Vec<(&[f32], &[f32])> = vec![];
                            if with_prefix {
                                for c in 0..p {
                                    let at = (g * p + c) * d;
                                    cols.push((&kpv[at..at + d], &vpv[at..at + d]));
                                }
                            }
                            for c in starts[bi] as usize..=prev + i {
                                let at = ((bi * nkv + g) * cap + c) * d;
                                cols.push((&kv[at..at + d], &vv[at..at + d]));
                            }
                            let scores: Vec<f32> =
                                cols.iter().map(|(kc, _)| kc.iter().zip(qr).map(|(a, b)| a * b).sum()).collect();
                            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                            let sum: f32 = e.iter().sum();
                            for j in 0..d {
                                let want: f32 = if cols.is_empty() {
                                    0.0
                                } else {
                                    e.iter().zip(&cols).map(|(w, (_, vc))| w * vc[j]).sum::<f32>() / sum
                                };
                                let have = got[(bi * t + i) * nh * d + h * d + j];
                                worst = worst.max((have - want).abs());
                            }
                        }
                    }
                }
                assert!(worst < 0.03, "head dim {d}, {t} queries, prefix {with_prefix}: worst difference {worst}");
            }
        }
        Ok(())
    }

    #[test]
    fn sample_rows_draws_from_the_filtered_distribution() -> Result<()> {
        let logits = [1.0f32, 3.0, 2.0, 0.0, 2.5];
        for (top_k, top_p) in [(0, 1.0f32), (3, 1.0), (0, 0.6), (4, 0.8)] {
            let want = crate::generation::sampling::probabilities(
                &logits,
                0.8,
                (top_k > 0).then_some(top_k as usize),
                (top_p < 1.0).then_some(top_p as f64),
            );
            let draws = 20_000;
            let rows: Vec<RowDraw> =
                (0..draws).map(|i| RowDraw { temperature: 0.8, top_p, top_k, seed: 42, draw: i as u32 }).collect();
            let x = Tensor::from_vec(logits.repeat(draws), (draws, logits.len()), &Device::Cpu)?;
            let tokens = sample_rows(&x, &rows)?.to_vec1::<u32>()?;
            for (j, &p) in want.iter().enumerate() {
                let seen = tokens.iter().filter(|&&t| t as usize == j).count() as f32 / draws as f32;
                assert!((seen - p).abs() < 0.015, "top_k {top_k} top_p {top_p}: token {j} drawn {seen}, expected {p}");
            }
        }
        // Greedy rows take the argmax; a seed and draw repeat their token.
        let x = Tensor::new(&[[0.5f32, 2.0, -1.0], [3.0, 0.0, 1.0]], &Device::Cpu)?;
        let greedy = [RowDraw { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 1, draw: 0 }; 2];
        assert_eq!(sample_rows(&x, &greedy)?.to_vec1::<u32>()?, vec![1, 0]);
        let hot = [RowDraw { temperature: 5.0, top_p: 1.0, top_k: 0, seed: 9, draw: 3 }; 2];
        assert_eq!(sample_rows(&x, &hot)?.to_vec1::<u32>()?, sample_rows(&x, &hot)?.to_vec1::<u32>()?);
        Ok(())
    }

    /// The CUDA kernel draws the CPU's tokens (where a GPU is present).
    #[cfg(feature = "cuda")]
    #[test]
    fn sample_rows_on_cuda_matches_the_cpu() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let rows = 96;
        let x = seeded_randn(5, 0.0, 3.0, &[rows, 32000]);
        let draws: Vec<RowDraw> = (0..rows)
            .map(|r| RowDraw {
                temperature: [0.0, 0.8, 1.3][r % 3],
                top_p: [1.0, 0.9, 0.5][(r / 3) % 3],
                top_k: [0, 40, 0, 7][r % 4],
                seed: 1000 + r as u64,
                draw: r as u32 * 3,
            })
            .collect();
        let cpu = sample_rows(&x, &draws)?.to_vec1::<u32>()?;
        let gpu = sample_rows(&x.to_device(&gpu)?, &draws)?.to_vec1::<u32>()?;
        let same = cpu.iter().zip(&gpu).filter(|(a, b)| a == b).count();
        assert!(same >= rows - 2, "CUDA drew {same} of {rows} rows as the CPU did");
        Ok(())
    }

    /// Softmax of one row over its first `visible` entries (the rest 0), in f64.
    fn plain_softmax(row: &[f32], visible: usize) -> Vec<f64> {
        let max = row[..visible].iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let e: Vec<f64> = row[..visible].iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..row.len()).map(|j| if j < visible { e[j] / sum } else { 0.0 }).collect()
    }

    #[test]
    fn masked_softmax_equals_a_plain_softmax_over_the_visible_columns() -> Result<()> {
        // 2 heads x 3 new tokens after 2 cached ones: query i sees columns 0..=2+i.
        let scores = seeded_randn(1, 0.0, 2.0, &[1, 2, 3, 5]);
        let mask = causal_mask(3, 2, DType::F32, &Device::Cpu)?;
        let p = masked_softmax(&scores, Some(&mask), 3, 2)?;
        assert_eq!(p.dtype(), DType::F32);
        let (s, v) = (scores.flatten_all()?.to_vec1::<f32>()?, p.flatten_all()?.to_vec1::<f32>()?);
        for r in 0..6 {
            let want = plain_softmax(&s[r * 5..r * 5 + 5], 2 + r % 3 + 1);
            for (got, want) in v[r * 5..r * 5 + 5].iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 1e-6, "row {r}: {got} vs {want}");
            }
        }
        // Without a mask (a single new token), every column counts.
        let one = seeded_randn(2, 0.0, 2.0, &[1, 2, 1, 5]);
        let p = masked_softmax(&one, None, 1, 4)?.flatten_all()?.to_vec1::<f32>()?;
        let s = one.flatten_all()?.to_vec1::<f32>()?;
        for r in 0..2 {
            for (got, want) in p[r * 5..r * 5 + 5].iter().zip(plain_softmax(&s[r * 5..r * 5 + 5], 5)) {
                assert!((*got as f64 - want).abs() < 1e-6);
            }
        }
        Ok(())
    }

    /// Two sequences (starts 0 and 2) of 2 new tokens after 2 own cached columns, after a 3-column shared
    /// prefix: each row is a plain softmax over the prefix and its own visible columns, zero elsewhere.
    #[test]
    fn span_softmax_sees_the_prefix_and_each_rows_own_columns() -> Result<()> {
        let (t, offset, prefix) = (2, 2, 3);
        let total = prefix + offset + t;
        let scores = seeded_randn(3, 0.0, 2.0, &[2, 3, t, total]);
        let starts = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let p = span_softmax(&scores, &starts, t, offset, prefix)?.flatten_all()?.to_vec1::<f32>()?;
        let s = scores.flatten_all()?.to_vec1::<f32>()?;
        for r in 0..12 {
            let (seq, i) = (r / 6, r % t);
            let visible: Vec<usize> =
                (0..total).filter(|&j| j < prefix || (j >= prefix + 2 * seq && j <= prefix + offset + i)).collect();
            let row: Vec<f32> = visible.iter().map(|&j| s[r * total + j]).collect();
            let want = plain_softmax(&row, row.len());
            for j in 0..total {
                let expected = visible.iter().position(|&v| v == j).map_or(0.0, |k| want[k]);
                assert!((p[r * total + j] as f64 - expected).abs() < 1e-6, "row {r} column {j}");
            }
        }
        Ok(())
    }

    #[test]
    fn swiglu_and_argmax_equal_their_definitions() -> Result<()> {
        let g = seeded_randn(3, 0.0, 2.0, &[2, 7]);
        let u = seeded_randn(4, 0.0, 1.0, &[2, 7]);
        let got = swiglu(&g, &u)?.flatten_all()?.to_vec1::<f32>()?;
        let (gv, uv) = (g.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
        for ((x, y), got) in gv.iter().zip(&uv).zip(&got) {
            let want = (*x as f64) / (1.0 + (-*x as f64).exp()) * *y as f64;
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        let arg = argmax_last(&g)?.to_vec1::<u32>()?;
        for (r, &a) in arg.iter().enumerate() {
            let row = &gv[r * 7..r * 7 + 7];
            let best = (0..7).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            assert_eq!(a as usize, best, "row {r}");
        }
        Ok(())
    }

    /// The CUDA kernels against the CPU definitions, where a GPU is present (`cargo test --features cuda`).
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_the_cpu() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a.to_dtype(DType::F32)?.to_device(&Device::Cpu)? - b.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar()
        };
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let (t, offset) = (7, 3);
            let scores = seeded_randn(5, 0.0, 2.0, &[2, 4, t, offset + t]);
            let mask = causal_mask(t, offset, DType::F32, &Device::Cpu)?;
            let want = masked_softmax(&scores, Some(&mask), t, offset)?;
            let got = masked_softmax(&scores.to_dtype(dtype)?.to_device(&gpu)?, None, t, offset)?;
            let d = max_diff(&got, &want)?;
            assert!(d < tol, "{dtype:?} causal softmax differs by {d}");
            // The reference sees the same rounded inputs; the kernel's result is rounded once more.
            let round = |t: Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
            let (g, u) = (round(seeded_randn(6, 0.0, 2.0, &[3, 64]))?, round(seeded_randn(7, 0.0, 1.0, &[3, 64]))?);
            let want = swiglu(&g, &u)?;
            let got = swiglu(&g.to_dtype(dtype)?.to_device(&gpu)?, &u.to_dtype(dtype)?.to_device(&gpu)?)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = max_diff(&got, &want)? / scale;
            assert!(d < tol, "{dtype:?} swiglu differs by {d} of the largest value");
        }
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let scores = seeded_randn(9, 0.0, 2.0, &[3, 4, 2, 3 + 40 + 2]);
            let starts = Tensor::new(&[0u32, 17, 39], &Device::Cpu)?;
            let want = span_softmax(&scores, &starts, 2, 40, 3)?;
            let got = span_softmax(&scores.to_dtype(dtype)?.to_device(&gpu)?, &starts.to_device(&gpu)?, 2, 40, 3)?;
            let d = max_diff(&got, &want)?;
            assert!(d < tol, "{dtype:?} span softmax differs by {d}");
        }
        let x = seeded_randn(8, 0.0, 1.0, &[3, 50_000]);
        let got = argmax_last(&x.to_device(&gpu)?)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
        assert_eq!(got, argmax_last(&x)?.to_vec1::<u32>()?);
        Ok(())
    }
}
