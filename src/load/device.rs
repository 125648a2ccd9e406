//! Device and dtype selection: CUDA, then Metal, then CPU, unless the caller names one.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// Where to run: parsed from `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| format!("bad CUDA ordinal in `{s}`")),
                None => Err(format!("unknown device `{s}` (expected cpu, cuda, cuda:N or metal)")),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

/// A compute dtype name (`f32`, `f16`, `bf16` and their long spellings) → the dtype.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype `{other}` (expected f32, f16 or bf16)")),
    }
}

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
    crate::util::keep_freed_gpu_memory(&d);
    Ok(d)
}

/// The device named, or the best one present: CUDA, then Metal, then CPU.
pub fn select_device(spec: Option<DeviceSpec>) -> Result<Device> {
    match spec {
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
        Some(DeviceSpec::Cpu) => Ok(Device::Cpu),
        Some(DeviceSpec::Cuda(ordinal)) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("device cuda:{ordinal}: this build has no CUDA support (rebuild with `--features cuda`)");
            }
            open_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
        }
        Some(DeviceSpec::Metal) => {
            if !candle_core::utils::metal_is_available() {
                bail!("device metal: this build has no Metal support (rebuild with `--features metal`)");
            }
            Device::new_metal(0).context("cannot open the Metal device")
        }
    }
}

/// The compute dtype: the one given, else bf16 on CUDA, f16 on Metal, f32 on CPU.
pub fn select_dtype(spec: Option<DType>, device: &Device) -> DType {
    spec.unwrap_or(match device {
        Device::Cuda(_) => DType::BF16,
        Device::Metal(_) => DType::F16,
        Device::Cpu => DType::F32,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_names_parse() {
        assert_eq!("CUDA:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains("ordinal"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("expected cpu"));
        assert_eq!(parse_dtype("bfloat16").unwrap(), DType::BF16);
        assert!(parse_dtype("f8").is_err());
        assert_eq!(select_dtype(None, &Device::Cpu), DType::F32);
    }
}
