//! Downloading a repo's files into the HF cache: free-space check first, one progress bar per file plus a
//! total, HTTP Range resume from `blobs/<etag>.incomplete`, sha256 verification while streaming (a mismatch
//! deletes the file and retries once), and a per-blob file lock so concurrent runs never corrupt a file.

use super::{agent, http_error, repo_info, HubConfig, RepoFile, RepoKind};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// No progress output at all.
    pub quiet: bool,
    /// Machine-readable run: no bars, stdout left alone.
    pub json: bool,
    /// Extra tries after a dropped connection within one run (each resumes with Range).
    pub network_retries: usize,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        let retries = std::env::var("BILLION_HUB_RETRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        Self { quiet: false, json: false, network_retries: retries }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct DownloadedFile {
    pub name: String,
    pub size: u64,
    pub sha256: Option<String>,
    /// Already complete in the cache before this run.
    pub cached: bool,
}

#[derive(Debug)]
pub struct Downloaded {
    pub repo: String,
    pub commit: String,
    pub snapshot: PathBuf,
    pub files: Vec<DownloadedFile>,
}

/// The first file loading needs that a snapshot folder lacks (config.json, the weights or a shard).
pub fn snapshot_missing(snap: &Path) -> Option<String> {
    if !snap.join("config.json").exists() {
        return Some("config.json".into());
    }
    if snap.join("model.safetensors").exists() {
        return None;
    }
    let index = snap.join("model.safetensors.index.json");
    if !index.exists() {
        return Some("model.safetensors".into());
    }
    match crate::formats::safetensors::model_files(snap) {
        Ok(_) => None,
        Err(e) => Some(format!("a shard listed in model.safetensors.index.json ({e})")),
    }
}

pub fn snapshot_complete(snap: &Path) -> bool {
    snapshot_missing(snap).is_none()
}

/// Free bytes on the filesystem holding `dir` (or its nearest existing parent).
/// `BILLION_HUB_FREE_BYTES` replaces the figure (tests simulate a full disk with it).
pub fn free_bytes(dir: &Path) -> Result<u64> {
    if let Some(v) = std::env::var("BILLION_HUB_FREE_BYTES").ok().and_then(|v| v.parse().ok()) {
        return Ok(v);
    }
    let mut p = dir.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = PathBuf::from(".");
            break;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).context("cache path")?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!("cannot read free space of {}", p.display());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Hold an exclusive lock on `path` while alive (flock; released on drop or process exit).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot create lock {}", path.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}", path.display());
        }
        Ok(Self { _file: f })
    }
}

fn blob_name(f: &RepoFile) -> String {
    f.sha256.clone().or_else(|| f.blob_id.clone()).unwrap_or_else(|| format!("nohash-{}", f.name.replace('/', "_")))
}

fn human(b: u64) -> String {
    crate::util::human_bytes(b)
}

/// Download the files of `repo` at `revision` that `want` selects.
pub fn download_repo(
    cfg: &HubConfig,
    kind: RepoKind,
    repo: &str,
    revision: &str,
    want: &dyn Fn(&str) -> bool,
    opts: &DownloadOptions,
) -> Result<Downloaded> {
    let info = repo_info(cfg, kind, repo, revision)?;
    let files: Vec<RepoFile> = info.files.iter().filter(|f| want(&f.name)).cloned().collect();
    if files.is_empty() {
        bail!("{repo}: no files to download at revision {revision}");
    }
    download_files(cfg, kind, repo, revision, &info.commit, &files, opts)
}

pub fn download_files(
    cfg: &HubConfig,
    kind: RepoKind,
    repo: &str,
    revision: &str,
    commit: &str,
    files: &[RepoFile],
    opts: &DownloadOptions,
) -> Result<Downloaded> {
    let repo_dir = cfg.repo_dir(kind, repo);
    let blobs = repo_dir.join("blobs");
    let snapshot = repo_dir.join("snapshots").join(commit);

    // Space first: what is still missing, against what the filesystem has, before any byte is written.
    let mut missing = 0u64;
    for f in files {
        let blob = blobs.join(blob_name(f));
        if blob.exists() {
            continue;
        }
        let partial = std::fs::metadata(blob.with_extension("incomplete")).map(|m| m.len()).unwrap_or(0);
        missing += f.size.unwrap_or(0).saturating_sub(partial);
    }
    let margin = 64 * 1024 * 1024 + missing / 50;
    let free = free_bytes(&cfg.cache_dir)?;
    if missing + margin > free {
        bail!(
            "{repo}: not enough disk space in {}: needs {} (+{} margin), {} available",
            cfg.cache_dir.display(),
            human(missing),
            human(margin),
            human(free)
        );
    }
    std::fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    std::fs::create_dir_all(&snapshot).with_context(|| format!("cannot create {}", snapshot.display()))?;

    let show_bars = !opts.quiet && !opts.json && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if show_bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let total_bytes: u64 = files.iter().filter_map(|f| f.size).sum();
    let total = multi.add(ProgressBar::new(total_bytes));
    total.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    total.set_message(repo.to_string());

    let mut out = vec![];
    for f in files {
        let bar = multi.insert_before(&total, ProgressBar::new(f.size.unwrap_or(0)));
        bar.set_style(
            ProgressStyle::with_template("{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(short(&f.name));
        let (size, cached) = fetch_one(cfg, kind, repo, commit, f, &blobs, &bar, &total, opts)?;
        link_into_snapshot(&snapshot, &f.name, &blobs.join(blob_name(f)))?;
        bar.finish();
        if !opts.quiet && !opts.json && !show_bars {
            eprintln!("{} {} ({})", if cached { "cached    " } else { "downloaded" }, f.name, human(size));
        }
        out.push(DownloadedFile { name: f.name.clone(), size, sha256: f.sha256.clone(), cached });
    }
    total.finish_and_clear();
    if !crate::hub::is_commit(revision) {
        let refs = repo_dir.join("refs");
        std::fs::create_dir_all(&refs)?;
        crate::util::write_atomic(&refs.join(revision), commit.as_bytes())?;
    }
    Ok(Downloaded { repo: repo.to_string(), commit: commit.to_string(), snapshot, files: out })
}

fn short(name: &str) -> String {
    let n: Vec<char> = name.chars().collect();
    if n.len() <= 24 {
        name.to_string()
    } else {
        format!("…{}", n[n.len() - 23..].iter().collect::<String>())
    }
}

/// Make `snapshot/name` point at the blob (relative symlink, as huggingface_hub does).
fn link_into_snapshot(snapshot: &Path, name: &str, blob: &Path) -> Result<()> {
    let link = snapshot.join(name);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let depth = name.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(blob.file_name().expect("blob name"));
    let _ = std::fs::remove_file(&link);
    if std::os::unix::fs::symlink(&target, &link).is_err() {
        std::fs::copy(blob, &link).with_context(|| format!("cannot place {}", link.display()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fetch_one(
    cfg: &HubConfig,
    kind: RepoKind,
    repo: &str,
    commit: &str,
    f: &RepoFile,
    blobs: &Path,
    bar: &ProgressBar,
    total: &ProgressBar,
    opts: &DownloadOptions,
) -> Result<(u64, bool)> {
    let blob = blobs.join(blob_name(f));
    let _lock = FileLock::acquire(&blob.with_extension("lock"))?;
    if let Ok(m) = std::fs::metadata(&blob) {
        if f.size.is_none_or(|s| s == m.len()) {
            bar.set_position(m.len());
            total.inc(m.len());
            return Ok((m.len(), true));
        }
        std::fs::remove_file(&blob)?; // wrong size: fetch again
    }
    let partial = blob.with_extension("incomplete");
    let mut checksum_failures = 0;
    let mut network_failures = 0;
    loop {
        match transfer(cfg, kind, repo, commit, f, &partial, bar, total) {
            Ok(()) => {}
            Err(TransferError::Network(e)) if network_failures < opts.network_retries => {
                network_failures += 1;
                std::thread::sleep(std::time::Duration::from_millis(200 * network_failures as u64));
                if !opts.quiet && !opts.json {
                    eprintln!("{}: {e}; resuming (try {network_failures} of {})", f.name, opts.network_retries);
                }
                continue;
            }
            Err(TransferError::Network(e)) => {
                return Err(e.context(format!(
                    "{repo}: download of {} did not finish after {} tries; the partial file is kept and the next \
                     run resumes it",
                    f.name,
                    network_failures + 1
                )))
            }
            Err(TransferError::Fatal(e)) => return Err(e),
        }
        let len = std::fs::metadata(&partial)?.len();
        if let Some(size) = f.size {
            if len != size {
                let _ = std::fs::remove_file(&partial);
                bail!("{repo}: {} has {len} bytes but the hub lists {size}", f.name);
            }
        }
        if let Some(want) = &f.sha256 {
            let got = sha256_file(&partial)?;
            if &got != want {
                let _ = std::fs::remove_file(&partial);
                checksum_failures += 1;
                if checksum_failures < 2 {
                    bar.set_position(0);
                    continue;
                }
                bail!("{repo}: checksum mismatch for {}: expected sha256 {want}, got {got} (file deleted)", f.name);
            }
        }
        std::fs::rename(&partial, &blob).with_context(|| format!("cannot move {} into place", partial.display()))?;
        return Ok((len, false));
    }
}

enum TransferError {
    /// Worth resuming: the connection broke.
    Network(anyhow::Error),
    Fatal(anyhow::Error),
}

#[allow(clippy::too_many_arguments)]
fn transfer(
    cfg: &HubConfig,
    kind: RepoKind,
    repo: &str,
    commit: &str,
    f: &RepoFile,
    partial: &Path,
    bar: &ProgressBar,
    total: &ProgressBar,
) -> std::result::Result<(), TransferError> {
    let fatal = |e: anyhow::Error| TransferError::Fatal(e);
    let mut have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    if f.size.is_some_and(|s| have > s) {
        have = 0;
    }
    let url = format!("{}/{}{repo}/resolve/{commit}/{}", cfg.endpoint, kind.url_prefix(), f.name);
    let mut req = agent().get(&url);
    if let Some(t) = &cfg.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Transport(t)) if super::transport_timed_out(&t) => {
            return Err(TransferError::Network(anyhow::anyhow!("{}", super::silence(&f.name))))
        }
        Err(ureq::Error::Transport(t)) => return Err(TransferError::Network(anyhow::anyhow!("{t}"))),
        // A server error is usually passing (an overloaded or restarting hub): worth another try.
        Err(e @ ureq::Error::Status(500..=599, _)) => {
            return Err(TransferError::Network(http_error(repo, &f.name, e, cfg.token.is_some())))
        }
        Err(e) => return Err(fatal(http_error(repo, &f.name, e, cfg.token.is_some()))),
    };
    let resumed = resp.status() == 206;
    if !resumed {
        have = 0; // the server sent the whole file
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(!resumed)
        .open(partial)
        .with_context(|| format!("cannot write {}", partial.display()))
        .map_err(fatal)?;
    file.seek(SeekFrom::Start(have)).map_err(|e| fatal(e.into()))?;
    file.set_len(have).map_err(|e| fatal(e.into()))?;
    bar.set_position(have);
    total.inc(have);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.flush();
                let why = if super::is_timeout(&e) { super::silence(&f.name) } else { format!("connection lost: {e}") };
                return Err(TransferError::Network(anyhow::anyhow!("{why}")));
            }
        };
        file.write_all(&buf[..n]).map_err(|e| fatal(anyhow::anyhow!("cannot write {}: {e}", partial.display())))?;
        bar.inc(n as u64);
        total.inc(n as u64);
    }
    file.flush().map_err(|e| fatal(e.into()))?;
    if let Some(size) = f.size {
        let len = file.metadata().map_err(|e| fatal(e.into()))?.len();
        if len < size {
            return Err(TransferError::Network(anyhow::anyhow!("connection closed after {len} of {size} bytes")));
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
