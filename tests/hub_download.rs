//! `billion download` against a local hub on 127.0.0.1 that speaks the endpoints we use (repo listing with
//! sizes and LFS sha256, `resolve/{revision}/{file}` with Range), serving tiny models our code wrote.

mod common;

use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_hf_model};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct HubState {
    repos: HashMap<String, Vec<(String, Vec<u8>)>>,
    gated: HashSet<String>,
    corrupt: HashSet<String>,
    drop_once: HashSet<String>,
    requests: Vec<(String, Option<String>)>,
}

struct LocalHub {
    url: String,
    state: Arc<Mutex<HubState>>,
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

impl LocalHub {
    fn start() -> Self {
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

    fn add_model_dir(&self, repo: &str, dir: &Path) {
        let mut files = vec![];
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            files.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()));
        }
        files.push(("pytorch_model.bin".into(), b"not wanted".to_vec()));
        self.state.lock().unwrap().repos.insert(repo.to_string(), files);
    }

    fn saw_range_for(&self, file: &str) -> bool {
        self.state.lock().unwrap().requests.iter().any(|(p, r)| p.ends_with(file) && r.is_some())
    }

    fn resolve_requests(&self) -> usize {
        self.state.lock().unwrap().requests.iter().filter(|(p, _)| p.contains("/resolve/")).count()
    }
}

fn handle(mut conn: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut auth = false;
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
            auth = true;
        }
    }
    let mut st = state.lock().unwrap();
    st.requests.push((path.clone(), range.map(|r| r.to_string())));
    let (api, rest) = match path.strip_prefix("/api/models/").or_else(|| path.strip_prefix("/api/datasets/")) {
        Some(r) => (true, r.to_string()),
        None => (false, path.trim_start_matches('/').trim_start_matches("datasets/").to_string()),
    };
    let repo: String = rest.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
    if st.gated.contains(&repo) && !auth {
        let _ = conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let Some(files) = st.repos.get(&repo).cloned() else {
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
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
        let body = serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}).to_string();
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        return;
    }
    // {org}/{name}/resolve/{rev}/{file}
    let file = rest.splitn(5, '/').nth(4).unwrap_or("").split('?').next().unwrap_or("").to_string();
    let Some((_, bytes)) = files.iter().find(|(n, _)| *n == file) else {
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let mut body = bytes.clone();
    if st.corrupt.contains(&file) {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let drop_now = st.drop_once.remove(&file);
    drop(st);
    let start = range.unwrap_or(0).min(body.len());
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nAccept-Ranges: bytes\r\n{}Connection: close\r\n\r\n",
        body.len() - start,
        sha256(bytes),
        if range.is_some() { format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len()) } else { String::new() }
    );
    if drop_now {
        let half = (body.len() - start) / 2;
        let _ = conn.write_all(&body[start..start + half]);
        let _ = conn.flush();
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = conn.write_all(&body[start..]);
}

struct Env {
    hub: LocalHub,
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let hub = LocalHub::start();
        let src = tempfile::tempdir().unwrap();
        write_hf_model(src.path(), &tiny_config(Architecture::Llama, 320), 4).unwrap();
        hub.add_model_dir("test-org/tiny-llama", src.path());
        Env { hub, home: tempfile::tempdir().unwrap() }
    }

    fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
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
        c.output().unwrap()
    }

    fn repo_dir(&self) -> PathBuf {
        self.home.path().join("hub").join("models--test-org--tiny-llama")
    }
}

#[test]
fn download_then_generate_by_name_then_offline() {
    let e = Env::new();
    let out = e.run(&["download", "test-org/tiny-llama", "--json"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let names: Vec<&str> = v[0]["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"model.safetensors") && names.contains(&"config.json"));
    assert!(!names.contains(&"pytorch_model.bin"), "only the files loading needs");
    let snap = e.repo_dir().join("snapshots").join(COMMIT);
    assert!(
        std::fs::symlink_metadata(snap.join("model.safetensors")).unwrap().file_type().is_symlink(),
        "HF cache layout"
    );
    assert_eq!(std::fs::read_to_string(e.repo_dir().join("refs/main")).unwrap(), COMMIT);

    let gen = e.run(
        &["generate", "--model", "test-org/tiny-llama", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json"],
        &[],
    );
    assert!(gen.status.success(), "{}", common::stderr(&gen));
    let before = e.hub.resolve_requests();
    let gen = e.run(
        &["generate", "--model", "test-org/tiny-llama", "--prompt-ids", "1,2,3", "--max-tokens", "4"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(gen.status.success(), "offline from cache: {}", common::stderr(&gen));
    assert_eq!(e.hub.resolve_requests(), before, "a complete cache needs no network");

    let list = e.run(&["download", "--list", "--json"], &[]);
    assert!(list.status.success());
    let verify = e.run(&["download", "--verify", "test-org/tiny-llama"], &[]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
    // Damage the blob on disk: --verify must notice.
    let blob = std::fs::canonicalize(snap.join("model.safetensors")).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let verify = e.run(&["download", "--verify", "test-org/tiny-llama"], &[]);
    assert!(!verify.status.success());
    assert!(common::stderr(&verify).contains("MISMATCH"), "{}", common::stderr(&verify));
}

#[test]
fn wrong_bytes_fail_and_leave_nothing() {
    let e = Env::new();
    e.hub.state.lock().unwrap().corrupt.insert("model.safetensors".into());
    let out = e.run(&["download", "test-org/tiny-llama"], &[]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("checksum mismatch for model.safetensors") && err.contains("expected sha256"), "{err}");
    let blobs: Vec<String> = std::fs::read_dir(e.repo_dir().join("blobs"))
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    let big =
        std::fs::read_dir(e.repo_dir().join("blobs")).unwrap().flatten().any(|d| d.metadata().unwrap().len() > 100_000);
    assert!(!big, "the bad file is gone: {blobs:?}");
    assert!(!blobs.iter().any(|n| n.ends_with(".incomplete")), "{blobs:?}");
    let tries = e.hub.state.lock().unwrap().requests.iter().filter(|(p, _)| p.ends_with("model.safetensors")).count();
    assert_eq!(tries, 2, "retried once");
}

#[test]
fn cut_connection_resumes_on_the_next_run() {
    let e = Env::new();
    e.hub.state.lock().unwrap().drop_once.insert("model.safetensors".into());
    let out = e.run(&["download", "test-org/tiny-llama"], &[("BILLION_HUB_RETRIES", "0")]);
    assert!(!out.status.success(), "the first run is cut off");
    assert!(common::stderr(&out).contains("next run resumes"), "{}", common::stderr(&out));
    let out = e.run(&["download", "test-org/tiny-llama"], &[("BILLION_HUB_RETRIES", "0")]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(e.hub.saw_range_for("model.safetensors"), "the second run asked for the rest with Range");
    let verify = e.run(&["download", "--verify", "test-org/tiny-llama"], &[]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
}

#[test]
fn concurrent_runs_do_not_corrupt() {
    let e = Env::new();
    let a = {
        let mut c = Command::new(env!("CARGO_BIN_EXE_billion"));
        c.args(["download", "test-org/tiny-llama"]).env("HF_ENDPOINT", &e.hub.url).env("HF_HOME", e.home.path());
        c.spawn().unwrap()
    };
    let b = e.run(&["download", "test-org/tiny-llama"], &[]);
    let a = a.wait_with_output().unwrap();
    assert!(a.status.success() && b.status.success());
    let verify = e.run(&["download", "--verify", "test-org/tiny-llama"], &[]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
}

#[test]
fn refuses_without_disk_space_before_downloading() {
    let e = Env::new();
    let out = e.run(&["download", "test-org/tiny-llama"], &[("BILLION_HUB_FREE_BYTES", "1000")]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("not enough disk space") && err.contains("available"), "{err}");
    assert_eq!(e.hub.resolve_requests(), 0, "no file was requested");
    assert!(!e.repo_dir().join("blobs").exists(), "nothing written");
}

#[test]
fn gated_repo_asks_for_a_token() {
    let e = Env::new();
    e.hub.state.lock().unwrap().gated.insert("test-org/tiny-llama".into());
    let out = e.run(&["download", "test-org/tiny-llama"], &[]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("HF_TOKEN") && err.contains("license"), "{err}");
}

#[test]
fn offline_with_a_missing_file_names_it() {
    let e = Env::new();
    let out = e.run(&["download", "test-org/tiny-llama"], &[]);
    assert!(out.status.success());
    let snap = e.repo_dir().join("snapshots").join(COMMIT);
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let out = e.run(&["generate", "--model", "test-org/tiny-llama", "--prompt-ids", "1"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("test-org/tiny-llama") && err.contains("HF_HUB_OFFLINE") && err.contains("model.safetensors"),
        "{err}"
    );
    let out = e.run(&["download", "test-org/tiny-llama"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("HF_HUB_OFFLINE"));
}

#[test]
fn gguf_quantization_and_datasets() {
    let e = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama, 320);
    billion::testing::write_llama_gguf(
        &dir.path().join("tiny.Q8_0.gguf"),
        &cfg,
        1,
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    billion::testing::write_llama_gguf(
        &dir.path().join("tiny.Q4_0.gguf"),
        &cfg,
        1,
        candle_core::quantized::GgmlDType::Q4_0,
    )
    .unwrap();
    e.hub.add_model_dir("test-org/tiny-gguf", dir.path());
    let out = e.run(&["download", "test-org/tiny-gguf", "--gguf", "q4_0", "--json"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(v[0]["files"].as_array().unwrap().len(), 1);
    assert_eq!(v[0]["files"][0]["name"], "tiny.Q4_0.gguf");
    let gguf = format!("{}/tiny.Q4_0.gguf", v[0]["path"].as_str().unwrap());
    let gen = e.run(&["generate", "--model", &gguf, "--prompt-ids", "1,2", "--max-tokens", "3"], &[]);
    assert!(gen.status.success(), "{}", common::stderr(&gen));
    let out = e.run(&["download", "test-org/tiny-gguf", "--gguf", "q5_k"], &[]);
    assert!(common::stderr(&out).contains("no GGUF file matching q5_k"), "{}", common::stderr(&out));

    e.hub.state.lock().unwrap().repos.insert(
        "openai/openai_humaneval".into(),
        vec![
            ("openai_humaneval/test-00000-of-00001.parquet".into(), b"PAR1 data".to_vec()),
            ("README.md".into(), b"# card".to_vec()),
        ],
    );
    let out = e.run(&["download", "--dataset", "humaneval", "--json"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(v[0]["files"][0]["name"], "openai_humaneval/test-00000-of-00001.parquet");
    assert!(e.home.path().join("hub/datasets--openai--openai_humaneval/snapshots").exists());
}

fn write_parquet(path: &Path, schema: &str, columns: Vec<ParquetColumn>) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(path).unwrap(),
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    for c in columns {
        let mut col = rg.next_column().unwrap().unwrap();
        match c {
            ParquetColumn::Strings(v) => {
                let vals: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                col.typed::<ByteArrayType>().write_batch(&vals, None, None).unwrap();
            }
            ParquetColumn::Lists(v) => {
                let vals: Vec<ByteArray> = v.iter().flatten().map(|s| ByteArray::from(s.as_str())).collect();
                let def: Vec<i16> = vec![1; vals.len()];
                let rep: Vec<i16> = v.iter().flat_map(|l| (0..l.len()).map(|i| if i == 0 { 0 } else { 1 })).collect();
                col.typed::<ByteArrayType>().write_batch(&vals, Some(&def), Some(&rep)).unwrap();
            }
            ParquetColumn::Ints(v) => {
                col.typed::<Int64Type>().write_batch(&v, None, None).unwrap();
            }
        }
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

enum ParquetColumn {
    Strings(Vec<String>),
    Lists(Vec<Vec<String>>),
    Ints(Vec<i64>),
}

const MMLU_SCHEMA: &str = "message schema { REQUIRED BINARY question (UTF8); REQUIRED BINARY subject (UTF8);
    REQUIRED group choices (LIST) { REPEATED group list { REQUIRED BINARY element (UTF8); } } REQUIRED INT64 answer; }";

fn mmlu_parquet(path: &Path, n: usize) {
    let q: Vec<String> = (0..n).map(|i| format!("What is {i} + {i}?")).collect();
    let subj: Vec<String> = (0..n).map(|i| if i % 2 == 0 { "anatomy".into() } else { "virology".into() }).collect();
    let choices: Vec<Vec<String>> = (0..n).map(|i| (0..4).map(|c| format!("{}", 2 * i + c)).collect()).collect();
    write_parquet(
        path,
        MMLU_SCHEMA,
        vec![
            ParquetColumn::Strings(q),
            ParquetColumn::Strings(subj),
            ParquetColumn::Lists(choices),
            ParquetColumn::Ints((0..n as i64).map(|i| i % 4).collect()),
        ],
    );
}

#[test]
fn bench_datasets_come_from_the_hub() {
    let e = Env::new();
    let dir = tempfile::tempdir().unwrap();
    mmlu_parquet(&dir.path().join("dev.parquet"), 10);
    mmlu_parquet(&dir.path().join("test.parquet"), 6);
    let p = |s: &str| vec![s.to_string()];
    write_parquet(
        &dir.path().join("he.parquet"),
        "message schema { REQUIRED BINARY task_id (UTF8); REQUIRED BINARY prompt (UTF8); REQUIRED BINARY canonical_solution (UTF8); REQUIRED BINARY test (UTF8); REQUIRED BINARY entry_point (UTF8); }",
        vec![
            ParquetColumn::Strings(p("HumanEval/0")),
            ParquetColumn::Strings(p("def add(a, b):\n")),
            ParquetColumn::Strings(p("    return a + b\n")),
            ParquetColumn::Strings(p("def check(candidate):\n    assert candidate(1, 2) == 3\n")),
            ParquetColumn::Strings(p("add")),
        ],
    );
    {
        let mut st = e.hub.state.lock().unwrap();
        let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
        st.repos.insert(
            "cais/mmlu".into(),
            vec![
                ("all/dev-00000-of-00001.parquet".into(), read("dev.parquet")),
                ("all/test-00000-of-00001.parquet".into(), read("test.parquet")),
                ("all/auxiliary_train-00000-of-00001.parquet".into(), b"big and unwanted".to_vec()),
            ],
        );
        st.repos.insert(
            "openai/openai_humaneval".into(),
            vec![("openai_humaneval/test-00000-of-00001.parquet".into(), read("he.parquet"))],
        );
    }
    let model = dir.path().join("tiny.gguf");
    let cfg = tiny_config(Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&model, &cfg, 1, candle_core::quantized::GgmlDType::F32).unwrap();
    let results = dir.path().join("results");
    let out = e.run(
        &[
            "bench",
            "--models",
            model.to_str().unwrap(),
            "--mmlu",
            "--humaneval",
            "--shots",
            "2",
            "--max-tokens",
            "8",
            "--results-dir",
            results.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let m = &v["models"][0];
    assert_eq!(m["mmlu"]["questions"], 6, "both subjects' test rows");
    assert_eq!(m["mmlu"]["subjects"].as_array().unwrap().len(), 2);
    assert_eq!(m["humaneval"]["problems"], 1);
    assert!(!e.state_requested("auxiliary_train"), "only the splits bench uses are fetched");
    // A second run reads the cache without the network.
    let out = e.run(
        &[
            "bench",
            "--models",
            model.to_str().unwrap(),
            "--mmlu",
            "--shots",
            "2",
            "--results-dir",
            results.to_str().unwrap(),
        ],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = e.run(&["bench", "--humaneval-selfcheck"], &[]);
    assert!(common::stdout(&out).contains("1/1"), "{}", common::stdout(&out));
}

impl Env {
    fn state_requested(&self, needle: &str) -> bool {
        self.hub.state.lock().unwrap().requests.iter().any(|(p, _)| p.contains(needle) && p.contains("/resolve/"))
    }
}
