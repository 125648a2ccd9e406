//! Small shared helpers: atomic file writes, a quiet end when stdout is closed, peak memory.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Exit status when stdout is closed under us (`billion … | head`): 141, what a shell reports for a program
/// that SIGPIPE ended (128 + 13), so scripts see the same status as for `cat` or `grep` in that place.
pub const CLOSED_STDOUT_EXIT: i32 = 141;

/// The process's panic hook, installed once at start: a write to a closed stdout ends the process quietly with
/// [`CLOSED_STDOUT_EXIT`] instead of a panic ("failed printing to stdout: Broken pipe"), and a panic inside
/// [`contain_panic`] stays silent (it becomes that call's error). SIGPIPE stays ignored (child processes'
/// pipes are written to), so `print!`/`println!` see EPIPE and panic; the hook recognises exactly that panic.
/// Every other panic goes to the hook installed before.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_stdout_panic(msg) {
            std::process::exit(CLOSED_STDOUT_EXIT);
        }
        if CONTAINING.with(|c| c.get()) {
            return;
        }
        previous(info)
    }));
}

thread_local! {
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run a third-party parser that may panic on malformed input (the `tokenizers` crate does on some
/// tokenizer.json files) and turn its panic into an error carrying the panic's message.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let was = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the parser panicked".into())
    })
}

/// The standard library's panic message for `print!` to a stdout whose reader has gone.
fn is_closed_stdout_panic(msg: &str) -> bool {
    let epipe = std::io::Error::from_raw_os_error(libc::EPIPE).to_string();
    msg.starts_with("failed printing to stdout") && msg.contains(&epipe)
}

/// The temporary file `write_atomic` writes `name` through, for this process.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}.tmp", std::process::id()))
}

/// Remove temporary files of `name` left by writers that were killed (their process is gone), so a crash
/// leaves no litter beyond the next write. Temporary files of live processes are theirs and stay.
fn remove_orphaned_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".tmp")) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if pid > 0 && !process_is_running(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Is process `pid` alive (one of another user's counts too)? Temporary files carry their writer's id, so a
/// leftover of a process that is gone can be told from one that is still being written.
pub fn process_is_running(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Milliseconds to pause halfway through writing a temporary file (`BILLION_WRITE_PAUSE_MS`): fault tests
/// kill or starve the process there to show that the final path never holds a partial file.
fn write_pause() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("BILLION_WRITE_PAUSE_MS").ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Every file we write is readable by all and writable by its owner (0644), as other tools leave theirs,
/// whatever the writer used for its temporary file.
pub fn set_shared_mode(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

/// Write `bytes` to `path` through a temporary file in the same folder, flushed to disk, and a rename, so
/// readers never see a partial file: after a failure (full disk) or a crash the old file, if any, is intact
/// and the temporary file is removed (a crashed writer's, at the next write).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    remove_orphaned_temps(dir, &name);
    let tmp = temp_path(dir, &name);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        match write_pause() {
            Some(pause) => {
                let (first, rest) = bytes.split_at(bytes.len() / 2);
                f.write_all(first)?;
                f.flush()?;
                std::thread::sleep(pause);
                f.write_all(rest)?;
            }
            None => f.write_all(bytes)?,
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::anyhow!("cannot write {}: {e}", path.display()));
    }
    publish_file(&tmp, path)
}

/// Save tensors as safetensors through a temporary file and a rename (no partial file on failure).
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    remove_orphaned_temps(dir, &name);
    let tmp = temp_path(dir, &name);
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::anyhow!("cannot write {}: {e}", path.display()));
    }
    publish_file(&tmp, path)
}

/// The temporary name beside `path` that a write goes through: hidden, with this process's id, ending in
/// `.tmp`, so that a leftover of a killed process is recognisable.
pub fn temp_path_beside(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    temp_path(dir, &name)
}

/// Give a fully written temporary file its final mode (0644), put its data on disk and rename it to `path`
/// (the rename on disk too). The temporary file is removed when that fails.
pub fn publish_file(tmp: &Path, path: &Path) -> Result<()> {
    let published = finish_file(tmp).and_then(|()| {
        std::fs::rename(tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if published.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    published?;
    sync_parent(path)
}

/// Give a written file the shared mode and put its data on disk (before it is renamed into place).
pub fn finish_file(path: &Path) -> Result<()> {
    set_shared_mode(path).with_context(|| format!("cannot set the mode of {}", path.display()))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot put {} on disk", path.display()))
}

/// Put the entries of `path`'s folder (a rename into it) on disk.
pub fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Put a folder's entries on disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// Can files be written in folder `dir`, or can it be created? Tried for real (a probe file made and removed
/// in the nearest existing folder), so permissions, read-only file systems and pseudo file systems all count.
/// Creates nothing that stays.
pub fn check_writable_folder(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        anyhow::bail!("{}: not a folder", existing.display());
    }
    let probe = existing.join(format!(".write-probe.{}.tmp", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if existing == dir => Err(e).with_context(|| format!("{}: cannot write in this folder", dir.display())),
        Err(e) => {
            Err(e).with_context(|| format!("{}: cannot create this folder in {}", dir.display(), existing.display()))
        }
    }
}

/// Can a file be written at `path` (its folder writable or creatable, the path not a folder)? Creates nothing.
pub fn check_output_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("{}: a folder, expected a file path", path.display());
    }
    check_writable_folder(path.parent().unwrap_or(Path::new("")))
}

/// Before any work: `path` can take a results file (see [`save_run`]) — writable, and if a file is there, a
/// results file (a JSON object with a `runs` list) that a run can be added to.
pub fn check_results_file(path: &Path) -> Result<()> {
    check_output_file(path)?;
    read_results(path).map(|_| ())
}

/// The results document at `path`: a new one when there is no file, else the file, which must be a JSON
/// object with a `runs` list (anything else is refused, never overwritten).
fn read_results(path: &Path) -> Result<serde_json::Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(serde_json::json!({"schema_version": 1, "runs": []}));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON results file; not overwriting it", path.display()))?;
    if !doc.get("runs").is_some_and(|r| r.is_array()) {
        anyhow::bail!("{}: a JSON file without a `runs` list; not overwriting it", path.display());
    }
    Ok(doc)
}

/// Add `record` to the `runs` list of the JSON results file at `path`, replacing any earlier run with the same
/// values at the JSON pointers `key` (e.g. `/model`, `/settings/targets`); written atomically. A missing file
/// starts a new one; a file that is not a results file is refused rather than overwritten.
pub fn save_run(path: &Path, record: serde_json::Value, key: &[&str]) -> Result<()> {
    let mut doc = read_results(path)?;
    let key_of = |r: &serde_json::Value| key.iter().map(|k| r.pointer(k).cloned()).collect::<Vec<_>>();
    let runs = doc.get_mut("runs").and_then(|r| r.as_array_mut()).expect("checked by read_results");
    runs.retain(|r| key_of(r) != key_of(&record));
    runs.push(record);
    write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

/// Items per thread when `items` are split over the cores (at least 1): the chunk size for `chunks(per)` under
/// `std::thread::scope`, one chunk a core.
pub fn items_per_thread(items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    items.div_ceil(cores.min(items).max(1)).max(1)
}

/// Free memory on the GPU behind `device`, if it is a CUDA device.
pub fn gpu_memory_free_bytes(device: &candle_core::Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        let (free, _) = d.cuda_stream().context().mem_get_info().ok()?;
        // Memory the pool keeps mapped after it was freed (see `keep_freed_gpu_memory`) is ours to reuse.
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        let reserved = pool_attribute(device, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
        let cached = match (reserved, pool_attribute(device, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)) {
            (Some(reserved), Some(used)) => reserved.saturating_sub(used) as usize,
            _ => 0,
        };
        return Some(free + cached);
    }
    let _ = device;
    None
}

/// The default memory pool of `device`'s GPU, which tensor allocations come from (`None` off CUDA or if the
/// driver refuses).
#[cfg(feature = "cuda")]
fn default_pool(device: &candle_core::Device) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(d) = device else { return None };
    let mut pool = std::mem::MaybeUninit::uninit();
    // SAFETY: out-pointer to a local, written by the driver on success.
    unsafe {
        let dev = d.cuda_stream().context().cu_device();
        (sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), dev) == sys::CUresult::CUDA_SUCCESS)
            .then(|| pool.assume_init())
    }
}

/// One figure (a byte count) of `device`'s default memory pool.
#[cfg(feature = "cuda")]
fn pool_attribute(
    device: &candle_core::Device,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(device)?;
    let mut value: u64 = 0;
    // SAFETY: the pool handle comes from the driver; the out-pointer is a local u64, as these attributes take.
    let status = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void) };
    (status == sys::CUresult::CUDA_SUCCESS).then_some(value)
}

/// Let the CUDA memory pool keep up to a quarter of the card mapped after it is freed. By default the pool
/// hands freed memory back to the driver at every synchronization, so each batch of a long run (an MMLU pass
/// copies its scores to the host) mapped its buffers again.
pub fn keep_freed_gpu_memory(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let (candle_core::Device::Cuda(d), Some(pool)) = (device, default_pool(device)) {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Ok((_, total)) = d.cuda_stream().context().mem_get_info() else { return };
        let mut keep = (total / 4) as u64;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        // SAFETY: the pool handle comes from the driver; the value is a u64, as the attribute takes it. A
        // refusal leaves the driver's default (slower, not wrong).
        let _ = unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut keep as *mut u64 as *mut std::ffi::c_void) };
    }
    let _ = device;
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
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
        return pool_attribute(device, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// Run in a child process by `closed_stdout_exits_quietly`: prints until stdout's reader is gone.
    #[test]
    #[ignore = "run as a child process by closed_stdout_exits_quietly"]
    fn print_until_stdout_closes() {
        if std::env::var_os("BILLION_PRINT_UNTIL_CLOSED").is_none() {
            return;
        }
        install_panic_hook();
        std::thread::sleep(std::time::Duration::from_millis(300));
        loop {
            println!("a line nobody reads");
        }
    }

    #[test]
    fn closed_stdout_exits_quietly() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "util::tests::print_until_stdout_closes", "--ignored", "--nocapture"])
            .env("BILLION_PRINT_UNTIL_CLOSED", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Read the harness's first line, then close the pipe before the test prints.
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        reader.read_line(&mut first).unwrap();
        drop(reader);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(CLOSED_STDOUT_EXIT), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    #[test]
    fn contained_panics_become_errors() {
        assert_eq!(contain_panic(|| 7), Ok(7));
        let err = contain_panic(|| -> u8 { panic!("bad decoder") }).unwrap_err();
        assert_eq!(err, "bad decoder");
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        // A temporary file of a writer that no longer exists (pid far above pid_max) is swept.
        let orphan = dir.path().join(".out.json.999999999.tmp");
        std::fs::write(&orphan, b"half").unwrap();
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!orphan.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
