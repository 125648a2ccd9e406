//! `billion generate --prompts FILE.jsonl`: many prompts through the batched generator, end to end. Each row
//! must be what `generate --json` gives for that prompt alone, written in input order with its id and line.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

/// A tiny llama with the byte-level test tokenizer (one token per byte, context window 256).
fn chat_model(dir: &Path, seed: u64) -> String {
    billion::testing::write_chat_model(dir, seed).unwrap();
    dir.to_str().unwrap().to_string()
}

fn write_lines(path: &Path, lines: &[String]) -> String {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_str().unwrap().to_string()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

/// `generate --json` for one prompt alone.
fn alone(model: &str, prompt: &str, max_tokens: usize, extra: &[&str]) -> Value {
    let max = max_tokens.to_string();
    let mut args = vec!["generate", "--model", model, "--prompt", prompt, "--max-tokens", &max, "--json"];
    args.extend(["--device", "cpu"]);
    args.extend(extra);
    let out = common::billion(&args);
    assert!(out.status.success(), "{}", common::stderr(&out));
    serde_json::from_str(&common::stdout(&out)).unwrap()
}

fn batch(model: &str, file: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["generate", "--model", model, "--prompts", file, "--device", "cpu"];
    args.extend(extra);
    common::billion(&args)
}

#[test]
fn every_row_matches_its_prompt_alone_in_input_order() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 7);
    // Prompts of different lengths, more of them than --batch (rows are refilled), their own limits, and a
    // blank line that is skipped but still counted in the line numbers.
    let rows = [
        json!({"id": "first", "prompt": "Hi", "max_tokens": 9}),
        json!({"id": 2, "prompt": "The quick brown fox jumps over the lazy dog, then naps."}),
        json!({"prompt": "a"}),
        json!({"id": {"k": [1, 2]}, "prompt": "Once upon a time", "max_tokens": 3}),
        json!({"id": "fifth", "prompt": "0123456789 abcdefghij", "max_tokens": 12}),
        json!({"id": null, "prompt": "zz", "max_tokens": 1}),
    ];
    let mut lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    lines.insert(2, String::new());
    let file = write_lines(&d.path().join("prompts.jsonl"), &lines);
    let out = batch(&model, &file, &["--batch", "2", "--max-tokens", "6"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let got = json_lines(&common::stdout(&out));
    assert_eq!(got.len(), rows.len(), "one line per prompt");
    let line_numbers: Vec<u64> = got.iter().map(|v| v["line"].as_u64().unwrap()).collect();
    assert_eq!(line_numbers, [1, 2, 4, 5, 6, 7], "input order, blank line counted");
    for (row, v) in rows.iter().zip(&got) {
        assert_eq!(v["id"], row.get("id").cloned().unwrap_or(Value::Null), "id echoed: {v}");
        let max_tokens = row["max_tokens"].as_u64().unwrap_or(6) as usize;
        let want = alone(&model, row["prompt"].as_str().unwrap(), max_tokens, &[]);
        for key in ["prompt_tokens", "tokens", "text", "stop_reason", "model", "architecture", "dtype", "quantization"]
        {
            assert_eq!(v[key], want[key], "{key} of line {}: {v}", v["line"]);
        }
        assert!(v["tokens"].as_array().unwrap().len() <= max_tokens);
    }
    let err = common::stderr(&out);
    assert!(err.contains("6 requests") && err.contains("tok/s"), "summary on stderr: {err}");
}

#[test]
fn sampled_rows_use_the_seed_plus_their_index() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 11);
    let lines: Vec<String> = (0..3).map(|_| json!({"prompt": "Same prompt"}).to_string()).collect();
    let file = write_lines(&d.path().join("p.jsonl"), &lines);
    let sampling = ["--temperature", "1.0", "--seed", "40", "--max-tokens", "8"];
    let out = batch(&model, &file, &sampling);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let got = json_lines(&common::stdout(&out));
    for (i, v) in got.iter().enumerate() {
        let seed = (40 + i).to_string();
        let want = alone(&model, "Same prompt", 8, &["--temperature", "1.0", "--seed", &seed]);
        assert_eq!(v["tokens"], want["tokens"], "row {i} samples with --seed + {i}");
    }
    assert_ne!(got[0]["tokens"], got[1]["tokens"], "rows of the same prompt differ");
}

#[test]
fn a_broken_line_names_file_and_line_and_nothing_runs() {
    let d = tempfile::tempdir().unwrap();
    // No model is needed: the file is checked before any model is loaded.
    let model = d.path().join("no-model").to_str().unwrap().to_string();
    let good = json!({"prompt": "fine"}).to_string();
    let cases: [(&str, &str); 10] = [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"id": 3}"#, "\"prompt\""),
        (r#"{"prompt": 5}"#, "\"prompt\" must be a string"),
        (r#"{"prompt": "x", "max_tokens": 0}"#, "positive integer"),
        (r#"{"prompt": "x", "max_tokens": "5"}"#, "positive integer"),
        (r#"{"prompt": "x", "max_tokens": 2.5}"#, "positive integer"),
        (r#"{"prompt": "x", "stop": 4}"#, "string or an array of strings"),
        (r#"{"prompt": "x", "stop": ["ok", 1]}"#, "string or an array of strings"),
        (r#"{"prompt": "x", "stop": ""}"#, "must not be empty"),
    ];
    for (i, (broken, expected)) in cases.iter().enumerate() {
        let file =
            write_lines(&d.path().join(format!("p{i}.jsonl")), &[good.clone(), String::new(), broken.to_string()]);
        let out = batch(&model, &file, &[]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{broken}: {err}");
        assert!(err.contains(&format!("{file}:3:")), "{broken}: names FILE:LINE: {err}");
        assert!(err.contains(expected), "{broken}: says what was expected ({expected}): {err}");
        assert!(!err.contains("--model"), "{broken}: checked before loading: {err}");
        assert!(common::stdout(&out).is_empty(), "{broken}: nothing on stdout");
    }
    let missing = d.path().join("missing.jsonl");
    let out = batch(&model, missing.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains(&format!("--prompts {}", missing.display())), "{}", common::stderr(&out));
    let empty = write_lines(&d.path().join("empty.jsonl"), &[String::new(), "   ".into()]);
    let out = batch(&model, &empty, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("no prompts"), "{}", common::stderr(&out));
}

#[test]
fn batch_flags_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let file = write_lines(&d.path().join("p.jsonl"), &[json!({"prompt": "x"}).to_string()]);
    let out = batch("no-model", &file, &["--batch", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("--batch"), "{}", common::stderr(&out));
    for single in [["--prompt", "x"], ["--prompt-ids", "1"]] {
        let out = common::billion(&["generate", "--model", "no-model", single[0], single[1], "--batch", "4"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(common::stderr(&out).contains("--batch") && common::stderr(&out).contains("--prompts"));
    }
    for other in
        [&["--prompt", "x"][..], &["--prompt-ids", "1"], &["--logits-out", "l.safetensors"], &["--prefill-chunk", "2"]]
    {
        let out = batch("no-model", &file, other);
        assert_eq!(out.status.code(), Some(2), "{other:?}");
        assert!(common::stderr(&out).contains("cannot be used with"), "{other:?}: {}", common::stderr(&out));
    }
}

#[test]
fn a_row_longer_than_the_context_is_refused_and_the_others_run() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 3);
    let long = "x".repeat(300);
    let lines = [
        json!({"id": "a", "prompt": "short one"}).to_string(),
        json!({"id": "b", "prompt": long}).to_string(),
        json!({"id": "c", "prompt": "another"}).to_string(),
    ];
    let file = write_lines(&d.path().join("p.jsonl"), &lines);
    let out = batch(&model, &file, &["--max-tokens", "4", "--batch", "2"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{file}:2:")) && err.contains("context window"), "{err}");
    let got = json_lines(&common::stdout(&out));
    assert_eq!(got.len(), 3, "every row has its line");
    assert_eq!((&got[0]["id"], &got[1]["id"], &got[2]["id"]), (&json!("a"), &json!("b"), &json!("c")));
    assert_eq!(got[1]["line"], 2);
    assert!(got[1]["error"].as_str().unwrap().contains("context window"), "{}", got[1]);
    assert!(got[1].get("tokens").is_none());
    for v in [&got[0], &got[2]] {
        assert!(v["error"].is_null() && !v["tokens"].as_array().unwrap().is_empty(), "{v}");
    }
    // With --truncate-prompt the long row keeps its last tokens, as a single prompt does.
    let out = batch(&model, &file, &["--max-tokens", "4", "--truncate-prompt"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let got = json_lines(&common::stdout(&out));
    let want = alone(&model, &long, 4, &["--truncate-prompt"]);
    assert_eq!(got[1]["prompt_tokens"].as_array().unwrap().len(), 252);
    assert_eq!((&got[1]["prompt_tokens"], &got[1]["tokens"]), (&want["prompt_tokens"], &want["tokens"]));
}

#[test]
fn a_stop_string_that_never_appears_ends_at_max_tokens() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 5);
    let lines = [
        json!({"prompt": "Tell me", "stop": "never in this reply"}).to_string(),
        json!({"prompt": "More", "stop": ["not here", "nor here"], "max_tokens": 7}).to_string(),
    ];
    let file = write_lines(&d.path().join("p.jsonl"), &lines);
    let out = batch(&model, &file, &["--max-tokens", "10", "--stop", "also absent"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let got = json_lines(&common::stdout(&out));
    for (v, (prompt, max_tokens)) in got.iter().zip([("Tell me", 10), ("More", 7)]) {
        assert_eq!(v["stop_reason"], "max_tokens", "{v}");
        assert_eq!(v["tokens"].as_array().unwrap().len(), max_tokens);
        assert_eq!(v["text"], alone(&model, prompt, max_tokens, &[])["text"], "nothing held back");
    }
}

/// `generate --prompts FILE --batch N` started with piped output, and the first line it wrote.
fn spawn_batch(model: &str, file: &str, batch: &str) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(["generate", "--model", model, "--prompts", file, "--device", "cpu", "--batch", batch])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    (child, reader, first)
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 2);
    // More output than a pipe holds, so writing must meet the closed end.
    let prompt = "p".repeat(120);
    let lines: Vec<String> =
        (0..300).map(|i| json!({"id": i, "prompt": prompt, "max_tokens": 2}).to_string()).collect();
    let file = write_lines(&d.path().join("p.jsonl"), &lines);
    let (child, reader, first) = spawn_batch(&model, &file, "32");
    drop(reader);
    let out = child.wait_with_output().unwrap();
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&first).unwrap()["id"], 0);
}

#[test]
fn ctrl_c_writes_what_finished_and_exits_130() {
    let d = tempfile::tempdir().unwrap();
    let model = chat_model(&d.path().join("m"), 4);
    // Far more work than runs before the signal.
    let lines: Vec<String> =
        (0..400).map(|i| json!({"id": i, "prompt": format!("row {i}"), "max_tokens": 200}).to_string()).collect();
    let file = write_lines(&d.path().join("p.jsonl"), &lines);
    let (child, mut reader, first) = spawn_batch(&model, &file, "4");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted") && err.contains("not started"), "{err}");
    let got = json_lines(&(first + &rest));
    assert!(!got.is_empty() && got.len() < 400, "{} lines", got.len());
    let line_numbers: Vec<u64> = got.iter().map(|v| v["line"].as_u64().unwrap()).collect();
    assert!(line_numbers.windows(2).all(|w| w[0] < w[1]), "input order: {line_numbers:?}");
}
