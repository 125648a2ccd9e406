//! Many small f32 tensors and one flat vector holding them end to end, in order: the optimizer's view of the
//! adapter's parameters. The gradients go into the vector and the updated values back into the parameters
//! in one pass each. On the GPU that is one kernel over a table of segments instead of a copy per tensor: an
//! adapter on every linear layer is 300+ tensors, and every copy is a launch the host has to issue.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, Var};

/// `flat[segment i] = grads[i]` (or `+=` with `add`), the segments laid out as `vars` are, in order; a
/// missing gradient is zeros (nothing is added). Every gradient has its variable's element count; all f32.
pub fn gather(flat: &Tensor, vars: &[Var], grads: &[Option<Tensor>], add: bool) -> Result<()> {
    let sizes = check(flat, vars)?;
    if grads.len() != vars.len() {
        candle_core::bail!("gather: {} gradients for {} parameters", grads.len(), vars.len());
    }
    let mut parts = Vec::with_capacity(grads.len());
    for (i, (g, n)) in grads.iter().zip(&sizes).enumerate() {
        parts.push(match g {
            Some(g) if g.elem_count() != *n || g.dtype() != DType::F32 => candle_core::bail!(
                "gather: gradient {i} is {:?} {:?}, its parameter has {n} f32 values",
                g.dims(),
                g.dtype()
            ),
            Some(g) => Some(g.flatten_all()?.contiguous()?),
            None => None,
        });
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = flat.device() {
        // The parts stay alive (held in `parts`) until the kernel is queued; candle frees in stream order.
        return cuda::copy_segments(dev, flat, &sizes, add, |stream, segment, i| {
            Ok(match &parts[i] {
                Some(p) => Some((crate::ops::launch::storage_ptr(p, stream)?, segment)),
                None if add => None,
                None => Some((0, segment)),
            })
        });
    }
    flat.inplace_op1(&Gather { parts, sizes, add })
}

/// `vars[i] = flat[segment i]`: every variable takes its values from the vector.
pub fn scatter(flat: &Tensor, vars: &[Var]) -> Result<()> {
    let sizes = check(flat, vars)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = flat.device() {
        return cuda::copy_segments(dev, flat, &sizes, false, |stream, segment, i| {
            Ok(Some((segment, crate::ops::launch::storage_ptr(vars[i].as_tensor(), stream)?)))
        });
    }
    let mut offset = 0;
    for (v, n) in vars.iter().zip(sizes) {
        v.set(&flat.narrow(0, offset, n)?.reshape(v.shape())?)?;
        offset += n;
    }
    Ok(())
}

/// The variables' element counts, after checking that `flat` is a contiguous f32 vector of their total and
/// that each of them is contiguous f32 on its device.
fn check(flat: &Tensor, vars: &[Var]) -> Result<Vec<usize>> {
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let total: usize = sizes.iter().sum();
    if flat.dims() != [total] || flat.dtype() != DType::F32 || !flat.is_contiguous() {
        candle_core::bail!(
            "flat vector: {:?} {:?} for {total} f32 parameters (contiguous expected)",
            flat.dims(),
            flat.dtype()
        );
    }
    for (i, v) in vars.iter().enumerate() {
        if v.dtype() != DType::F32 || !v.is_contiguous() || !v.device().same_device(flat.device()) {
            candle_core::bail!("flat vector: parameter {i} is not a contiguous f32 tensor on the vector's device");
        }
    }
    Ok(sizes)
}

/// The CPU side of [`gather`]: an in-place op on the vector that reads every part.
struct Gather {
    parts: Vec<Option<Tensor>>,
    sizes: Vec<usize>,
    add: bool,
}

impl candle_core::InplaceOp1 for Gather {
    fn name(&self) -> &'static str {
        "gather-segments"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(flat) = s else { candle_core::bail!("gather: f32 vector") };
        let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("gather: contiguous vector") };
        let mut segments: &mut [f32] = &mut flat[start..end];
        for (part, &n) in self.parts.iter().zip(&self.sizes) {
            let (dst, rest) = std::mem::take(&mut segments).split_at_mut(n);
            segments = rest;
            let Some(part) = part else {
                if !self.add {
                    dst.fill(0.0);
                }
                continue;
            };
            let (storage, layout) = part.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(src)), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
                candle_core::bail!("gather: a contiguous f32 gradient on the CPU");
            };
            let src = &src[a..b];
            if self.add {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::{CudaDevice, Result, Tensor};

    /// One launch of `copy_segments_f32` over the segments of `flat` (`sizes[i]` floats each, in order):
    /// `pair(stream, address of segment i in flat, i)` gives its (source, destination) addresses — a source of
    /// 0 is zeros — or `None` to leave it out.
    pub fn copy_segments(
        dev: &CudaDevice,
        flat: &Tensor,
        sizes: &[usize],
        add: bool,
        pair: impl Fn(&CudaStream, u64, usize) -> Result<Option<(u64, u64)>>,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let base = crate::ops::launch::storage_ptr(flat, &stream)?;
        let mut table = Vec::with_capacity(3 * sizes.len());
        let mut offset = 0u64;
        for (i, &n) in sizes.iter().enumerate() {
            if let Some((src, dst)) = pair(&stream, base + 4 * offset, i)? {
                table.extend([src, dst, n as u64]);
            }
            offset += n as u64;
        }
        let segments = table.len() / 3;
        if segments == 0 {
            return Ok(());
        }
        if segments > 65_535 {
            candle_core::bail!("copy_segments: {segments} segments, at most 65,535 in one launch");
        }
        let longest = table.chunks(3).map(|e| e[2]).max().unwrap_or(0) as u32;
        let mut on_device = dev.alloc_zeros::<u64>(table.len())?;
        dev.memcpy_htod(&table, &mut on_device)?;
        let f = crate::ops::fused::cuda::kernel(dev, "copy_segments_f32")?;
        use crate::ops::launch::{launch, slice_ptr, Arg};
        let grid = (longest.div_ceil(256).clamp(1, 1024), segments as u32, 1);
        // The table is freed in stream order, after the kernel has read it.
        launch(&stream, &f, false, grid, 256, 0, &[Arg::P(slice_ptr(&on_device, &stream)), Arg::I(add as i32)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vars(device: &Device) -> Result<Vec<Var>> {
        [(3usize, 5usize), (1, 7), (4, 2)]
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                let values: Vec<f32> = (0..r * c).map(|j| (i * 100 + j) as f32).collect();
                Var::from_tensor(&Tensor::from_vec(values, (r, c), device)?)
            })
            .collect()
    }

    /// The vector is the concatenation of the gradients (zeros where one is missing), `add` sums onto it,
    /// and scattering hands each variable its own segment.
    fn round_trip(device: &Device) -> Result<()> {
        let vars = vars(device)?;
        let grads: Vec<Option<Tensor>> = vec![
            Some((vars[0].as_tensor() * 2.0)?),
            None,
            Some(vars[2].as_tensor().t()?.contiguous()?.t()?.affine(1.0, 0.5)?),
        ];
        let n: usize = vars.iter().map(|v| v.elem_count()).sum();
        let flat = Tensor::full(9f32, n, device)?;
        gather(&flat, &vars, &grads, false)?;
        let want = |k: f32| -> Result<Vec<f32>> {
            let mut w = vec![];
            for (v, g) in vars.iter().zip(&grads) {
                match g {
                    Some(g) => w.extend((g * k as f64)?.flatten_all()?.to_vec1::<f32>()?),
                    None => w.extend(vec![0f32; v.elem_count()]),
                }
            }
            Ok(w)
        };
        assert_eq!(flat.to_vec1::<f32>()?, want(1.0)?);
        gather(&flat, &vars, &grads, true)?;
        assert_eq!(flat.to_vec1::<f32>()?, want(2.0)?);
        let values = Tensor::arange(0f32, n as f32, device)?;
        scatter(&values, &vars)?;
        let mut offset = 0;
        for v in &vars {
            let got = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let k = v.elem_count();
            assert_eq!(got, (offset..offset + k).map(|x| x as f32).collect::<Vec<_>>());
            offset += k;
        }
        let short = Tensor::zeros(n - 1, DType::F32, device)?;
        assert!(gather(&short, &vars, &grads, false).is_err(), "a vector of the wrong size is refused");
        assert!(gather(&flat, &vars, &grads[..2], false).is_err(), "a gradient per parameter");
        Ok(())
    }

    #[test]
    fn segments_gather_and_scatter_on_the_cpu() -> Result<()> {
        round_trip(&Device::Cpu)
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn segments_gather_and_scatter_on_cuda() -> Result<()> {
        let Some(gpu) = crate::testing::cuda_device() else { return Ok(()) };
        round_trip(&gpu)
    }
}
