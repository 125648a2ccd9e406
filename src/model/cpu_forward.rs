//! Forward passes of one sequence on the CPU without tensor ops: decode steps and prompt prefill.
//!
//! Through candle's ops a layer is ~20 small ops, each allocating its output and handing work to a thread
//! pool: on a 135M model a decode step spends ~3 ms there beside ~4 ms of weight streaming, and a 260K model's
//! prefill is nothing but that overhead. Here a pass runs on buffers kept from one pass to the next: norms,
//! rotary, the KV-cache write, attention and the activations are plain loops over rows (spread over our
//! kernel threads), and every product takes the path a pass of as many rows of the regular forward takes
//! (`Linear::cpu_rows_product`: the tiled f32 GEMM or the 8-bit / half kernels), so the logits are those of
//! the regular path up to float summation order. Causal attention visits only the keys a query sees.
//!
//! The layers are any [`GraphLayer`] (llama, StableLM, GPT-NeoX): RMSNorm or LayerNorm, linear biases,
//! partial rotary, gated or plain MLP, parallel residual. Used for one sequence (batch 1, no per-row spans),
//! inference ops, f32 activations, on the CPU, with every linear weight of a type our products take (GGUF
//! blocks, f16/bf16, f32) and no unmerged adapter; anything else (and `BILLION_CPU_FORWARD=0`) goes through
//! the regular forward pass, which stays the reference.

// `let out = out;` in the task closures captures the whole `SharedOut` (Sync), not its raw pointer field.
#![allow(clippy::redundant_locals)]

use super::cache::KvCache;
use super::config::Activation;
use super::decode_graph::{GraphEngine, GraphLayer, GraphParts, QkvLinears};
use super::layers::Norm;
use super::linear::Linear;
use crate::ops::cpu::attention::{scores_tile, values_tile, KEY_TILE};
use crate::ops::cpu::exp_nonpositive;
use crate::ops::cpu::{dot_rows, pool};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor};
use std::cell::RefCell;

/// Set `BILLION_CPU_FORWARD=0` to run every CPU pass through the regular forward pass (for comparisons).
pub const DISABLE_ENV: &str = "BILLION_CPU_FORWARD";

/// Rows below which a row-wise loop stays on the calling thread.
const PARALLEL_ROWS: usize = 8;
/// Query rows per attention task in a prefill.
const ATTENTION_ROWS: usize = 8;

/// A norm's parameters as f32.
struct NormParts {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
    rms: bool,
}

impl NormParts {
    fn of(n: &Norm) -> Result<Self> {
        Ok(match n {
            Norm::Rms { weight, eps } => {
                NormParts { weight: weight.to_dtype(DType::F32)?.to_vec1()?, bias: None, eps: *eps as f32, rms: true }
            }
            Norm::Layer { weight, bias, eps } => NormParts {
                weight: weight.to_dtype(DType::F32)?.to_vec1()?,
                bias: bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?,
                eps: *eps as f32,
                rms: false,
            },
        })
    }

    /// `out = norm(x)` with candle's `rms_norm` / `layer_norm` arithmetic to the bit (the same operations in
    /// the same order): the products after it quantize their input to 8 bits, where one ulp can flip a
    /// rounding and part this step's logits from the regular path's.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        if self.rms {
            let m = (x.iter().map(|v| v * v).sum::<f32>() / n + self.eps).sqrt();
            for ((o, v), w) in out.iter_mut().zip(x).zip(&self.weight) {
                *o = v / m * w;
            }
            return;
        }
        let (mut sum, mut sum2) = (0f32, 0f32);
        for &v in x {
            sum += v;
            sum2 += v * v;
        }
        let mean = sum / n;
        let inv_std = (sum2 / n - mean * mean + self.eps).sqrt().recip();
        for (i, (o, v)) in out.iter_mut().zip(x).enumerate() {
            *o = (v - mean) * inv_std * self.weight[i] + self.bias.as_ref().map_or(0.0, |b| b[i]);
        }
    }
}

/// The rows of a pass: a sequence's new tokens (logits for the last `tail`), or one token per batch row.
#[derive(Debug, Clone, Copy)]
enum Rows {
    Sequence { tail: usize },
    Batch,
}

/// A linear layer and its bias as f32.
struct LinearParts {
    linear: Linear,
    bias: Option<Vec<f32>>,
}

impl LinearParts {
    fn of(l: &Linear) -> Result<Self> {
        Ok(Self { linear: l.clone(), bias: l.bias().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()? })
    }

    /// `y = x Wᵀ + b` for the `n` rows of `x`, by the path a regular pass of `path_rows` rows takes.
    fn apply(&self, x: &[f32], n: usize, path_rows: usize, y: &mut [f32]) -> Result<()> {
        let out = self.linear.out_features();
        let (x, y) = (&x[..n * self.linear.in_features()], &mut y[..n * out]);
        if !self.linear.cpu_rows_product(x, n, path_rows, y)? {
            candle_core::bail!("CPU forward: a weight left the CPU products' types");
        }
        if let Some(b) = &self.bias {
            y.chunks_exact_mut(out).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        Ok(())
    }

    /// [`LinearParts::apply`], and for the rows of a batch (`each_alone`) each row's result exactly as a pass
    /// of that row alone gives it: one product where the kernels are batch-invariant (the 8-bit ones), else
    /// row by row.
    fn apply_rows(&self, x: &[f32], n: usize, path_rows: usize, each_alone: bool, y: &mut [f32]) -> Result<()> {
        if !each_alone || n == 1 || self.linear.is_quantized() {
            return self.apply(x, n, path_rows, y);
        }
        let (i, o) = (self.linear.in_features(), self.linear.out_features());
        for (x, y) in x[..n * i].chunks_exact(i).zip(y[..n * o].chunks_exact_mut(o)) {
            self.apply(x, 1, 1, y)?;
        }
        Ok(())
    }

    /// Can our CPU products multiply this layer as the regular pass does?
    fn qualifies(l: &Linear) -> Result<bool> {
        Ok(l.lora().is_none() && l.cpu_rows_take()?)
    }
}

enum Qkv {
    Separate(Box<[LinearParts; 3]>),
    PerHead(LinearParts),
}

struct Layer {
    attn_norm: NormParts,
    qkv: Qkv,
    o: LinearParts,
    mlp_norm: NormParts,
    gate: Option<LinearParts>,
    up: LinearParts,
    down: LinearParts,
    parallel_residual: bool,
}

/// Raw pointer to a buffer the tasks of one pool job write at disjoint places.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements, and `Pool::run` returns only after all of them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `f(r, row r of out)` for every `dim`-wide row of `out`, spread over the kernel threads when there are
/// many.
fn for_rows(out: &mut [f32], dim: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = out.len() / dim;
    if rows < PARALLEL_ROWS {
        out.chunks_exact_mut(dim).enumerate().for_each(|(r, row)| f(r, row));
        return;
    }
    let ptr = SharedOut(out.as_mut_ptr());
    let per = rows.div_ceil(pool::pool().threads() * 4).max(1);
    pool::pool().run(rows.div_ceil(per), &|task| {
        let ptr = ptr;
        for r in task * per..((task + 1) * per).min(rows) {
            // SAFETY: each row belongs to one task; `out` outlives the job.
            f(r, unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r * dim), dim) });
        }
    });
}

/// Writes `rows` tokens' keys or values (`[rows, kv_heads, head_dim]`) into a cache buffer (`[b, kv_heads,
/// capacity, head_dim]`, f32) in place: columns `col..col + rows` of batch row 0, or with `batch` column `col`
/// of batch row `r` for token `r`.
struct WriteColumns<'a> {
    values: &'a [f32],
    col: usize,
    rows: usize,
    batch: bool,
    heads: usize,
    head_dim: usize,
}

impl InplaceOp1 for WriteColumns<'_> {
    fn name(&self) -> &'static str {
        "write-kv-columns"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(buf) = storage else { candle_core::bail!("CPU forward: the KV cache is not f32") };
        let (b, h, cap, d) = layout.shape().dims4()?;
        let (rows_b, cols) = if self.batch { (self.rows, 1) } else { (1, self.rows) };
        if h != self.heads || d != self.head_dim || self.col + cols > cap || rows_b > b || !layout.is_contiguous() {
            candle_core::bail!("CPU forward: KV buffer of shape {:?}", layout.shape());
        }
        let base = layout.start_offset();
        for (r, token) in self.values.chunks_exact(h * d).take(self.rows).enumerate() {
            let (row, col) = if self.batch { (r, self.col) } else { (0, self.col + r) };
            for (head, v) in token.chunks_exact(d).enumerate() {
                buf[base + ((row * h + head) * cap + col) * d..][..d].copy_from_slice(v);
            }
        }
        Ok(())
    }
}

pub struct Engine {
    layers: Vec<Layer>,
    final_norm: NormParts,
    lm_head: LinearParts,
    inv_freq: Vec<f32>,
    interleaved: bool,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    inter: usize,
    activation: Activation,
    /// Row-major `[rows, width]` buffers, grown to the longest pass: the residual stream, the normed input of
    /// a block, and the products' outputs.
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    attn_out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    mlp_out: Vec<f32>,
    /// Each row's rotation, `[rows, rotary_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// A prefill's keys transposed per KV head, `[kv_heads, head_dim, keys]`.
    keys_t: Vec<f32>,
}

impl GraphEngine for Engine {
    fn build(p: &GraphParts, embedded: &Tensor) -> Result<Option<Self>> {
        Engine::new(p, embedded)
    }

    fn step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(embedded, cache, 1)
    }
}

impl Engine {
    fn new(p: &GraphParts, embedded: &Tensor) -> Result<Option<Self>> {
        let cfg = p.cfg;
        if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "0")
            || !embedded.device().is_cpu()
            || embedded.dtype() != DType::F32
            || cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
            || !cfg.rotary_dim.is_multiple_of(2)
            || cfg.rotary_dim > cfg.head_dim
        {
            return Ok(None);
        }
        let mut linears: Vec<&Linear> = vec![p.lm_head];
        for l in &p.layers {
            match &l.qkv {
                QkvLinears::Separate(qkv) => linears.extend(qkv.iter().copied()),
                QkvLinears::PerHead(qkv) => linears.push(qkv),
            }
            linears.extend([l.o, l.up, l.down]);
            linears.extend(l.gate);
        }
        for l in linears {
            if !LinearParts::qualifies(l)? {
                return Ok(None);
            }
        }
        let layer = |l: &GraphLayer| -> Result<Layer> {
            Ok(Layer {
                attn_norm: NormParts::of(l.attn_norm)?,
                qkv: match &l.qkv {
                    QkvLinears::Separate([q, k, v]) => {
                        Qkv::Separate(Box::new([LinearParts::of(q)?, LinearParts::of(k)?, LinearParts::of(v)?]))
                    }
                    QkvLinears::PerHead(qkv) => Qkv::PerHead(LinearParts::of(qkv)?),
                },
                o: LinearParts::of(l.o)?,
                mlp_norm: NormParts::of(l.mlp_norm)?,
                gate: l.gate.map(LinearParts::of).transpose()?,
                up: LinearParts::of(l.up)?,
                down: LinearParts::of(l.down)?,
                parallel_residual: l.parallel_residual,
            })
        };
        let layers = p.layers.iter().map(layer).collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            layers,
            final_norm: NormParts::of(p.final_norm)?,
            lm_head: LinearParts::of(p.lm_head)?,
            inv_freq: p.inv_freq.to_vec(),
            interleaved: p.interleaved,
            hidden: cfg.hidden_size,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            rotary_dim: cfg.rotary_dim,
            inter: p.layers.first().map_or(0, |l| l.up.out_features()),
            activation: cfg.activation,
            x: vec![],
            normed: vec![],
            q: vec![],
            k: vec![],
            v: vec![],
            qkv: vec![],
            attn: vec![],
            attn_out: vec![],
            gate: vec![],
            up: vec![],
            mlp_out: vec![],
            cos: vec![],
            sin: vec![],
            keys_t: vec![],
        }))
    }

    /// Room for passes of `t` rows (buffers only grow).
    fn fit(&mut self, t: usize) {
        let (h, nh, nkv, hd) = (self.hidden, self.heads, self.kv_heads, self.head_dim);
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0)
            }
        };
        grow(&mut self.x, t * h);
        grow(&mut self.normed, t * h);
        grow(&mut self.q, t * nh * hd);
        grow(&mut self.k, t * nkv * hd);
        grow(&mut self.v, t * nkv * hd);
        grow(&mut self.attn, t * nh * hd);
        grow(&mut self.attn_out, t * h);
        grow(&mut self.up, t * self.inter);
        grow(&mut self.mlp_out, t * h);
        grow(&mut self.cos, t * self.rotary_dim / 2);
        grow(&mut self.sin, t * self.rotary_dim / 2);
        if self.layers.iter().any(|l| matches!(l.qkv, Qkv::PerHead(_))) {
            grow(&mut self.qkv, t * (nh + 2 * nkv) * hd);
        }
        if self.layers.iter().any(|l| l.gate.is_some()) {
            grow(&mut self.gate, t * self.inter);
        }
    }

    /// One pass over the `t` new tokens' embeddings (`[1, t, hidden]`) after what `cache` holds; advances
    /// the cache. Logits `[1, tail, vocab]` for the last `tail` positions (1 ≤ tail ≤ t).
    pub fn run(&mut self, embedded: &Tensor, cache: &mut KvCache, tail: usize) -> Result<Tensor> {
        self.pass(embedded, cache, Rows::Sequence { tail })
    }

    /// One decode step of every row of a batch (`[rows, 1, hidden]`; the cache's rows start at their own
    /// columns, no shared prefix): each row gets the operations it gets alone — norms, rotation at its own
    /// position, attention over its own columns, and products that are the same per row (the 8-bit kernels
    /// are batch-invariant; other weights multiply row by row). Logits `[rows, 1, vocab]`.
    pub fn run_rows(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.pass(embedded, cache, Rows::Batch)
    }

    fn pass(&mut self, embedded: &Tensor, cache: &mut KvCache, rows: Rows) -> Result<Tensor> {
        let (b, t, _) = embedded.dims3()?;
        let pos = cache.len();
        let (h, nh, nkv, hd) = (self.hidden, self.heads, self.kv_heads, self.head_dim);
        // `n` rows of activations: a sequence's new tokens, or one token of each batch row.
        let (n, path_rows, tail) = match rows {
            Rows::Sequence { tail } if b == 1 => (t, t, tail),
            Rows::Batch if t == 1 && cache.prefix_len() == 0 && cache.starts().len() == b => (b, 1, b),
            _ => candle_core::bail!("CPU forward: {b} rows of {t} tokens for {rows:?}"),
        };
        let batch = matches!(rows, Rows::Batch);
        // Each row's keys: `(batch row, first column, columns seen)`. A sequence's rows continue the cache
        // (row r sees pos + r + 1 columns); a batch row's own columns start at its own start. A row's
        // position is the columns it sees less one.
        let spans: Vec<(usize, usize, usize)> = if batch {
            cache.starts().iter().enumerate().map(|(r, &s)| (r, s, pos - s + 1)).collect()
        } else {
            (0..t).map(|r| (0, 0, pos + r + 1)).collect()
        };
        self.fit(n);
        cache.reserve(t, nkv, hd, DType::F32, &Device::Cpu)?;
        {
            let embedded = embedded.contiguous()?;
            let (es, el) = embedded.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(es)) = &*es else { candle_core::bail!("CPU forward: embeddings not f32") };
            self.x[..n * h].copy_from_slice(&es[el.start_offset()..el.start_offset() + n * h]);
        }
        // Each row's rotation, as the rotary table computes it (f32 angle, cos/sin in f64).
        let half = self.rotary_dim / 2;
        for (r, &(_, _, seen)) in spans.iter().enumerate() {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let angle = ((seen - 1) as f32 * f) as f64;
                self.cos[r * half + i] = angle.cos() as f32;
                self.sin[r * half + i] = angle.sin() as f32;
            }
        }
        let (k0, _) = cache.layer_buffers(0).ok_or_else(|| candle_core::Error::Msg("empty cache".into()))?;
        let capacity = k0.dim(2)?;
        for i in 0..self.layers.len() {
            let layer = &self.layers[i];
            let (x, normed) = (&self.x, &mut self.normed[..n * h]);
            for_rows(normed, h, &|r, out| layer.attn_norm.apply(&x[r * h..(r + 1) * h], out));
            match &layer.qkv {
                Qkv::Separate(qkv) => {
                    let [q, k, v] = &**qkv;
                    q.apply_rows(&self.normed, n, path_rows, batch, &mut self.q)?;
                    k.apply_rows(&self.normed, n, path_rows, batch, &mut self.k)?;
                    v.apply_rows(&self.normed, n, path_rows, batch, &mut self.v)?;
                }
                Qkv::PerHead(qkv) => {
                    // Output rows per head as [q | k | v] (heads = kv heads for these models).
                    qkv.apply_rows(&self.normed, n, path_rows, batch, &mut self.qkv)?;
                    for r in 0..n {
                        for head in 0..nh {
                            let part = &self.qkv[(r * nh + head) * 3 * hd..][..3 * hd];
                            let at = (r * nh + head) * hd;
                            self.q[at..at + hd].copy_from_slice(&part[..hd]);
                            self.k[at..at + hd].copy_from_slice(&part[hd..2 * hd]);
                            self.v[at..at + hd].copy_from_slice(&part[2 * hd..]);
                        }
                    }
                }
            }
            let (cos, sin, dim, inter) = (&self.cos, &self.sin, self.rotary_dim, self.interleaved);
            let rotate_row = |r: usize, row: &mut [f32]| {
                for head in row.chunks_exact_mut(hd) {
                    rotate(head, &cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half], dim, inter);
                }
            };
            for_rows(&mut self.q[..n * nh * hd], nh * hd, &rotate_row);
            for_rows(&mut self.k[..n * nkv * hd], nkv * hd, &rotate_row);
            let (kb, vb) = cache.layer_buffers(i).expect("reserved");
            let write = |values| WriteColumns { values, col: pos, rows: n, batch, heads: nkv, head_dim: hd };
            kb.inplace_op1(&write(&self.k))?;
            vb.inplace_op1(&write(&self.v))?;
            if t == 1 {
                self.attention(kb, vb, &spans, capacity)?;
            } else {
                self.prefill_attention(kb, vb, pos, t, capacity)?;
            }
            let layer = &self.layers[i];
            layer.o.apply_rows(&self.attn, n, path_rows, batch, &mut self.attn_out)?;
            let (x, normed) = (&mut self.x[..n * h], &mut self.normed[..n * h]);
            if !layer.parallel_residual {
                x.iter_mut().zip(&self.attn_out).for_each(|(x, a)| *x += a);
            }
            // With a parallel residual (x + attn(norm1(x)) + mlp(norm2(x))) the MLP reads the layer's input.
            let x = &*x;
            for_rows(normed, h, &|r, out| layer.mlp_norm.apply(&x[r * h..(r + 1) * h], out));
            let act = self.activation;
            let width = self.inter;
            match &layer.gate {
                Some(gate) => {
                    gate.apply_rows(&self.normed, n, path_rows, batch, &mut self.gate)?;
                    layer.up.apply_rows(&self.normed, n, path_rows, batch, &mut self.up)?;
                    let g = &self.gate;
                    for_rows(&mut self.up[..n * width], width, &|r, up| {
                        up.iter_mut().zip(&g[r * width..(r + 1) * width]).for_each(|(u, g)| *u *= activate(*g, act))
                    });
                }
                None => {
                    layer.up.apply_rows(&self.normed, n, path_rows, batch, &mut self.up)?;
                    let up = &mut self.up[..n * width];
                    for_rows(up, width, &|_, up| up.iter_mut().for_each(|u| *u = activate(*u, act)));
                }
            }
            layer.down.apply_rows(&self.up, n, path_rows, batch, &mut self.mlp_out)?;
            let x = &mut self.x[..n * h];
            if layer.parallel_residual {
                for ((x, a), m) in x.iter_mut().zip(&self.attn_out).zip(&self.mlp_out) {
                    *x += a + m;
                }
            } else {
                x.iter_mut().zip(&self.mlp_out).for_each(|(x, m)| *x += m);
            }
        }
        cache.advance(t);
        // The head sees the rows asked for; it takes the path the regular pass takes for them (the many-rows
        // path at the last position of a scoring prefill, see `Linear::forward_as_many_rows`).
        let (first, rows) = (n - tail, tail);
        let head_rows = if batch {
            1
        } else if Linear::many_rows(t) {
            t
        } else {
            rows
        };
        let (x, normed) = (&self.x[first * h..n * h], &mut self.normed[..rows * h]);
        for_rows(normed, h, &|r, out| self.final_norm.apply(&x[r * h..(r + 1) * h], out));
        let vocab = self.lm_head.linear.out_features();
        let mut logits = vec![0f32; rows * vocab];
        self.lm_head.apply_rows(&self.normed, rows, head_rows, batch, &mut logits)?;
        let shape = if batch { (rows, 1, vocab) } else { (1, rows, vocab) };
        Tensor::from_vec(logits, shape, &Device::Cpu)
    }

    /// Attention of one new token per query row `i` over its own cached keys and values, into `self.attn`:
    /// `spans[i] = (b, first, len)` — the row of the cache's batch, its first column, and how many columns it
    /// sees. Tasks of (row, head) spread over the kernel threads; each score is a dot product over the head
    /// dimension. A sequence alone and a row of a batch run the same operations.
    fn attention(&mut self, kb: &Tensor, vb: &Tensor, spans: &[(usize, usize, usize)], capacity: usize) -> Result<()> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let (ks, kl) = kb.storage_and_layout();
        let (vs, vl) = vb.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(ks)), Storage::Cpu(CpuStorage::F32(vs))) = (&*ks, &*vs) else {
            candle_core::bail!("CPU forward: the KV cache is not f32 on the CPU")
        };
        let (ks, vs) = (&ks[kl.start_offset()..], &vs[vl.start_offset()..]);
        let (q, out) = (&self.q, SharedOut(self.attn.as_mut_ptr()));
        pool::pool().run(spans.len() * nh, &|task| {
            let out = out;
            let (r, head) = (task / nh, task % nh);
            let (b, first, len) = spans[r];
            let kv = head / group;
            SCORES.with(|scores| {
                let mut scores = scores.borrow_mut();
                if scores.len() < len {
                    scores.resize(len.next_power_of_two(), 0.0);
                }
                let s = &mut scores[..len];
                let qh = &q[(r * nh + head) * hd..][..hd];
                let at = ((b * nkv + kv) * capacity + first) * hd;
                let (keys, values) = (&ks[at..at + len * hd], &vs[at..at + len * hd]);
                for (s, key) in s.chunks_mut(4).zip(keys.chunks(4 * hd)) {
                    dot_rows(key, hd, qh, s);
                }
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                s.iter_mut().for_each(|v| *v = exp_nonpositive((*v - max) * scale));
                let inv = 1.0 / sum(s);
                // SAFETY: (row r, head) owns attn[(r · heads + head) · hd ..][..hd].
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add((r * nh + head) * hd), hd) };
                o.fill(0.0);
                for (p, value) in s.iter().zip(values.chunks_exact(hd)) {
                    let p = p * inv;
                    o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
                }
            });
        });
        Ok(())
    }
}

impl Engine {
    /// Causal attention of a prefill's `t` rows as small matrix products: per task a KV head and
    /// [`ATTENTION_ROWS`] consecutive rows, whose query heads (`group × rows` vectors) meet the keys
    /// transposed (`[head_dim, keys]`, so that 16 keys' scores accumulate side by side), then the values;
    /// rows see keys up to their own position only (the few beyond, inside the chunk's widest row, are
    /// masked). The rows with the most keys go first.
    fn prefill_attention(&mut self, kb: &Tensor, vb: &Tensor, pos: usize, t: usize, capacity: usize) -> Result<()> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let total = pos + t;
        // Keys per transposed row: a multiple of the 16-key tile, zero beyond `total`.
        let stride = total.next_multiple_of(KEY_TILE);
        let (ks, kl) = kb.storage_and_layout();
        let (vs, vl) = vb.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(ks)), Storage::Cpu(CpuStorage::F32(vs))) = (&*ks, &*vs) else {
            candle_core::bail!("CPU forward: the KV cache is not f32 on the CPU")
        };
        let (ks, vs) = (&ks[kl.start_offset()..], &vs[vl.start_offset()..]);
        if self.keys_t.len() < nkv * hd * stride {
            self.keys_t.resize(nkv * hd * stride, 0.0);
        }
        for g in 0..nkv {
            let kt = &mut self.keys_t[g * hd * stride..(g + 1) * hd * stride];
            for (j, key) in ks[g * capacity * hd..][..total * hd].chunks_exact(hd).enumerate() {
                for (d, &v) in key.iter().enumerate() {
                    kt[d * stride + j] = v;
                }
            }
            for d in 0..hd {
                kt[d * stride + total..(d + 1) * stride].fill(0.0);
            }
        }
        let (q, kt_all, out) = (&self.q, &self.keys_t, SharedOut(self.attn.as_mut_ptr()));
        let chunks = t.div_ceil(ATTENTION_ROWS);
        pool::pool().run(nkv * chunks, &|task| {
            let out = out;
            let (g, c) = (task % nkv, chunks - 1 - task / nkv);
            let (r0, r1) = (c * ATTENTION_ROWS, ((c + 1) * ATTENTION_ROWS).min(t));
            let widest = pos + r1;
            let width = widest.next_multiple_of(KEY_TILE);
            // Query vectors: (row, head of the group), padded with zeros to a multiple of 4.
            let n = (r1 - r0) * group;
            let padded = n.next_multiple_of(4);
            PREFILL_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let (qs, rest) = scratch.split(padded * hd, padded * width);
                let (scores, outs) = rest;
                for (i, qv) in qs.chunks_exact_mut(hd).enumerate() {
                    if i < n {
                        let (r, h) = (r0 + i / group, g * group + i % group);
                        qv.copy_from_slice(&q[(r * nh + h) * hd..][..hd]);
                    } else {
                        qv.fill(0.0);
                    }
                }
                let kt = &kt_all[g * hd * stride..(g + 1) * hd * stride];
                scores_tile(qs, kt, stride, hd, width, scores);
                for (i, s) in scores.chunks_exact_mut(width).take(n).enumerate() {
                    let len = pos + r0 + i / group + 1;
                    let s = &mut s[..widest];
                    let max = s[..len].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    s[..len].iter_mut().for_each(|v| *v = exp_nonpositive((*v - max) * scale));
                    s[len..].fill(0.0);
                }
                let values = &vs[g * capacity * hd..][..widest * hd];
                values_tile(scores, width, values, hd, widest, outs);
                for (i, o) in outs.chunks_exact(hd).take(n).enumerate() {
                    let len = pos + r0 + i / group + 1;
                    let inv = 1.0 / sum(&scores[i * width..i * width + len]);
                    let (r, h) = (r0 + i / group, g * group + i % group);
                    // SAFETY: (row r, head h) belongs to this task alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((r * nh + h) * hd), hd) };
                    dst.iter_mut().zip(o).for_each(|(d, o)| *d = o * inv);
                }
            });
        });
        Ok(())
    }
}

/// A kernel thread's buffers for [`Engine::prefill_attention`]: query vectors, scores, outputs.
#[derive(Default)]
struct PrefillScratch {
    buf: Vec<f32>,
}

impl PrefillScratch {
    /// Three disjoint slices of `a`, `b` and `a` floats (queries, scores, outputs; the outputs have as many
    /// vectors as the queries).
    fn split(&mut self, a: usize, b: usize) -> (&mut [f32], (&mut [f32], &mut [f32])) {
        if self.buf.len() < 2 * a + b {
            self.buf.resize(2 * a + b, 0.0);
        }
        let (qs, rest) = self.buf.split_at_mut(a);
        let (scores, rest) = rest.split_at_mut(b);
        (qs, (scores, &mut rest[..a]))
    }
}

thread_local! {
    static PREFILL_SCRATCH: RefCell<PrefillScratch> = RefCell::new(PrefillScratch::default());
}

thread_local! {
    /// One query row's attention scores, per kernel thread (grown to the longest context seen).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Σ v over eight lanes of partial sums.
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rotates the first `dim` dims of one head: pairs (i, i + dim/2), or adjacent pairs when `interleaved`.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], dim: usize, interleaved: bool) {
    let half = dim / 2;
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x, y) = (head[a], head[b]);
        head[a] = x * cos[i] - y * sin[i];
        head[b] = x * sin[i] + y * cos[i];
    }
}

/// The MLP activation, as candle's element-wise ops compute it.
fn activate(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Gelu => (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x,
        Activation::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * x * (1.0 + 0.044715 * x * x)).tanh())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Ops;

    /// The step's norms equal the regular pass's to the bit: the 8-bit products after them would turn an
    /// ulp into a different rounding.
    #[test]
    fn norms_equal_the_regular_ops_to_the_bit() -> Result<()> {
        let n = 576;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.0137).collect();
        let w = Tensor::from_vec((0..n).map(|i| 0.5 + (i % 17) as f32 * 0.06).collect::<Vec<_>>(), n, &Device::Cpu)?;
        let b = Tensor::from_vec((0..n).map(|i| (i % 5) as f32 * 0.01 - 0.02).collect::<Vec<_>>(), n, &Device::Cpu)?;
        let norms = [
            Norm::Rms { weight: w.clone(), eps: 1e-5 },
            Norm::Layer { weight: w.clone(), bias: Some(b), eps: 1e-5 },
            Norm::Layer { weight: w, bias: None, eps: 1e-5 },
        ];
        for norm in &norms {
            let want: Vec<f32> =
                norm.forward(&Tensor::from_slice(&x, (1, n), &Device::Cpu)?, Ops::Fused)?.flatten_all()?.to_vec1()?;
            let mut got = vec![0.0; n];
            NormParts::of(norm)?.apply(&x, &mut got);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        Ok(())
    }
}
