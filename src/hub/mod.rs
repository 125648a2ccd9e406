//! The Hugging Face Hub: repo listings, verified and resumable downloads into the standard HF cache layout
//! (`models--org--name/{blobs,snapshots,refs}`), shared with Python tools, and name → local folder resolution.
//!
//! Environment: HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE (as huggingface_hub reads them).

pub mod download;
pub mod registry;

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn cache_prefix(&self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    fn api_segment(&self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    fn url_prefix(&self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
    pub cache_dir: PathBuf,
    pub offline: bool,
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

impl HubConfig {
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hf_home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let home = env("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            env("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache")).join("huggingface")
        });
        let cache_dir = env("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let token = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            std::fs::read_to_string(hf_home.join("token")).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .into(),
            token,
            cache_dir,
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
        }
    }

    /// `models--org--name` under the cache.
    pub fn repo_dir(&self, kind: RepoKind, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("{}--{}", kind.cache_prefix(), repo.replace('/', "--")))
    }

    /// The snapshot folder a revision points to in the cache, if the ref (or commit) is known locally.
    pub fn cached_snapshot(&self, kind: RepoKind, repo: &str, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(kind, repo);
        let commit = if is_commit(revision) {
            revision.to_string()
        } else {
            std::fs::read_to_string(dir.join("refs").join(revision)).ok()?.trim().to_string()
        };
        let snap = dir.join("snapshots").join(commit);
        snap.is_dir().then_some(snap)
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// One file of a repo as the hub lists it.
#[derive(Debug, Clone)]
pub struct RepoFile {
    pub name: String,
    pub size: Option<u64>,
    /// sha256 of LFS files (also their blob name in the cache).
    pub sha256: Option<String>,
    /// git blob id (the cache's blob name for small, non-LFS files).
    pub blob_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RepoInfo {
    pub commit: String,
    pub files: Vec<RepoFile>,
}

/// Seconds the hub may stay silent (no connection, no byte) before a request fails: `BILLION_HUB_TIMEOUT_S`,
/// 60 by default. A stalled download is then resumed like a cut one.
pub fn timeout() -> std::time::Duration {
    let secs = std::env::var("BILLION_HUB_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(60.0);
    std::time::Duration::from_secs_f64(secs)
}

pub(crate) fn agent() -> ureq::Agent {
    let limit = timeout();
    ureq::AgentBuilder::new().timeout_connect(limit).timeout_read(limit).redirects(8).build()
}

/// Is this I/O error the read timeout firing (the hub went silent)?
pub(crate) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

/// What to say when the hub went silent for the whole timeout.
pub(crate) fn silence(what: &str) -> String {
    format!(
        "the hub sent nothing for {:.0} s while sending {what} (timeout set by BILLION_HUB_TIMEOUT_S)",
        timeout().as_secs_f64()
    )
}

pub(crate) fn http_error(repo: &str, what: &str, err: ureq::Error, has_token: bool) -> anyhow::Error {
    match err {
        ureq::Error::Status(401, _) | ureq::Error::Status(403, _) => {
            let token = if has_token { "HF_TOKEN is set but was refused" } else { "HF_TOKEN is not set" };
            anyhow::anyhow!(
                "{repo}: access denied to {what}: the repo is gated or private; accept its license on the hub and set \
                 HF_TOKEN to a token with access ({token})"
            )
        }
        ureq::Error::Status(404, _) => {
            anyhow::anyhow!("{repo}: {what} not found on the hub (check the name and --revision)")
        }
        ureq::Error::Status(code, _) => anyhow::anyhow!("{repo}: the hub answered HTTP {code} for {what}"),
        ureq::Error::Transport(t) if transport_timed_out(&t) => anyhow::anyhow!("{repo}: {}", silence(what)),
        ureq::Error::Transport(t) => anyhow::anyhow!(
            "{repo}: cannot reach the hub for {what}: {t} (set HF_HUB_OFFLINE=1 to use only the local cache)"
        ),
    }
}

pub(crate) fn transport_timed_out(t: &ureq::Transport) -> bool {
    std::error::Error::source(t).and_then(|e| e.downcast_ref::<std::io::Error>()).is_some_and(is_timeout)
}

/// List a repo's files with sizes and checksums at a revision.
pub fn repo_info(cfg: &HubConfig, kind: RepoKind, repo: &str, revision: &str) -> Result<RepoInfo> {
    if cfg.offline {
        bail!("{repo}: HF_HUB_OFFLINE is set, so the hub cannot be asked for its file list");
    }
    let url = format!("{}/api/{}/{repo}/revision/{revision}?blobs=true", cfg.endpoint, kind.api_segment());
    let mut req = agent().get(&url);
    if let Some(t) = &cfg.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| http_error(repo, "the repo listing", e, cfg.token.is_some()))?;
    let mut body = String::new();
    if let Err(e) = resp.into_reader().take(64 << 20).read_to_string(&mut body) {
        if is_timeout(&e) {
            bail!("{repo}: {}", silence("the repo listing"));
        }
        bail!("{repo}: the connection broke while reading the repo listing: {e}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{repo}: the hub's repo listing is not JSON"))?;
    let commit = v.get("sha").and_then(|s| s.as_str()).unwrap_or(revision).to_string();
    let files = v
        .get("siblings")
        .and_then(|s| s.as_array())
        .with_context(|| format!("{repo}: the hub's repo listing has no files"))?
        .iter()
        .filter_map(|s| {
            let name = s.get("rfilename")?.as_str()?.to_string();
            let lfs = s.get("lfs");
            Some(RepoFile {
                name,
                size: s.get("size").and_then(|x| x.as_u64()).or_else(|| lfs?.get("size")?.as_u64()),
                sha256: lfs.and_then(|l| l.get("sha256")).and_then(|x| x.as_str()).map(String::from),
                blob_id: s.get("blobId").and_then(|x| x.as_str()).map(String::from),
            })
        })
        .collect();
    Ok(RepoInfo { commit, files })
}

/// Is this name something to look up on the hub (an alias or `org/name`) rather than a local path?
pub fn is_hub_name(name: &str) -> bool {
    !Path::new(name).exists() && registry::repo_id(name).is_some()
}

/// A model folder for `name`: from the cache when complete (no network), else downloaded.
pub fn resolve_model(name: &str, revision: &str) -> Result<PathBuf> {
    let repo = registry::repo_id(name).with_context(|| format!("{name}: not a known alias or org/name repo id"))?;
    let cfg = HubConfig::from_env();
    let snap = cfg.cached_snapshot(RepoKind::Model, &repo, revision);
    let missing = match &snap {
        Some(s) => download::snapshot_missing(s),
        None => Some("every file (nothing cached)".into()),
    };
    match (snap, missing) {
        (Some(s), None) => return Ok(s),
        (_, Some(m)) if cfg.offline => bail!(
            "{name}: {repo} lacks {m} in the cache at {} and HF_HUB_OFFLINE is set",
            cfg.repo_dir(RepoKind::Model, &repo).display()
        ),
        _ => {}
    }
    let opts = download::DownloadOptions { quiet: false, json: false, ..Default::default() };
    let done = download::download_repo(&cfg, RepoKind::Model, &repo, revision, &registry::wanted_model_file, &opts)?;
    Ok(done.snapshot)
}
