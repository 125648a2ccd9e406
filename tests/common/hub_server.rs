//! A local Hugging Face Hub on 127.0.0.1 for end-to-end tests: the repo listing (sizes, LFS sha256, the commit
//! of a revision) and `resolve/{commit}/{file}` with Range, serving files our code wrote, plus the faults a real
//! hub or network shows: a cut connection, a server error, wrong bytes, silence after the headers, slow sending.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The commit every repo's `main` resolves to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub type Files = Vec<(String, Vec<u8>)>;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    /// The first byte asked for with `Range: bytes=N-`.
    pub range: Option<usize>,
    pub authorization: Option<String>,
}

#[derive(Default)]
pub struct HubState {
    /// Files of each repo at `main` (commit [`COMMIT`]).
    pub repos: HashMap<String, Files>,
    /// Other revisions: (repo, branch or tag) → (commit, files).
    pub revisions: HashMap<(String, String), (String, Files)>,
    /// Repos that answer 401 without an Authorization header.
    pub gated: HashSet<String>,
    /// Files sent with one byte flipped (their listed sha256 stays that of the right bytes).
    pub corrupt: HashSet<String>,
    /// Files whose next transfer stops after half the bytes.
    pub drop_once: HashSet<String>,
    /// Files answered with this HTTP status, for this many more requests.
    pub fail_status: HashMap<String, (u16, usize)>,
    /// Files answered with headers and then silence.
    pub stall: HashSet<String>,
    /// Files sent in chunks of this many bytes with this pause between them.
    pub slow: HashMap<String, (usize, Duration)>,
    pub requests: Vec<Request>,
}

pub struct LocalHub {
    pub url: String,
    pub state: Arc<Mutex<HubState>>,
}

pub fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

impl LocalHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || handle(conn, &s));
            }
        });
        LocalHub { url, state }
    }

    /// Serve the files of `dir` as `repo` at `main`, plus one file that downloads must not fetch.
    pub fn add_model_dir(&self, repo: &str, dir: &Path) {
        let mut files = read_dir_files(dir);
        files.push(("pytorch_model.bin".into(), b"not wanted".to_vec()));
        self.state.lock().unwrap().repos.insert(repo.to_string(), files);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn saw_range_for(&self, file: &str) -> bool {
        self.requests().iter().any(|r| r.path.ends_with(file) && r.range.is_some())
    }

    pub fn resolve_requests(&self) -> usize {
        self.requests().iter().filter(|r| r.path.contains("/resolve/")).count()
    }

    pub fn requests_for(&self, file: &str) -> usize {
        self.requests().iter().filter(|r| r.path.contains("/resolve/") && r.path.ends_with(file)).count()
    }
}

pub fn read_dir_files(dir: &Path) -> Files {
    let mut files = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        files.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()));
    }
    files.sort();
    files
}

fn respond_empty(conn: &mut TcpStream, status: &str) {
    let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

fn handle(mut conn: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse::<usize>().ok();
        }
        if lower.starts_with("authorization:") {
            authorization = Some(h["authorization:".len()..].trim().to_string());
        }
    }
    let mut st = state.lock().unwrap();
    st.requests.push(Request { path: path.clone(), range, authorization: authorization.clone() });
    let (api, rest) = match path.strip_prefix("/api/models/").or_else(|| path.strip_prefix("/api/datasets/")) {
        Some(r) => (true, r.to_string()),
        None => (false, path.trim_start_matches('/').trim_start_matches("datasets/").to_string()),
    };
    let rest = rest.split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    let repo = parts.iter().take(2).copied().collect::<Vec<_>>().join("/");
    if st.gated.contains(&repo) && authorization.is_none() {
        return respond_empty(&mut conn, "401 Unauthorized");
    }
    // `{org}/{name}/revision/{rev}` for listings, `{org}/{name}/resolve/{commit}/{file}` for files.
    let rev = parts.get(3).copied().unwrap_or("main").to_string();
    let found = if api {
        st.revisions.get(&(repo.clone(), rev.clone())).cloned()
    } else {
        st.revisions.iter().find(|((r, _), (c, _))| *r == repo && *c == rev).map(|(_, v)| v.clone())
    };
    let Some((commit, files)) = found.or_else(|| st.repos.get(&repo).map(|f| (COMMIT.to_string(), f.clone()))) else {
        return respond_empty(&mut conn, "404 Not Found");
    };
    if api {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(n, b)| {
                if n.ends_with(".safetensors") || n.ends_with(".gguf") {
                    serde_json::json!({"rfilename": n, "size": b.len(), "blobId": format!("{:040x}", b.len()),
                        "lfs": {"sha256": sha256(b), "size": b.len(), "pointerSize": 134}})
                } else {
                    serde_json::json!({"rfilename": n, "size": b.len(), "blobId": sha256(b)[..40].to_string()})
                }
            })
            .collect();
        let body = serde_json::json!({"id": repo, "sha": commit, "siblings": siblings}).to_string();
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let file = parts.get(4).copied().unwrap_or("").to_string();
    let Some((_, bytes)) = files.iter().find(|(n, _)| *n == file) else {
        return respond_empty(&mut conn, "404 Not Found");
    };
    if let Some((code, left)) = st.fail_status.get_mut(&file) {
        if *left > 0 {
            *left -= 1;
            let code = *code;
            drop(st);
            return respond_empty(&mut conn, &format!("{code} Server Trouble"));
        }
    }
    let mut body = bytes.clone();
    if st.corrupt.contains(&file) {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let drop_now = st.drop_once.remove(&file);
    let stall = st.stall.contains(&file);
    let slow = st.slow.get(&file).copied();
    drop(st);
    let start = range.unwrap_or(0).min(body.len());
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    let content_range = if range.is_some() {
        format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len())
    } else {
        String::new()
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{}\"\r\nX-Repo-Commit: {commit}\r\nAccept-Ranges: bytes\r\n\
         {content_range}Connection: close\r\n\r\n",
        body.len() - start,
        sha256(bytes),
    );
    let _ = conn.flush();
    if stall {
        // Headers sent, then nothing: the client's read timeout must end the wait.
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    if drop_now {
        let half = (body.len() - start) / 2;
        let _ = conn.write_all(&body[start..start + half]);
        let _ = conn.flush();
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return;
    }
    match slow {
        Some((chunk, pause)) => {
            for piece in body[start..].chunks(chunk.max(1)) {
                if conn.write_all(piece).and_then(|_| conn.flush()).is_err() {
                    return;
                }
                std::thread::sleep(pause);
            }
        }
        None => {
            let _ = conn.write_all(&body[start..]);
        }
    }
}

/// A local hub serving a tiny llama as `test-org/tiny-llama`, and an empty HF_HOME to download into.
pub struct HubEnv {
    pub hub: LocalHub,
    pub home: tempfile::TempDir,
}

pub const TINY_REPO: &str = "test-org/tiny-llama";

impl HubEnv {
    pub fn new() -> Self {
        let hub = LocalHub::start();
        let src = tempfile::tempdir().unwrap();
        let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
        billion::testing::write_hf_model(src.path(), &cfg, 4).unwrap();
        hub.add_model_dir(TINY_REPO, src.path());
        HubEnv { hub, home: tempfile::tempdir().unwrap() }
    }

    /// `billion ARGS` against this hub and cache, without any token or cache setting of the caller's.
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_billion"));
        c.args(args)
            .env("HF_ENDPOINT", &self.hub.url)
            .env("HF_HOME", self.home.path())
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HUGGING_FACE_HUB_TOKEN");
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.command(args, extra).output().unwrap()
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.home.path().join("hub").join(format!("models--{}", TINY_REPO.replace('/', "--")))
    }

    pub fn snapshot(&self) -> PathBuf {
        self.repo_dir().join("snapshots").join(COMMIT)
    }

    /// Names in the repo's blobs folder, lock files left out.
    pub fn blobs(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.repo_dir().join("blobs")) else { return vec![] };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        names.sort();
        names
    }

    /// The bytes the hub serves for `file` of the tiny repo.
    pub fn served(&self, file: &str) -> Vec<u8> {
        let st = self.hub.state.lock().unwrap();
        st.repos[TINY_REPO].iter().find(|(n, _)| n == file).unwrap().1.clone()
    }
}
