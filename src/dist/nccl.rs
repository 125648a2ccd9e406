//! Sums over the ranks' CUDA devices through NCCL: one communicator per rank, on the stream the rank's model
//! runs on, so a sum is ordered after the work that produced its input without a host sync.

use super::Group;
use anyhow::{bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::rc::Rc;

pub struct DeviceReduce {
    comm: Rc<Comm>,
}

impl DeviceReduce {
    /// Every rank calls this together: rank 0 makes the id, the exchange hands it to the others, and each
    /// joins the communicator on its device.
    pub fn connect(group: &Group, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else { bail!("NCCL needs a CUDA device") };
        let mine = if group.rank() == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: cannot make a unique id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        let all = group.all_gather(mine)?;
        let bytes: [u8; 128] = all[0].as_slice().try_into().context("rank 0 sent an NCCL id of the wrong size")?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let comm = Comm::from_rank(stream, group.rank(), group.world(), id)
            .map_err(|e| anyhow::anyhow!("rank {}: NCCL did not connect: {e:?}", group.rank()))?;
        Ok(Self { comm: Rc::new(comm) })
    }

    /// The sum of `t` over the ranks, on every rank.
    pub fn sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = AllReduce { comm: self.comm.clone() };
        Ok(t.contiguous()?.apply_op1_no_bwd(&op)?)
    }
}

struct AllReduce {
    comm: Rc<Comm>,
}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("an NCCL sum of a CPU tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        macro_rules! sum_as {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?;
                let src = match l.contiguous_offsets() {
                    Some((0, end)) if end == src.len() => src.slice(0..end),
                    Some((a, b)) => src.slice(a..b),
                    None => candle_core::bail!("an NCCL sum of a strided tensor"),
                };
                let mut dst = stream.alloc_zeros::<$t>(n).map_err(candle_core::Error::wrap)?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => sum_as!(f32),
            DType::BF16 => sum_as!(half::bf16),
            DType::F16 => sum_as!(half::f16),
            dt => candle_core::bail!("an NCCL sum of {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
