//! KV cache: per layer, a preallocated `[batch, kv_heads, capacity, head_dim]` buffer written in place.
//! Growing doubles the capacity (amortised O(1) per token, never a concatenation per step); `truncate`
//! rolls the cache back to any earlier length (speculative decoding, prompt-prefix reuse).
//!
//! Rows of a batch hold sequences of different lengths. Every forward pass writes all rows at the shared
//! column `len`; row `r`'s sequence occupies columns `starts[r]..len` (earlier columns are padding or a finished
//! sequence's leftovers, masked out), so its positions count from its start. A row is rolled back or replaced
//! by moving its columns so that it still ends at `len` (`truncate_row`, `place_row`); `compact` drops the
//! columns no row uses any more. A shared read-only prefix (few-shot examples, a system prompt), computed once,
//! can sit before every row's own columns: all rows attend to it, nobody copies it.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Keys and values of a prefix shared read-only by every row of other caches: per layer
/// `[1, kv_heads, len, head_dim]`.
#[derive(Debug)]
pub struct SharedPrefix {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl SharedPrefix {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A layer's prefix keys and values.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer).map(|(k, v)| (k, v))
    }
}

/// Write `tokens` (`[1, kv_heads, n, head_dim]`) into columns `at..at + n` of row `row` of `buf`
/// (`[b, kv_heads, capacity, head_dim]`), in place: the row is rebuilt around them and written back whole.
fn write_row_columns(buf: &Tensor, row: usize, at: usize, tokens: &Tensor) -> Result<()> {
    let cap = buf.dim(2)?;
    let n = tokens.dim(2)?;
    let current = buf.i(row..row + 1)?;
    let mut parts = vec![];
    if at > 0 {
        parts.push(current.narrow(2, 0, at)?);
    }
    parts.push(tokens.to_dtype(buf.dtype())?);
    if at + n < cap {
        parts.push(current.narrow(2, at + n, cap - at - n)?);
    }
    let rebuilt = Tensor::cat(&parts, 2)?.contiguous()?;
    buf.slice_set(&rebuilt, 0, row)
}

/// Copy columns `from..from + n` of row `src_row` of `src` into columns `at..at + n` of row `row` of `dst` (both
/// `[b, kv_heads, capacity, head_dim]`) as one strided device copy per buffer, on CUDA. Returns false where it
/// does not apply (other devices or dtypes): the caller then rebuilds the row with tensor ops.
#[cfg(feature = "cuda")]
fn copy_columns_on_device(
    dst: &Tensor,
    row: usize,
    at: usize,
    src: &Tensor,
    src_row: usize,
    from: usize,
    n: usize,
) -> Result<bool> {
    use crate::ops::launch::storage_ptr;
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = dst.device() else { return Ok(false) };
    if dst.dtype() != src.dtype()
        || !matches!(dst.dtype(), DType::BF16 | DType::F32)
        || !dst.is_contiguous()
        || !src.is_contiguous()
        || n == 0
    {
        return Ok(false);
    }
    let (_, heads, dst_cap, d) = dst.dims4()?;
    let src_cap = src.dim(2)?;
    let es = dst.dtype().size_in_bytes();
    let stream = dev.cuda_stream();
    let device = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: device,
        srcHost: std::ptr::null(),
        srcDevice: storage_ptr(src, &stream)? + (((src_row * heads * src_cap) + from) * d * es) as u64,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_cap * d * es,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: device,
        dstHost: std::ptr::null_mut(),
        dstDevice: storage_ptr(dst, &stream)? + (((row * heads * dst_cap) + at) * d * es) as u64,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_cap * d * es,
        WidthInBytes: n * d * es,
        Height: heads,
    };
    // SAFETY: source and destination lie inside the two live buffers (rows, heads and columns checked by the
    // caller against their shapes); the copy is ordered on the stream every op of these tensors runs on.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }.result().map_err(candle_core::Error::wrap)?;
    Ok(true)
}

#[cfg(not(feature = "cuda"))]
fn copy_columns_on_device(_: &Tensor, _: usize, _: usize, _: &Tensor, _: usize, _: usize, _: usize) -> Result<bool> {
    Ok(false)
}

/// The capacity a buffer of `capacity` columns grows to for `needed` (doubling from at least `initial`, amortised
/// O(1) a token), at most the context window; unchanged when `needed` fits.
fn capacity_for(capacity: usize, needed: usize, initial: usize, max_len: usize) -> usize {
    if needed <= capacity {
        return capacity;
    }
    let mut new_cap = capacity.max(initial).max(1);
    while new_cap < needed {
        new_cap *= 2;
    }
    new_cap.min(max_len)
}

/// A new buffer of `capacity` columns (`[b, kv_heads, capacity, head_dim]`) holding `old`'s first `len` columns
/// from column `at`.
fn relocated(old: &Tensor, len: usize, capacity: usize, at: usize) -> Result<Tensor> {
    let (b, h, _, d) = old.dims4()?;
    let new = Tensor::zeros((b, h, capacity, d), old.dtype(), old.device())?;
    if len > 0 {
        new.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, at)?;
    }
    Ok(new)
}

/// Cloning copies the buffers: a clone can be extended or rolled back without touching the original.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// The write position: tokens held by the longest row.
    len: usize,
    /// First column of each row's sequence (empty until the batch size is known; then every entry ≤ `len`).
    starts: Vec<usize>,
    /// Keys and values every row sees before its own columns.
    prefix: Option<Arc<SharedPrefix>>,
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
            starts: self.starts.clone(),
            prefix: self.prefix.clone(),
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
            starts: vec![],
            prefix: None,
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

    /// Roll back to the first `len` columns (every row). Later writes overwrite what was dropped.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for s in &mut self.starts {
            *s = (*s).min(self.len);
        }
    }

    pub fn reset(&mut self) {
        self.len = 0;
        self.starts.clear();
    }

    /// Declare, before the first tokens go in, the first column of each row's sequence (rows of a batch
    /// padded on the left to one length start after their padding).
    pub fn set_starts(&mut self, starts: Vec<usize>) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("row starts are set on an empty cache (this one holds {} tokens)", self.len);
        }
        self.starts = starts;
        Ok(())
    }

    /// First column of each row's sequence (empty before the batch size is known).
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// Does attention need per-row spans (a row starting after column 0, or a shared prefix)?
    pub fn has_spans(&self) -> bool {
        self.prefix.is_some() || self.starts.iter().any(|&s| s > 0)
    }

    /// Tokens held by each row of the batch, shared prefix excluded (empty before the first append).
    pub fn row_lens(&self) -> Vec<usize> {
        self.starts.iter().map(|&s| self.len.saturating_sub(s)).collect()
    }

    /// Roll one row back to its first `keep` tokens; the other rows keep theirs. The kept tokens move to end
    /// at the shared write column, so the row goes on from there.
    pub fn truncate_row(&mut self, row: usize, keep: usize) -> Result<()> {
        let Some(&start) = self.starts.get(row) else {
            candle_core::bail!("row {row} is outside a batch of {}", self.starts.len())
        };
        let keep = keep.min(self.len.saturating_sub(start));
        let new_start = self.len - keep;
        if new_start != start {
            for l in self.layers.iter().flatten() {
                for buf in [&l.k, &l.v] {
                    let moved = buf.i(row)?.narrow(1, start, keep)?.unsqueeze(0)?;
                    write_row_columns(buf, row, new_start, &moved)?;
                }
            }
        }
        self.starts[row] = new_start;
        Ok(())
    }

    /// Put row `src_row` of `src` (a cache of the same model, without a shared prefix) into row `row` of this
    /// batch, replacing what that row held: its tokens end at the shared write column. Columns are added in
    /// front of every row when the new sequence is longer than the columns so far.
    pub fn place_row(&mut self, row: usize, src: &KvCache, src_row: usize) -> Result<()> {
        if row >= self.starts.len() || src_row >= src.starts.len() {
            candle_core::bail!(
                "place_row: row {row} of {} from row {src_row} of {}",
                self.starts.len(),
                src.starts.len()
            );
        }
        let (src_start, n) = (src.starts[src_row], src.len.saturating_sub(src.starts[src_row]));
        if n > self.len {
            self.prepend_columns(n - self.len)?;
        }
        for (dst, from) in self.layers.iter().zip(&src.layers) {
            let (Some(dst), Some(from)) = (dst, from) else { candle_core::bail!("place_row: a layer is empty") };
            for (buf, f) in [(&dst.k, &from.k), (&dst.v, &from.v)] {
                if copy_columns_on_device(buf, row, self.len - n, f, src_row, src_start, n)? {
                    continue;
                }
                let tokens = f.i(src_row)?.narrow(1, src_start, n)?.unsqueeze(0)?;
                write_row_columns(buf, row, self.len - n, &tokens)?;
            }
        }
        self.starts[row] = self.len - n;
        Ok(())
    }

    /// Make this empty cache hold `rows` (single-sequence caches of the same model) side by side, each ending
    /// at the shared write column (the shorter ones start later), as a batch prefilled together would.
    pub fn gather_rows(&mut self, rows: &[KvCache]) -> Result<()> {
        if self.len != 0 || self.prefix.is_some() {
            candle_core::bail!("gather_rows: the cache is not empty");
        }
        let longest = rows.iter().map(|r| r.len).max().unwrap_or(0);
        if rows.iter().any(|r| r.prefix.is_some() || r.starts.len() > 1) {
            candle_core::bail!("gather_rows: every source holds one sequence");
        }
        let capacity = capacity_for(0, longest.max(1), self.initial_capacity, self.max_len);
        for layer in 0..self.layers.len() {
            let mut ks = vec![];
            let mut vs = vec![];
            for r in rows {
                let Some(c) = r.layers[layer].as_ref() else { candle_core::bail!("gather_rows: a layer is empty") };
                let (_, h, _, d) = c.k.dims4()?;
                let pad = |t: &Tensor| -> Result<Tensor> {
                    let used = t.narrow(2, 0, r.len)?;
                    let before = Tensor::zeros((1, h, longest - r.len, d), t.dtype(), t.device())?;
                    let after = Tensor::zeros((1, h, capacity - longest, d), t.dtype(), t.device())?;
                    Tensor::cat(&[&before, &used, &after], 2)
                };
                ks.push(pad(&c.k)?);
                vs.push(pad(&c.v)?);
            }
            self.layers[layer] = Some(LayerCache { k: Tensor::cat(&ks, 0)?, v: Tensor::cat(&vs, 0)? });
        }
        self.starts = rows.iter().map(|r| longest - r.len).collect();
        self.len = longest;
        Ok(())
    }

    /// Mark a row empty (a finished sequence whose slot waits): it attends to nothing but its own next column.
    pub fn clear_row(&mut self, row: usize) {
        if let Some(s) = self.starts.get_mut(row) {
            *s = self.len;
        }
    }

    /// Drop the leading columns no row uses (every row starts at or after them), moving the rest to column 0.
    /// Returns the number of columns freed.
    pub fn compact(&mut self) -> Result<usize> {
        let unused = self.starts.iter().copied().min().unwrap_or(0);
        if unused == 0 {
            return Ok(0);
        }
        let keep = self.len - unused;
        for l in self.layers.iter().flatten() {
            for buf in [&l.k, &l.v] {
                if keep > 0 {
                    let moved = buf.narrow(2, unused, keep)?.contiguous()?;
                    buf.slice_set(&moved, 2, 0)?;
                }
            }
        }
        self.len = keep;
        for s in &mut self.starts {
            *s -= unused;
        }
        Ok(unused)
    }

    /// Keep only the given rows, in that order (a batch that shrinks once its queue is empty); a row named twice
    /// is copied (rows that start from the same prompt).
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.starts.len()) {
            candle_core::bail!("row {bad} is outside a batch of {}", self.starts.len());
        }
        if let Some(device) = self.device() {
            let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &device)?;
            for l in self.layers.iter_mut().flatten() {
                l.k = l.k.index_select(&index, 0)?;
                l.v = l.v.index_select(&index, 0)?;
            }
        }
        self.starts = rows.iter().map(|&r| self.starts[r]).collect();
        Ok(())
    }

    /// Add `extra` empty columns in front of every row (their sequences keep ending at the write column).
    fn prepend_columns(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        self.check_room(extra)?;
        let len = self.len;
        for l in self.layers.iter_mut().flatten() {
            let capacity = capacity_for(l.k.dim(2)?, needed, self.initial_capacity, self.max_len);
            (l.k, l.v) = (relocated(&l.k, len, capacity, extra)?, relocated(&l.v, len, capacity, extra)?);
        }
        self.len = needed;
        for s in &mut self.starts {
            *s += extra;
        }
        Ok(())
    }

    /// Every row attends to `prefix` before its own columns (set on an empty cache).
    pub fn set_prefix(&mut self, prefix: Arc<SharedPrefix>) -> Result<()> {
        if self.len != 0 {
            candle_core::bail!("a shared prefix is set on an empty cache (this one holds {} tokens)", self.len);
        }
        self.prefix = Some(prefix);
        Ok(())
    }

    /// The shared prefix every row attends to first, if any.
    pub fn prefix(&self) -> Option<&Arc<SharedPrefix>> {
        self.prefix.as_ref()
    }

    /// Tokens of the shared prefix (0 without one).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len)
    }

    /// The first `len` tokens of row 0 as a shared prefix for other caches.
    pub fn share_prefix(&self, len: usize) -> Result<SharedPrefix> {
        if len == 0 || len > self.len || self.starts.first().is_some_and(|&s| s != 0) || self.prefix.is_some() {
            candle_core::bail!(
                "a shared prefix is the first {len} tokens of an unpadded row (this cache holds {})",
                self.len
            );
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let l = l.as_ref().ok_or_else(|| candle_core::Error::Msg("share_prefix: a layer is empty".into()))?;
                Ok((l.k.i(0..1)?.narrow(2, 0, len)?.contiguous()?, l.v.i(0..1)?.narrow(2, 0, len)?.contiguous()?))
            })
            .collect::<Result<_>>()?;
        Ok(SharedPrefix { layers, len })
    }

    /// The positions of the next `t` tokens of each row: `[rows, t]` (u32), counting from the shared prefix's
    /// first token through the row's own tokens.
    pub fn positions(&self, rows: usize, t: usize, device: &Device) -> Result<Tensor> {
        let prefix = self.prefix_len();
        // Column c of row r holds position c - start (padding columns before the start, masked anyway, read 0).
        let start = |r: usize| self.starts.get(r).copied().unwrap_or(0);
        let pos: Vec<u32> = (0..rows)
            .flat_map(|r| (0..t).map(move |i| (prefix + (self.len + i).saturating_sub(start(r))) as u32))
            .collect();
        Tensor::from_vec(pos, (rows, t), device)
    }

    /// Each row's first own column as a u32 tensor `[rows]` (what the span softmax reads).
    pub fn starts_tensor(&self, rows: usize, device: &Device) -> Result<Tensor> {
        let starts: Vec<u32> = (0..rows).map(|r| self.starts.get(r).copied().unwrap_or(0) as u32).collect();
        Tensor::from_vec(starts, rows, device)
    }

    /// Bytes allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes()).sum()
    }

    /// Check that `extra` more tokens fit in the context window.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.prefix_len() + self.len + extra > self.max_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context window of {} tokens",
                self.prefix_len() + self.len + extra,
                self.max_len
            );
        }
        Ok(())
    }

    /// Write `k`, `v` (`[b, kv_heads, t, d]`) for `layer` at the current position and return views of the
    /// whole cached sequence including them. Call `advance(t)` once all layers have appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if self.starts.len() != b {
            self.starts = vec![0; b];
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
        self.grow_all(extra, (1, kv_heads, head_dim), dtype, device)
    }

    /// [`KvCache::reserve`] for a batch of `rows` (`[rows, kv_heads, capacity, head_dim]` buffers); a batch of
    /// another size starts with every row at column 0, as [`KvCache::append`] does.
    pub fn reserve_rows(
        &mut self,
        rows: usize,
        extra: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        if self.starts.len() != rows {
            self.starts = vec![0; rows];
        }
        self.grow_all(extra, (rows, kv_heads, head_dim), dtype, device)
    }

    /// [`KvCache::grow`] every layer for `extra` more tokens.
    fn grow_all(&mut self, extra: usize, shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<()> {
        let needed = self.len + extra;
        for layer in 0..self.layers.len() {
            self.grow(layer, needed, shape, dtype, device)?;
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
        let new_cap = capacity_for(capacity, needed, self.initial_capacity, self.max_len);
        *slot = Some(match slot.as_ref() {
            Some(old) => {
                LayerCache { k: relocated(&old.k, self.len, new_cap, 0)?, v: relocated(&old.v, self.len, new_cap, 0)? }
            }
            None => LayerCache {
                k: Tensor::zeros((b, h, new_cap, d), dtype, device)?,
                v: Tensor::zeros((b, h, new_cap, d), dtype, device)?,
            },
        });
        Ok(())
    }

    /// Move the write position (and every row) forward after every layer appended `t` tokens.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
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
    fn reserve_rows_allocates_a_batch_and_its_starts() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 100).with_capacity(4);
        c.reserve_rows(3, 6, 2, 8, DType::F32, &dev)?;
        assert_eq!(c.starts(), &[0, 0, 0]);
        for l in 0..2 {
            let (k, v) = c.layer_buffers(l).unwrap();
            let (b, h, cap, d) = k.dims4()?;
            assert_eq!((b, h, d), (3, 2, 8));
            assert!(cap >= 6, "capacity {cap}");
            assert_eq!(v.dims(), k.dims());
        }
        assert!(c.reserve_rows(3, 101, 2, 8, DType::F32, &dev).is_err(), "past the context window");
        Ok(())
    }

    /// Row `r` of a `[b, 1, cap, 1]` buffer as the values of its columns `0..len`.
    fn row_values(c: &KvCache, r: usize) -> Vec<f32> {
        let (k, _) = c.layer_buffers(0).unwrap();
        k.i(r).unwrap().narrow(1, 0, c.len()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn append_columns(c: &mut KvCache, rows: &[&[f32]]) -> Result<()> {
        let t = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let k = Tensor::from_vec(flat, (rows.len(), 1, t, 1), &Device::Cpu)?;
        c.append(0, &k, &k)?;
        c.advance(t);
        Ok(())
    }

    #[test]
    fn rows_keep_their_own_lengths_and_positions() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(1, 100);
        append_columns(&mut c, &[&[1., 2., 3.], &[4., 5., 6.]])?;
        assert_eq!(c.row_lens(), vec![3, 3]);
        // Row 1 keeps its first token, moved to end at the write column.
        c.truncate_row(1, 1)?;
        assert_eq!((c.row_lens(), c.len(), c.starts()), (vec![3, 1], 3, &[0, 2][..]));
        assert_eq!(row_values(&c, 1)[2], 4.);
        assert_eq!(c.positions(2, 2, &dev)?.to_vec2::<u32>()?, vec![vec![3, 4], vec![1, 2]]);
        assert!(c.truncate_row(2, 0).is_err());
        Ok(())
    }

    #[test]
    fn rows_are_replaced_compacted_and_dropped() -> Result<()> {
        let mut c = KvCache::new(1, 100);
        append_columns(&mut c, &[&[1., 2.], &[3., 4.]])?;
        // A sequence of 3 tokens replaces row 0: one column is added in front of both rows.
        let mut fresh = KvCache::new(1, 100);
        append_columns(&mut fresh, &[&[7., 8., 9.]])?;
        c.place_row(0, &fresh, 0)?;
        assert_eq!((c.len(), c.starts()), (3, &[0, 1][..]));
        assert_eq!((row_values(&c, 0), &row_values(&c, 1)[1..]), (vec![7., 8., 9.], &[3., 4.][..]));
        // A shorter one ends at the write column too.
        let mut short = KvCache::new(1, 100);
        append_columns(&mut short, &[&[5.]])?;
        c.place_row(0, &short, 0)?;
        assert_eq!(c.starts(), &[2, 1]);
        assert_eq!(c.compact()?, 1);
        assert_eq!((c.len(), c.starts(), row_values(&c, 0)[1], row_values(&c, 1)), (2, &[1, 0][..], 5., vec![3., 4.]));
        c.retain_rows(&[1])?;
        assert_eq!((c.starts(), row_values(&c, 0)), (&[0][..], vec![3., 4.]));
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
