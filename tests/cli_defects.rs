//! Defects a new user hit in `generate`, `chat`, `speculative` and `info`, each through the real binary:
//! values checked before any work, closed-over results files, piped chat commands, truncated files, flags
//! that the README promises.

mod common;

use billion::model::Architecture;
use billion::testing::{tiny_config, write_chat_model, write_hf_model, write_llama_gguf};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn tiny(dir: &Path, seed: u64) -> String {
    write_hf_model(dir, &tiny_config(Architecture::Llama, 320), seed).unwrap();
    dir.to_str().unwrap().to_string()
}

/// The one `error:` line of a failed run.
fn error_line(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let err = common::stderr(out);
    assert!(!err.contains("panicked"), "{err}");
    err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {err}")).to_string()
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    common::stdout(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sampling_values_are_checked_in_every_subcommand_before_loading() {
    // The model does not exist: an error naming the sampling flag proves the check came first.
    let missing = "/no/such/model";
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--model", missing, "--prompt-ids", "1", "--repeat-penalty", "-2"], "--repeat-penalty"),
        (&["generate", "--model", missing, "--prompt-ids", "1", "--repeat-penalty", "nan"], "--repeat-penalty"),
        (&["generate", "--model", missing, "--prompt-ids", "1", "--repeat-penalty", "0"], "--repeat-penalty"),
        (&["chat", "--model", missing, "--temperature", "-1"], "--temperature"),
        (&["chat", "--model", missing, "--top-p", "2"], "--top-p"),
        (&["speculative", "--draft", missing, "--target", missing, "--prompt-ids", "1", "--top-p", "2"], "--top-p"),
        (&["generate", "--model", missing, "--prompt-ids", "1", "--top-k", "0"], "--top-k"),
        (&["bench", "--models", missing, "--humaneval", "--temperature", "-1"], "--temperature"),
    ];
    for (args, flag) in cases {
        let line = error_line(&common::billion(args));
        assert!(line.contains(flag), "{args:?}: {line}");
    }
}

#[test]
fn info_refuses_truncated_files() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(&d.path().join("hf"), 1);
    let st = Path::new(&dir).join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&st).unwrap().set_len(len - 100).unwrap();
    let line = error_line(&common::billion(&["info", "--model", &dir]));
    assert!(line.contains("truncated") && line.contains("model.safetensors"), "{line}");

    let gguf = d.path().join("tiny.gguf");
    write_llama_gguf(&gguf, &tiny_config(Architecture::Llama, 320), 1, candle_core::quantized::GgmlDType::Q8_0)
        .unwrap();
    let len = std::fs::metadata(&gguf).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&gguf).unwrap().set_len(len - 1000).unwrap();
    let line = error_line(&common::billion(&["info", "--model", gguf.to_str().unwrap()]));
    assert!(line.contains("truncated GGUF"), "{line}");
}

#[test]
fn info_memory_figures_follow_the_shapes() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(d.path(), 1);
    let out = common::billion(&["info", "--model", &dir, "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    let (params, layers, kv_heads, head_dim, ctx) = (
        v["parameters"].as_u64().unwrap(),
        v["layers"].as_u64().unwrap(),
        v["kv_heads"].as_u64().unwrap(),
        v["head_dim"].as_u64().unwrap(),
        v["context_length"].as_u64().unwrap(),
    );
    // f32 on the CPU: 4 bytes a parameter; K and V of every layer per token.
    assert_eq!(v["weights_bytes"].as_u64().unwrap(), params * 4);
    let kv = 2 * layers * kv_heads * head_dim * 4;
    assert_eq!(v["kv_cache_bytes_per_token"].as_u64().unwrap(), kv);
    assert_eq!(v["total_bytes_full_context"].as_u64().unwrap(), params * 4 + kv * ctx);
    // The parameter count is what the file holds (every tensor is f32 there).
    let header = billion::formats::safetensors::read_header(&Path::new(&dir).join("model.safetensors")).unwrap();
    let in_file: u64 = header.tensors.values().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    assert_eq!(params, in_file);
}

#[test]
fn truncate_prompt_leaves_room_for_the_answer() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(d.path(), 3); // context 256
    let ids: Vec<String> = (0..300).map(|i| (3 + i % 300).to_string()).collect();
    let out = common::billion(&[
        "generate",
        "--model",
        &dir,
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "20",
        "--truncate-prompt",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 236, "256 - 20 prompt tokens kept");
    assert_eq!(v["prompt_tokens"][235], serde_json::json!(3 + 299), "the last ones");
    assert_ne!(v["stop_reason"], "context_full");
}

#[test]
fn output_paths_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(d.path(), 1);
    let out = common::billion(&[
        "generate",
        "--model",
        &dir,
        "--prompt-ids",
        "1,2,3",
        "--logits-out",
        "/proc/x/y.safetensors",
    ]);
    let line = error_line(&out);
    assert!(line.contains("--logits-out") && line.contains("/proc/x"), "{line}");
    assert!(common::stdout(&out).is_empty(), "nothing generated: {}", common::stdout(&out));

    let base = ["speculative", "--draft", &dir, "--target", &dir, "--prompt-ids", "1,2", "--max-tokens", "4"];
    let out = common::billion(&[&base[..], &["--results", "/proc/x/spec.json", "--json"]].concat());
    let line = error_line(&out);
    assert!(line.contains("--results"), "{line}");
    assert!(common::stdout(&out).is_empty());
    let not_results = d.path().join("other.json");
    std::fs::write(&not_results, "{\"hello\": 1}").unwrap();
    let line = error_line(&common::billion(&[&base[..], &["--results", not_results.to_str().unwrap()]].concat()));
    assert!(line.contains("runs"), "{line}");
    assert_eq!(std::fs::read_to_string(&not_results).unwrap(), "{\"hello\": 1}", "left as it was");
}

#[test]
fn speculative_keeps_one_record_per_setting() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(d.path(), 1);
    let results = d.path().join("spec.json");
    for extra in [&[][..], &["--target-quantize", "q8_0"][..]] {
        let mut args = vec!["speculative", "--draft", &dir, "--target", &dir, "--prompt-ids", "1,2,3"];
        args.extend(["--max-tokens", "6", "--device", "cpu", "--results", results.to_str().unwrap()]);
        args.extend(extra);
        let out = common::billion(&args);
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "both settings kept");
    let quant: Vec<&str> = runs.iter().map(|r| r["target_setup"]["quantization"].as_str().unwrap()).collect();
    assert!(quant.contains(&"none") && quant.contains(&"q8_0"), "{quant:?}");
    assert_eq!(runs[0]["draft_setup"]["dtype"], "f32");
}

#[test]
fn speculative_prompts_file_and_adaptive_draft_length() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    write_chat_model(&dir, 1).unwrap();
    let dir = dir.to_str().unwrap();
    let prompts = d.path().join("prompts.txt");
    std::fs::write(&prompts, "hello there\n\n{\"prompt\": \"second prompt\"}\n").unwrap();
    let out = common::billion(&[
        "speculative",
        "--draft",
        dir,
        "--target",
        dir,
        "--prompts",
        prompts.to_str().unwrap(),
        "--adaptive",
        "--max-tokens",
        "12",
        "--json",
        "--device",
        "cpu",
        "--results",
        d.path().join("r.json").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2, "one object per prompt: {lines:?}");
    // Draft and target are the same model: every draft token is accepted.
    for l in &lines {
        assert_eq!(l["stats"]["acceptance_rate"].as_f64().unwrap(), 1.0, "{l}");
        // --adaptive: after a fully accepted round the draft grows past the starting k of 4.
        assert!(l["stats"]["per_position"].as_array().unwrap().len() > 4, "{l}");
    }
    let bad = d.path().join("bad.txt");
    std::fs::write(&bad, "{\"text\": \"no prompt field\"}\n").unwrap();
    let line = error_line(&common::billion(&[
        "speculative",
        "--draft",
        dir,
        "--target",
        dir,
        "--prompts",
        bad.to_str().unwrap(),
    ]));
    assert!(line.contains("line 1") && line.contains("prompt"), "{line}");
}

/// Run `chat` on piped stdin; returns (stdout JSON lines, stderr).
fn piped_chat(dir: &str, extra: &[&str], input: &str) -> (Vec<serde_json::Value>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(["chat", "--model", dir, "--max-tokens", "6", "--json", "--device", "cpu"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    (json_lines(&out), common::stderr(&out))
}

#[test]
fn piped_chat_runs_commands_instead_of_sending_them_to_the_model() {
    let d = tempfile::tempdir().unwrap();
    write_chat_model(d.path(), 1).unwrap();
    let dir = d.path().to_str().unwrap();
    let (turns, err) = piped_chat(dir, &[], "hello\n/stats\n/bogus\n/exit\nnever answered\n");
    assert_eq!(turns.len(), 1, "only `hello` is a turn: {turns:?}");
    assert!(err.contains("prompt tokens"), "/stats printed: {err}");
    assert!(err.contains("unknown command /bogus"), "{err}");

    // --system and /system reach the prompt: the same message costs more prompt tokens with a system prompt.
    let (plain, _) = piped_chat(dir, &[], "hi\n");
    let (with_flag, _) = piped_chat(dir, &["--system", "Answer in one word."], "hi\n");
    let (with_cmd, err) = piped_chat(dir, &[], "/system Answer in one word.\nhi\n");
    assert!(err.contains("system prompt set"), "{err}");
    let tokens = |t: &[serde_json::Value]| t[0]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&with_flag) > tokens(&plain), "{} vs {}", tokens(&with_flag), tokens(&plain));
    assert_eq!(tokens(&with_flag), tokens(&with_cmd), "flag and command render the same prompt");
}

#[test]
fn generate_stops_at_a_stop_string() {
    let d = tempfile::tempdir().unwrap();
    write_chat_model(d.path(), 5).unwrap();
    let dir = d.path().to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", dir, "--prompt", "abc", "--max-tokens", "24", "--json"];
        args.extend(["--device", "cpu"]);
        args.extend(extra);
        let out = common::billion(&args);
        assert!(out.status.success(), "{}", common::stderr(&out));
        serde_json::from_str::<serde_json::Value>(&common::stdout(&out)).unwrap()
    };
    let free = run(&[]);
    let text = free["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "enough text to pick a stop string from: {text:?}");
    let stop: String = chars[5..7].iter().collect();
    let stopped = run(&["--stop", &stop]);
    let cut = stopped["text"].as_str().unwrap();
    assert_eq!(stopped["stop_reason"], "stop_string", "{stopped}");
    assert!(!cut.contains(&stop) && text.starts_with(cut), "{cut:?} is {text:?} before {stop:?}");
}

#[test]
fn threads_flag_is_taken_and_checked() {
    let d = tempfile::tempdir().unwrap();
    let dir = tiny(d.path(), 2);
    let run = |threads: &str| {
        common::billion(&[
            "generate",
            "--model",
            &dir,
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "4",
            "--json",
            "--device",
            "cpu",
            "--threads",
            threads,
        ])
    };
    let one = run("1");
    assert!(one.status.success(), "{}", common::stderr(&one));
    let two = run("2");
    assert_eq!(json_lines(&one)[0]["tokens"], json_lines(&two)[0]["tokens"], "same tokens on any thread count");
    let line = error_line(&run("0"));
    assert!(line.contains("--threads"), "{line}");
}

#[test]
fn every_flag_of_every_subcommand_has_help() {
    for sub in ["generate", "chat", "speculative", "finetune", "info", "download", "bench"] {
        common::assert_every_flag_has_help(sub);
    }
}
