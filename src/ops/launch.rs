//! Kernel launches and device addresses for our CUDA kernels outside candle's ops (the decode graphs, the
//! span attention): raw `cuLaunchKernelEx` with 8-byte argument slots, optional programmatic dependent launch.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use candle_core::{DType, Result, Storage, Tensor};
use half::bf16;

/// A kernel argument, passed in an 8-byte slot.
#[derive(Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    F(f32),
}

impl Arg {
    pub fn bits(self) -> u64 {
        match self {
            Arg::P(p) => p,
            Arg::I(i) => i as u32 as u64,
            Arg::F(f) => f.to_bits() as u64,
        }
    }
}

pub fn storage_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    if !t.is_contiguous() {
        candle_core::bail!("kernel argument: tensor is not contiguous");
    }
    view_ptr(t, stream)
}

/// The device address of `t`'s first element whatever its layout (the kernel it goes to takes the strides).
pub fn view_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else { candle_core::bail!("kernel argument: tensor is not on CUDA") };
    let base = match t.dtype() {
        DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        dt => candle_core::bail!("kernel argument: unexpected dtype {dt:?}"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

pub fn slice_ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Launch `f` on `stream` with one 8-byte slot per argument; with `pdl`, the kernel may start while the
/// previous one finishes (our kernels wait for it before reading anything it wrote).
pub fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    pdl: bool,
    grid: (u32, u32, u32),
    block: u32,
    smem: u32,
    args: &[Arg],
) -> Result<()> {
    let mut slots: Vec<u64> = args.iter().map(|a| a.bits()).collect();
    let mut params: Vec<*mut std::ffi::c_void> =
        slots.iter_mut().map(|v| v as *mut u64 as *mut std::ffi::c_void).collect();
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: pdl as u32,
    };
    // SAFETY: `params` points at one 8-byte slot per kernel parameter, in the kernel's order; every
    // pointer parameter is a live device buffer (held by the caller's engine or keyed by the cache).
    unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(candle_core::Error::wrap)
}
