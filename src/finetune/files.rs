//! Putting a run's folders and files in place whole (checkpoints, merged models): everything is written into
//! a temporary entry beside the target, put on disk, then renamed over it, so that the target is always the
//! previous version or the new one, complete. Temporary entries left by a killed process are recognised by
//! their name (`.<name>.<pid>.tmp`) and removed by the next run. Also the checks that an output folder can
//! be written, made before any work.

use crate::util::{finish_file, sync_dir, sync_parent};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Duration;

/// Put the fully written temporary file or folder `tmp` in place at `target` (beside it): file modes and data
/// on disk, then an atomic rename (a folder is swapped with the one it replaces, which is then removed).
/// `pause` is a test hook: the wait between the complete temporary copy and the rename.
pub fn publish(tmp: &Path, target: &Path, pause: Option<Duration>) -> Result<()> {
    if tmp.is_dir() {
        for entry in std::fs::read_dir(tmp).with_context(|| format!("cannot read {}", tmp.display()))? {
            let path = entry?.path();
            if path.is_file() {
                finish_file(&path)?;
            }
        }
        sync_dir(tmp)?;
    } else {
        finish_file(tmp)?;
    }
    if let Some(pause) = pause {
        std::thread::sleep(pause);
    }
    if tmp.is_dir() && target.is_dir() {
        swap(tmp, target)?;
        // `tmp` now holds the replaced folder; a leftover of it, should this stop here, is cleaned next run.
        std::fs::remove_dir_all(tmp).with_context(|| format!("cannot remove the replaced {}", tmp.display()))?;
    } else {
        std::fs::rename(tmp, target)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), target.display()))?;
    }
    sync_parent(target)
}

/// Exchange two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`); where that is not supported, the
/// old one is moved aside first.
fn swap(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (ca, cb) =
            (std::ffi::CString::new(a.as_os_str().as_bytes())?, std::ffi::CString::new(b.as_os_str().as_bytes())?);
        // SAFETY: two NUL-terminated paths that live across the call.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e).with_context(|| format!("cannot move {} to {}", a.display(), b.display()));
        }
    }
    let aside = crate::util::temp_path_beside(&b.with_extension("old"));
    std::fs::rename(b, &aside).with_context(|| format!("cannot move {} aside", b.display()))?;
    std::fs::rename(a, b).with_context(|| format!("cannot move {} to {}", a.display(), b.display()))?;
    std::fs::rename(&aside, a).with_context(|| format!("cannot move {} to {}", aside.display(), a.display()))
}

/// Remove the temporary entries (`.<name>.<pid>.tmp`) in `dir` that processes no longer running left behind;
/// returns how many. Entries of a running process (another run writing here) are left alone.
pub fn clean_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name) else { continue };
        if crate::util::process_is_running(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The process id in a temporary entry's name (`.adapter_model.safetensors.123.tmp`, `.merged.gguf.123.gguf.tmp`).
fn leftover_pid(name: &str) -> Option<i32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    inner
        .split('.')
        .skip(1)
        .filter(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        .find_map(|p| p.parse().ok())
}

pub use crate::util::check_writable_folder;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_carry_their_process_id() {
        assert_eq!(leftover_pid(".checkpoint.123.tmp"), Some(123));
        assert_eq!(leftover_pid(".merged.gguf.77.gguf.tmp"), Some(77));
        assert_eq!(leftover_pid(".adapter_model.safetensors.9.tmp"), Some(9));
        assert_eq!(leftover_pid("checkpoint"), None);
        assert_eq!(leftover_pid(".hidden.tmp"), None);
        assert_eq!(leftover_pid("merged.123.tmp"), None, "only hidden entries are ours");
    }

    #[test]
    fn publish_swaps_folders_whole_and_cleans_only_dead_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("checkpoint");
        for (version, expect_old) in [("1", false), ("2", true)] {
            let tmp = crate::util::temp_path_beside(&target);
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::write(tmp.join("v"), version).unwrap();
            assert_eq!(target.join("v").exists(), expect_old);
            publish(&tmp, &target, None).unwrap();
            assert_eq!(std::fs::read_to_string(target.join("v")).unwrap(), version);
            assert!(!tmp.exists(), "the replaced folder is removed");
        }
        // A leftover of a process that is gone goes; one of a running process (this one) stays.
        let dead = dir.path().join(format!(".merged.{}.tmp", i32::MAX - 1));
        let alive = dir.path().join(format!(".merged.{}.tmp", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&alive).unwrap();
        assert_eq!(clean_leftovers(dir.path()), 1);
        assert!(!dead.exists() && alive.exists() && target.exists());
    }

    #[test]
    fn writable_folder_checks_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b");
        check_writable_folder(&deep).unwrap();
        assert!(!dir.path().join("a").exists());
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = check_writable_folder(&file.join("sub")).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        assert!(check_writable_folder(Path::new("/proc/x")).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no probe left behind");
    }
}
