//! Small shared helpers: atomic file writes, peak memory.

use anyhow::{Context, Result};
use std::path::Path;

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so readers never
/// see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Save tensors as safetensors through a temporary file and a rename (no partial file on failure).
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    candle_core::safetensors::save(tensors, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Add `record` to the `runs` list of the JSON results file at `path`, replacing any earlier run with the same
/// values at the JSON pointers `key` (e.g. `/model`, `/settings/targets`); written atomically. A missing or
/// unreadable file starts a new one; a JSON file without a `runs` list is refused rather than overwritten.
pub fn save_run(path: &Path, record: serde_json::Value, key: &[&str]) -> Result<()> {
    let mut doc: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({"schema_version": 1, "runs": []}));
    let key_of = |r: &serde_json::Value| key.iter().map(|k| r.pointer(k).cloned()).collect::<Vec<_>>();
    let runs = doc["runs"]
        .as_array_mut()
        .with_context(|| format!("{}: a JSON file without a `runs` list; not overwriting it", path.display()))?;
    runs.retain(|r| key_of(r) != key_of(&record));
    runs.push(record);
    write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Current resident set size in bytes (Linux `VmRSS`), if known.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Memory in use on the GPU behind `device` (the whole card, as the driver reports it), if it is a CUDA device.
pub fn gpu_memory_used_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

/// Peak bytes allocated on the GPU behind `device` by this process (the high-water mark of the CUDA memory pool
/// that tensor allocations come from), if it is a CUDA device. Unlike the card-wide figure, this excludes the
/// CUDA context and memory the pool keeps cached after it was freed.
pub fn gpu_peak_allocated_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let dev = d.cuda_stream().context().cu_device();
        let mut pool = std::mem::MaybeUninit::uninit();
        let mut high: u64 = 0;
        // SAFETY: out-pointers to locals; the pool handle comes from the driver.
        unsafe {
            if sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), dev) != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            let ptr = &mut high as *mut u64 as *mut std::ffi::c_void;
            if sys::cuMemPoolGetAttribute(pool.assume_init(), attr, ptr) != sys::CUresult::CUDA_SUCCESS {
                return None;
            }
        }
        return Some(high);
    }
    let _ = device;
    None
}
