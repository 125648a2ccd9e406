//! Bad input through the real binary: one clear line naming the file or flag, non-zero exit, no panic.

mod common;

use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_hf_model};
use std::path::Path;

fn expect_error(args: &[&str], must_contain: &[&str]) {
    let out = common::billion(args);
    let err = common::stderr(&out);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {err}"));
    for s in must_contain {
        assert!(line.contains(s), "error for {args:?} should mention {s:?}: {line}");
    }
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "one error line: {err}");
}

fn tiny(dir: &Path) {
    write_hf_model(dir, &tiny_config(Architecture::Llama, 320), 1).unwrap();
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let st = d.path().join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    f.set_len(len / 2).unwrap();
    expect_error(
        &["generate", "--model", d.path().to_str().unwrap(), "--prompt-ids", "1,2"],
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn missing_config_json() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    expect_error(
        &["generate", "--model", d.path().to_str().unwrap(), "--prompt-ids", "1"],
        &["config.json", "--model"],
    );
}

#[test]
fn bad_gguf_magic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("model.gguf");
    std::fs::write(&p, b"NOPE this is not a gguf file at all").unwrap();
    expect_error(
        &["generate", "--model", p.to_str().unwrap(), "--prompt-ids", "1"],
        &["model.gguf", "not a GGUF file"],
    );
}

#[test]
fn unknown_architecture() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let mut cfg = tiny_config(Architecture::Llama, 320);
    cfg["architectures"] = serde_json::json!(["MambaForCausalLM"]);
    cfg["model_type"] = "mamba".into();
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    expect_error(
        &["generate", "--model", d.path().to_str().unwrap(), "--prompt-ids", "1"],
        &["config.json", "MambaForCausalLM", "LlamaForCausalLM", "GPTNeoXForCausalLM"],
    );
}

#[test]
fn prompt_ids_out_of_vocabulary() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    expect_error(
        &["generate", "--model", d.path().to_str().unwrap(), "--prompt-ids", "1,320"],
        &["--prompt-ids", "320", "out of range"],
    );
    expect_error(&["generate", "--model", d.path().to_str().unwrap(), "--prompt-ids", "1,x"], &["--prompt-ids", "`x`"]);
}

#[test]
fn prompt_longer_than_context() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path()); // context window 256
    let ids: Vec<String> = (0..300).map(|i| (i % 300 + 3).to_string()).collect();
    let ids = ids.join(",");
    let m = d.path().to_str().unwrap();
    expect_error(
        &["generate", "--model", m, "--prompt-ids", &ids],
        &["300 tokens", "context window", "--truncate-prompt"],
    );
    let out = common::billion(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        &ids,
        "--truncate-prompt",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stderr(&out).contains("truncated"), "says it truncated");
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    // The last 256 - 4 prompt tokens: room is left for the 4 new ones.
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 252);
}

#[test]
fn missing_model_and_bad_flags() {
    expect_error(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"], &["--model", "/nonexistent/model"]);
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let m = d.path().to_str().unwrap();
    expect_error(&["generate", "--model", m, "--prompt-ids", "1", "--device", "tpu"], &["--device", "tpu"]);
    expect_error(&["generate", "--model", m, "--prompt-ids", "1", "--dtype", "f8"], &["--dtype", "f8"]);
    expect_error(&["generate", "--model", m, "--prompt-ids", "1", "--quantize", "q3"], &["--quantize", "q3"]);
    expect_error(&["generate", "--model", m, "--prompt", "hello"], &["tokenizer", "--prompt-ids"]);
}

#[test]
fn finetune_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    billion::testing::write_chat_model(&m, 1).unwrap();
    let model = m.to_str().unwrap();
    let data = d.path().join("data.jsonl");
    let run = |extra: &[&str], must: &[&str]| {
        let mut args = vec!["finetune", "--model", model, "--out"];
        let out = d.path().join("out");
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        expect_error(&args, must);
    };
    run(&["--data", "/no/such.jsonl"], &["--data", "/no/such.jsonl"]);
    std::fs::write(&data, "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\": 3}\n").unwrap();
    run(&["--data", data.to_str().unwrap()], &["data.jsonl:2"]);
    std::fs::write(&data, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n").unwrap();
    run(&["--data", data.to_str().unwrap()], &["data.jsonl:1", "assistant"]);
    run(&["--targets", "w_proj"], &["--targets", "w_proj", "q_proj"]);
    run(&["--rank", "0"], &["--rank"]);
    run(&["--lr=-1"], &["--lr"]);
    run(&["--dropout", "1.5"], &["--dropout"]);
    run(&["--lr-schedule", "cosine"], &["--lr-schedule"]);
    run(&["--resume", d.path().to_str().unwrap()], &["--resume", "incomplete checkpoint"]);
    let cfg = d.path().join("m").join("config.json");
    expect_error(
        &["finetune", "--model", cfg.to_str().unwrap(), "--random-weights", "--merge"],
        &["--merge", "--random-weights"],
    );
    expect_error(
        &["generate", "--model", model, "--adapter", "/no/adapter", "--prompt", "hi"],
        &["--adapter", "/no/adapter"],
    );
}
