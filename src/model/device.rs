//! Device and dtype selection: CUDA, then Metal, then CPU, unless `--device` says otherwise.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// A CUDA device with its own stream, on which all of its work runs (candle's ops, our kernels and decode
/// graphs): ordering comes from the stream, so candle's per-tensor event tracking (for sharing tensors across
/// streams) is switched off — it cost host time on every op.
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let d = Device::new_cuda_with_stream(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // SAFETY: every tensor of this device is created and used on its single stream.
        unsafe { c.disable_event_tracking() };
    }
    Ok(d)
}

pub fn select_device(spec: Option<&str>) -> Result<Device> {
    match spec.map(|s| s.trim().to_ascii_lowercase()) {
        None => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = open_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        Some(s) if s == "cpu" => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().with_context(|| format!("--device: bad CUDA ordinal in `{s}`"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this build has no CUDA support (rebuild with `--features cuda`)");
            }
            open_cuda(ordinal).with_context(|| format!("--device {s}: cannot open CUDA device {ordinal}"))
        }
        Some(s) if s == "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this build has no Metal support (rebuild with `--features metal`)");
            }
            Device::new_metal(0).context("--device metal: cannot open the Metal device")
        }
        Some(s) => bail!("--device: unknown `{s}` (expected cpu, cuda, cuda:N or metal)"),
    }
}

/// The compute dtype: `--dtype` if given, else bf16 on CUDA, f16 on Metal, f32 on CPU.
pub fn select_dtype(spec: Option<&str>, device: &Device) -> Result<DType> {
    match spec.map(|s| s.to_ascii_lowercase()) {
        None => Ok(match device {
            Device::Cuda(_) => DType::BF16,
            Device::Metal(_) => DType::F16,
            Device::Cpu => DType::F32,
        }),
        Some(s) => match s.as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => bail!("--dtype: unknown `{other}` (expected f32, f16 or bf16)"),
        },
    }
}

pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}
