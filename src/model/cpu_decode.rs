//! The CPU decode step of one sequence without tensor ops.
//!
//! A decode step through candle's ops is ~20 small ops per layer, each allocating its output and handing work
//! to a thread pool: on a 135M model that is ~3 ms a token beside ~4 ms of weight streaming. Here one token's
//! step runs on buffers allocated once: norms, rotary, the KV-cache write, attention and the activations are
//! plain loops (attention spread over the heads on our kernel threads), and every product goes through the
//! same CPU kernels a one-row pass of the regular forward uses, so the logits are those of the regular path up
//! to float summation order.
//!
//! The layers are any [`GraphLayer`] (llama, StableLM, GPT-NeoX): RMSNorm or LayerNorm, linear biases,
//! partial rotary, gated or plain MLP, parallel residual. Used for one new token at batch 1, inference ops,
//! f32 activations, on the CPU, with every linear weight of a type our kernels take (GGUF blocks, f16/bf16)
//! and no unmerged adapter; anything else (and `BILLION_CPU_DECODE=0`) goes through the regular forward pass,
//! which stays the reference.

// `let out = out;` in the task closures captures the whole `SharedOut` (Sync), not its raw pointer field.
#![allow(clippy::redundant_locals)]

use super::cache::KvCache;
use super::config::Activation;
use super::decode_graph::{GraphEngine, GraphLayer, GraphParts, QkvLinears};
use super::layers::Norm;
use super::linear::Linear;
use crate::ops::cpu::pool;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor};

/// Set `BILLION_CPU_DECODE=0` to decode through the regular forward pass (for comparisons).
pub const DISABLE_ENV: &str = "BILLION_CPU_DECODE";

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

/// A linear layer and its bias as f32.
struct LinearParts {
    linear: Linear,
    bias: Option<Vec<f32>>,
}

impl LinearParts {
    fn of(l: &Linear) -> Result<Self> {
        Ok(Self { linear: l.clone(), bias: l.bias().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()? })
    }

    /// `y = x Wᵀ + b` for one row.
    fn apply(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        if !self.linear.cpu_rows_into(x, y)? {
            candle_core::bail!("CPU decode: a weight left the CPU kernels' types");
        }
        if let Some(b) = &self.bias {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
        Ok(())
    }

    /// Can the CPU kernels multiply this layer as the regular one-row pass does?
    fn qualifies(l: &Linear) -> Result<bool> {
        Ok(l.lora().is_none() && l.cpu_kernels_take()?)
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

/// Writes one token's keys or values (`[kv_heads, head_dim]`) into column `col` of a cache buffer
/// (`[1, kv_heads, capacity, head_dim]`, f32) in place.
struct WriteColumn<'a> {
    values: &'a [f32],
    col: usize,
    heads: usize,
    head_dim: usize,
}

impl InplaceOp1 for WriteColumn<'_> {
    fn name(&self) -> &'static str {
        "write-kv-column"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(buf) = storage else { candle_core::bail!("CPU decode: the KV cache is not f32") };
        let (_, h, cap, d) = layout.shape().dims4()?;
        if h != self.heads || d != self.head_dim || self.col >= cap || !layout.is_contiguous() {
            candle_core::bail!("CPU decode: KV buffer of shape {:?}", layout.shape());
        }
        let base = layout.start_offset();
        for (head, v) in self.values.chunks_exact(d).enumerate() {
            buf[base + (head * cap + self.col) * d..][..d].copy_from_slice(v);
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
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    activation: Activation,
    /// The residual stream, the normed input of a block, and the products' outputs.
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
    /// Attention scores, one row of `capacity` per head (grown with the cache).
    scores: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl GraphEngine for Engine {
    fn build(p: &GraphParts, embedded: &Tensor) -> Result<Option<Self>> {
        Engine::new(p, embedded)
    }

    fn step(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(embedded, cache)
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
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let inter = p.layers.first().map_or(0, |l| l.up.out_features());
        Ok(Some(Self {
            layers,
            final_norm: NormParts::of(p.final_norm)?,
            lm_head: LinearParts::of(p.lm_head)?,
            inv_freq: p.inv_freq.to_vec(),
            interleaved: p.interleaved,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            rotary_dim: cfg.rotary_dim,
            activation: cfg.activation,
            x: vec![0.0; h],
            normed: vec![0.0; h],
            q: vec![0.0; nh * hd],
            k: vec![0.0; nkv * hd],
            v: vec![0.0; nkv * hd],
            qkv: vec![0.0; (nh + 2 * nkv) * hd],
            attn: vec![0.0; nh * hd],
            attn_out: vec![0.0; h],
            gate: vec![0.0; inter],
            up: vec![0.0; inter],
            mlp_out: vec![0.0; h],
            scores: vec![],
            cos: vec![0.0; cfg.rotary_dim / 2],
            sin: vec![0.0; cfg.rotary_dim / 2],
        }))
    }

    fn run(&mut self, embedded: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let pos = cache.len();
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        cache.reserve(1, nkv, hd, DType::F32, &Device::Cpu)?;
        {
            let embedded = embedded.contiguous()?;
            let (es, el) = embedded.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(es)) = &*es else { candle_core::bail!("CPU decode: embeddings not f32") };
            let h = self.x.len();
            self.x.copy_from_slice(&es[el.start_offset()..el.start_offset() + h]);
        }
        // This position's rotation, as the rotary table computes it (f32 angle, cos/sin in f64).
        for (i, f) in self.inv_freq.iter().enumerate() {
            let angle = (pos as f32 * f) as f64;
            self.cos[i] = angle.cos() as f32;
            self.sin[i] = angle.sin() as f32;
        }
        let (k0, _) = cache.layer_buffers(0).ok_or_else(|| candle_core::Error::Msg("empty cache".into()))?;
        let capacity = k0.dim(2)?;
        if self.scores.len() < nh * capacity {
            self.scores.resize(nh * capacity, 0.0);
        }
        for i in 0..self.layers.len() {
            let layer = &self.layers[i];
            layer.attn_norm.apply(&self.x, &mut self.normed);
            match &layer.qkv {
                Qkv::Separate(qkv) => {
                    let [q, k, v] = &**qkv;
                    q.apply(&self.normed, &mut self.q)?;
                    k.apply(&self.normed, &mut self.k)?;
                    v.apply(&self.normed, &mut self.v)?;
                }
                Qkv::PerHead(qkv) => {
                    // Output rows per head as [q | k | v] (heads = kv heads for these models).
                    qkv.apply(&self.normed, &mut self.qkv)?;
                    for h in 0..nh {
                        let part = &self.qkv[h * 3 * hd..(h + 1) * 3 * hd];
                        self.q[h * hd..(h + 1) * hd].copy_from_slice(&part[..hd]);
                        self.k[h * hd..(h + 1) * hd].copy_from_slice(&part[hd..2 * hd]);
                        self.v[h * hd..(h + 1) * hd].copy_from_slice(&part[2 * hd..]);
                    }
                }
            }
            for head in self.q.chunks_exact_mut(hd).chain(self.k.chunks_exact_mut(hd)) {
                rotate(head, &self.cos, &self.sin, self.rotary_dim, self.interleaved);
            }
            let (kb, vb) = cache.layer_buffers(i).expect("reserved");
            kb.inplace_op1(&WriteColumn { values: &self.k, col: pos, heads: nkv, head_dim: hd })?;
            vb.inplace_op1(&WriteColumn { values: &self.v, col: pos, heads: nkv, head_dim: hd })?;
            self.attention(kb, vb, pos + 1, capacity)?;
            let layer = &self.layers[i];
            layer.o.apply(&self.attn, &mut self.attn_out)?;
            if layer.parallel_residual {
                // x + attn(norm1(x)) + mlp(norm2(x)): the MLP reads the layer's input.
                layer.mlp_norm.apply(&self.x, &mut self.normed);
            } else {
                self.x.iter_mut().zip(&self.attn_out).for_each(|(x, a)| *x += a);
                layer.mlp_norm.apply(&self.x, &mut self.normed);
            }
            match &layer.gate {
                Some(gate) => {
                    gate.apply(&self.normed, &mut self.gate)?;
                    layer.up.apply(&self.normed, &mut self.up)?;
                    let act = self.activation;
                    self.up.iter_mut().zip(&self.gate).for_each(|(u, g)| *u *= activate(*g, act));
                }
                None => {
                    layer.up.apply(&self.normed, &mut self.up)?;
                    let act = self.activation;
                    self.up.iter_mut().for_each(|u| *u = activate(*u, act));
                }
            }
            layer.down.apply(&self.up, &mut self.mlp_out)?;
            if layer.parallel_residual {
                for ((x, a), m) in self.x.iter_mut().zip(&self.attn_out).zip(&self.mlp_out) {
                    *x += a + m;
                }
            } else {
                self.x.iter_mut().zip(&self.mlp_out).for_each(|(x, m)| *x += m);
            }
        }
        self.final_norm.apply(&self.x, &mut self.normed);
        let mut logits = vec![0f32; self.lm_head.linear.out_features()];
        self.lm_head.apply(&self.normed, &mut logits)?;
        cache.advance(1);
        Tensor::from_vec(logits, (1, 1, self.lm_head.linear.out_features()), &Device::Cpu)
    }

    /// Each query head against the `len` cached keys and values of its KV group, into `self.attn`; the heads
    /// spread over the kernel threads.
    fn attention(&mut self, kb: &Tensor, vb: &Tensor, len: usize, capacity: usize) -> Result<()> {
        let (nh, hd) = (self.heads, self.head_dim);
        let group = nh / self.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (ks, kl) = kb.storage_and_layout();
        let (vs, vl) = vb.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(ks)), Storage::Cpu(CpuStorage::F32(vs))) = (&*ks, &*vs) else {
            candle_core::bail!("CPU decode: the KV cache is not f32 on the CPU")
        };
        let (ks, vs) = (&ks[kl.start_offset()..], &vs[vl.start_offset()..]);
        let (q, scores, out) = (&self.q, SharedOut(self.scores.as_mut_ptr()), SharedOut(self.attn.as_mut_ptr()));
        pool::pool().run(nh, &|h| {
            let (scores, out) = (scores, out);
            let kv = h / group;
            let qh = &q[h * hd..(h + 1) * hd];
            let keys = &ks[kv * capacity * hd..][..len * hd];
            let values = &vs[kv * capacity * hd..][..len * hd];
            // SAFETY: head h owns scores[h · capacity ..][..len] and attn[h · hd ..][..hd].
            let s = unsafe { std::slice::from_raw_parts_mut(scores.0.add(h * capacity), len) };
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(h * hd), hd) };
            let mut max = f32::NEG_INFINITY;
            for (s, key) in s.iter_mut().zip(keys.chunks_exact(hd)) {
                *s = dot(qh, key) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in s.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (p, value) in s.iter().zip(values.chunks_exact(hd)) {
                let p = p / sum;
                o.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
            }
        });
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler keeps them in one vector register.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
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
