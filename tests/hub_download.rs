//! `billion download` against a local hub on 127.0.0.1 that speaks the endpoints we use (repo listing with
//! sizes and LFS sha256, `resolve/{revision}/{file}` with Range), serving tiny models our code wrote. Faults
//! (cut, stalled, failing downloads, full disks, kills) are in tests/faults.rs.

mod common;
#[path = "common/hub_server.rs"]
mod hub_server;

use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_hf_model};
use hub_server::{read_dir_files, HubEnv as Env, COMMIT};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

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
    assert!(!requested(&e, "auxiliary_train"), "only the splits bench uses are fetched");
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

fn requested(e: &Env, needle: &str) -> bool {
    e.hub.requests().iter().any(|r| r.path.contains(needle) && r.path.contains("/resolve/"))
}

#[test]
fn revision_fetches_that_revision() {
    let e = Env::new();
    let old_commit = "fedcba9876543210fedcba9876543210fedcba98";
    let old = tempfile::tempdir().unwrap();
    write_hf_model(old.path(), &tiny_config(Architecture::Llama, 320), 7).unwrap();
    e.hub
        .state
        .lock()
        .unwrap()
        .revisions
        .insert(("test-org/tiny-llama".into(), "v1".into()), (old_commit.into(), read_dir_files(old.path())));
    let out = e.run(&["download", "test-org/tiny-llama", "--revision", "v1", "--json"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(v[0]["commit"], old_commit);
    let snap = e.repo_dir().join("snapshots").join(old_commit);
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(old.path().join("model.safetensors")).unwrap(),
        "the v1 weights, not main's"
    );
    assert_eq!(std::fs::read_to_string(e.repo_dir().join("refs/v1")).unwrap(), old_commit);
    assert!(!e.repo_dir().join("refs/main").exists(), "main was not touched");
    let asked: Vec<String> = e.hub.requests().into_iter().map(|r| r.path).collect();
    assert!(asked.iter().any(|p| p.contains("/revision/v1")), "{asked:?}");
    assert!(asked.iter().filter(|p| p.contains("/resolve/")).all(|p| p.contains(old_commit)), "{asked:?}");
    // Generating from the v1 snapshot by name and revision uses the cache only.
    let verify = e.run(&["download", "--verify", "test-org/tiny-llama", "--revision", "v1"], &[]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
}

#[test]
fn hf_token_is_sent_with_every_request() {
    let e = Env::new();
    e.hub.state.lock().unwrap().gated.insert("test-org/tiny-llama".into());
    let out = e.run(&["download", "test-org/tiny-llama"], &[("HF_TOKEN", "hf_test_secret")]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let requests = e.hub.requests();
    assert!(requests.len() >= 3, "a listing and the files: {requests:?}");
    for r in &requests {
        assert_eq!(r.authorization.as_deref(), Some("Bearer hf_test_secret"), "{}", r.path);
    }
    assert!(!common::stderr(&out).contains("hf_test_secret"), "the token is never printed");
    // A token from HF_HOME/token (what `huggingface-cli login` writes) is sent as well.
    let e = Env::new();
    std::fs::write(e.home.path().join("token"), "hf_from_file\n").unwrap();
    let out = e.run(&["download", "test-org/tiny-llama"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(e.hub.requests().iter().all(|r| r.authorization.as_deref() == Some("Bearer hf_from_file")));
}

#[test]
fn list_with_gguf_shows_that_quantization() {
    let e = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(Architecture::Llama, 320);
    for (name, dtype) in [
        ("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf", candle_core::quantized::GgmlDType::Q4_0),
        ("tinyllama-1.1b-chat-v1.0.Q8_0.gguf", candle_core::quantized::GgmlDType::Q8_0),
    ] {
        billion::testing::write_llama_gguf(&dir.path().join(name), &cfg, 1, dtype).unwrap();
    }
    // The usual GGUF repo of the `tinyllama` alias, served locally.
    e.hub
        .state
        .lock()
        .unwrap()
        .repos
        .insert("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF".into(), read_dir_files(dir.path()));
    let out = e.run(&["download", "tinyllama", "--gguf", "Q4_K_M"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    let list = |quant: &str| -> serde_json::Value {
        let out = e.run(&["download", "--list", "--gguf", quant, "--json"], &[]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let rows: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
        rows.as_array().unwrap().iter().find(|r| r["alias"] == "tinyllama").cloned().unwrap()
    };
    let row = list("Q4_K_M");
    assert_eq!(row["repo"], "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF");
    assert_eq!(row["quantization"], "Q4_K_M");
    assert_eq!(row["downloaded"], true, "{row}");
    assert!(row["path"].as_str().unwrap().ends_with("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"), "{row}");
    let size = std::fs::metadata(dir.path().join("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf")).unwrap().len();
    assert_eq!(row["size_on_disk"], size);
    assert_eq!(list("q8_0")["downloaded"], false, "Q8_0 was not downloaded");
    // Without --gguf the list is about the safetensors repos: tinyllama's is not downloaded.
    let out = e.run(&["download", "--list", "--json"], &[]);
    let rows: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let plain = rows.as_array().unwrap().iter().find(|r| r["alias"] == "tinyllama").unwrap();
    assert_eq!(plain["downloaded"], false);
    let table = common::stdout(&e.run(&["download", "--list", "--gguf", "Q4_K_M"], &[]));
    assert!(table.lines().any(|l| l.starts_with("tinyllama") && l.contains("yes")), "{table}");
}
