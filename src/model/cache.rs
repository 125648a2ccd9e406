//! KV cache: per layer, a preallocated `[batch, kv_heads, capacity, head_dim]` buffer written in place.
//! Growing doubles the capacity (amortised O(1) per token, never a concatenation per step); `truncate`
//! rolls the cache back to any earlier length (speculative decoding, prompt-prefix reuse).
//!
//! Rows of a batch may hold different numbers of tokens: each row has its own length (at most the shared
//! write position `len`), its own rollback (`truncate_row`) and its own positions (`positions`). Today every
//! forward pass advances all rows together; the lengths are where a batched engine of unequal rows keeps them.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Cloning copies the buffers: a clone can be extended or rolled back without touching the original.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// The write position: tokens held by the longest row.
    len: usize,
    /// Tokens each row holds (empty until the batch size is known; then every entry ≤ `len`).
    row_lens: Vec<usize>,
    /// Leading columns of each row that hold no token (rows that started shorter, padded on the left): their
    /// keys are masked out and the row's positions count from its first real token. Empty: no padding.
    pads: Vec<usize>,
    max_len: usize,
    initial_capacity: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|c| LayerCache {
                    k: c.k.copy().expect("copy KV buffer"),
                    v: c.v.copy().expect("copy KV buffer"),
                })
            })
            .collect();
        Self {
            layers,
            len: self.len,
            row_lens: self.row_lens.clone(),
            pads: self.pads.clone(),
            max_len: self.max_len,
            initial_capacity: self.initial_capacity,
        }
    }
}

impl KvCache {
    /// `max_len` is the model's context window: appending past it is an error.
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            row_lens: vec![],
            pads: vec![],
            max_len,
            initial_capacity: 256.min(max_len.max(1)),
        }
    }

    /// Reserve room for `capacity` tokens on first use (avoids growth copies when the length is known).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.initial_capacity = capacity.clamp(1, self.max_len.max(1));
        self
    }

    /// Tokens currently held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Roll back to the first `len` tokens (every row). Later writes overwrite what was dropped.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for r in &mut self.row_lens {
            *r = (*r).min(len);
        }
    }

    pub fn reset(&mut self) {
        self.len = 0;
        self.row_lens.clear();
        self.pads.clear();
    }

    /// Declare, before the first tokens go in, how many leading columns of each row are padding (see
    /// [`KvCache::pads`]).
    pub fn set_pads(&mut self, pads: Vec<usize>) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("padding is set on an empty cache (this one holds {} tokens)", self.len);
        }
        self.pads = pads;
        Ok(())
    }

    /// Leading padding columns per row (empty when no row is padded).
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Does any row start with padding (so attention needs per-row masks and positions)?
    pub fn is_padded(&self) -> bool {
        self.pads.iter().any(|&p| p > 0)
    }

    /// Tokens held by each row of the batch (empty before the first append).
    pub fn row_lens(&self) -> &[usize] {
        &self.row_lens
    }

    /// Roll one row back to its first `len` tokens; the other rows keep theirs.
    pub fn truncate_row(&mut self, row: usize, len: usize) -> Result<()> {
        match self.row_lens.get_mut(row) {
            Some(r) => *r = (*r).min(len),
            None => candle_core::bail!("row {row} is outside a batch of {}", self.row_lens.len()),
        }
        self.len = self.row_lens.iter().copied().max().unwrap_or(0);
        Ok(())
    }

    /// The attention mask of the next `t` tokens when rows are padded: `[rows, 1, t, len + t]`, 0 where a query
    /// may look (its own row's real tokens up to itself) and -inf elsewhere, in `dtype`.
    pub fn padded_mask(&self, rows: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let (offset, total) = (self.len, self.len + t);
        let mut mask = vec![0f32; rows * t * total];
        for r in 0..rows {
            let pad = self.pads.get(r).copied().unwrap_or(0);
            for i in 0..t {
                let row = &mut mask[(r * t + i) * total..(r * t + i + 1) * total];
                for (j, m) in row.iter_mut().enumerate() {
                    // A padding column looks at itself only: nothing real sees it, and its values stay
                    // finite (a row of nothing but -inf would turn into NaN and spread through 0·NaN).
                    let visible = (j >= pad && j <= offset + i) || j == offset + i;
                    if !visible {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (rows, 1, t, total), device)?.to_dtype(dtype)
    }

    /// The positions of the next `t` tokens of each row: `[rows, t]` (u32), row `r` starting at its length.
    pub fn positions(&self, rows: usize, t: usize, device: &Device) -> Result<Tensor> {
        // Column c of row r holds position c - pad (padding columns, masked anyway, read position 0).
        let pad = |r: usize| self.pads.get(r).copied().unwrap_or(0);
        let held = |r: usize| self.row_lens.get(r).copied().unwrap_or(self.len);
        let pos: Vec<u32> =
            (0..rows).flat_map(|r| (0..t).map(move |i| (held(r) + i).saturating_sub(pad(r)) as u32)).collect();
        Tensor::from_vec(pos, (rows, t), device)
    }

    /// Bytes allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes()).sum()
    }

    /// Check that `extra` more tokens fit in the context window.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.len + extra > self.max_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context window of {} tokens",
                self.len + extra,
                self.max_len
            );
        }
        Ok(())
    }

    /// Write `k`, `v` (`[b, kv_heads, t, d]`) for `layer` at the current position and return views of the
    /// whole cached sequence including them. Call `advance(t)` once all layers have appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if self.row_lens.len() != b {
            self.row_lens = vec![self.len; b];
        }
        let needed = self.len + t;
        self.grow(layer, needed, (b, h, d), k.dtype(), k.device())?;
        let c = self.layers[layer].as_ref().expect("allocated by grow");
        c.k.slice_set(&k.contiguous()?, 2, self.len)?;
        c.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((c.k.narrow(2, 0, needed)?, c.v.narrow(2, 0, needed)?))
    }

    /// Make room in every layer for `extra` more tokens (`[1, kv_heads, capacity, head_dim]` buffers), for
    /// kernels that write the cache in place instead of going through `append`.
    pub fn reserve(
        &mut self,
        extra: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        let needed = self.len + extra;
        for layer in 0..self.layers.len() {
            self.grow(layer, needed, (1, kv_heads, head_dim), dtype, device)?;
        }
        Ok(())
    }

    /// A layer's whole key and value buffers (`[b, kv_heads, capacity, head_dim]`), once allocated.
    pub fn layer_buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|c| (&c.k, &c.v))
    }

    /// Allocate or enlarge (doubling) `layer`'s buffers so that `needed` tokens fit, keeping the cached ones.
    fn grow(
        &mut self,
        layer: usize,
        needed: usize,
        (b, h, d): (usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        if needed > self.max_len {
            self.check_room(needed - self.len)?;
        }
        let slot = &mut self.layers[layer];
        let capacity = match slot.as_ref() {
            Some(c) => c.k.dim(2)?,
            None => 0,
        };
        if needed <= capacity {
            return Ok(());
        }
        let mut new_cap = capacity.max(self.initial_capacity);
        while new_cap < needed {
            new_cap *= 2;
        }
        let new_cap = new_cap.min(self.max_len);
        let nk = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
        let nv = Tensor::zeros((b, h, new_cap, d), dtype, device)?;
        if let Some(old) = slot.as_ref() {
            if self.len > 0 {
                nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
        }
        *slot = Some(LayerCache { k: nk, v: nv });
        Ok(())
    }

    /// Move the write position (and every row) forward after every layer appended `t` tokens.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
        for r in &mut self.row_lens {
            *r += t;
        }
    }

    pub fn dtype(&self) -> Option<DType> {
        self.layers.iter().flatten().next().map(|l| l.k.dtype())
    }

    pub fn device(&self) -> Option<Device> {
        self.layers.iter().flatten().next().map(|l| l.k.device().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_rolls_back() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 1000).with_capacity(2);
        for i in 0..5 {
            let k = Tensor::full(i as f32, (1, 1, 1, 2), &dev)?;
            let (ks, _) = c.append(0, &k, &k)?;
            c.advance(1);
            assert_eq!(ks.dim(2)?, i + 1);
            assert_eq!(ks.flatten_all()?.to_vec1::<f32>()?[2 * i], i as f32);
        }
        c.truncate(2);
        let k = Tensor::full(9f32, (1, 1, 1, 2), &dev)?;
        let (ks, _) = c.append(0, &k, &k)?;
        assert_eq!(ks.flatten_all()?.to_vec1::<f32>()?, vec![0., 0., 1., 1., 9., 9.]);
        Ok(())
    }

    #[test]
    fn reserve_makes_room_in_every_layer_and_keeps_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 100).with_capacity(2);
        for l in 0..2 {
            let k = Tensor::full(l as f32 + 1.0, (1, 3, 2, 4), &dev)?;
            c.append(l, &k, &k)?;
        }
        c.advance(2);
        c.reserve(5, 3, 4, DType::F32, &dev)?;
        for l in 0..2 {
            let (k, _) = c.layer_buffers(l).unwrap();
            assert!(k.dim(2)? >= 7, "capacity {}", k.dim(2)?);
            assert_eq!(k.narrow(2, 0, 2)?.flatten_all()?.to_vec1::<f32>()?, vec![l as f32 + 1.0; 24]);
        }
        assert!(c.reserve(99, 3, 4, DType::F32, &dev).is_err(), "past the context window");
        Ok(())
    }

    #[test]
    fn rows_keep_their_own_lengths_and_positions() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 100);
        let k = Tensor::zeros((2, 1, 3, 2), DType::F32, &dev)?;
        c.append(0, &k, &k)?;
        c.advance(3);
        assert_eq!(c.row_lens(), &[3, 3]);
        c.truncate_row(1, 1)?;
        assert_eq!((c.row_lens(), c.len()), (&[3, 1][..], 3));
        assert_eq!(c.positions(2, 2, &dev)?.to_vec2::<u32>()?, vec![vec![3, 4], vec![1, 2]]);
        assert!(c.truncate_row(2, 0).is_err());
        c.truncate(2);
        assert_eq!(c.row_lens(), &[2, 1]);
        Ok(())
    }

    #[test]
    fn refuses_past_context() {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 3);
        let k = Tensor::zeros((1, 1, 4, 2), DType::F32, &dev).unwrap();
        assert!(c.append(0, &k, &k).is_err());
    }
}
