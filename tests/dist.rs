//! Data-parallel runs end to end on the CPU: the binary started once per rank with torchrun's variables
//! (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), as on several hosts. Two ranks give the records,
//! adapters and output lines of one rank; a mismatched rank, a missing rank or a different model ends every
//! rank with an error that says so.

mod common;

use candle_core::quantized::GgmlDType;
use std::path::Path;
use std::process::{Command, Output};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `billion ARGS` as rank `rank` of `world`, rank 0 listening on `port`, stdout and stderr piped.
fn rank_command(args: &[String], rank: usize, world: usize, port: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_billion"));
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("BILLION_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

/// `args_of(rank)` run as every rank of a world of `world`, at once; their outputs by rank.
fn ranks(world: usize, env_world: impl Fn(usize) -> usize, args_of: impl Fn(usize) -> Vec<String>) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> =
        (0..world).map(|r| rank_command(&args_of(r), r, env_world(r), &port).spawn().unwrap()).collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// One process alone, with the thread count every rank of [`ranks`] has (so matrix products split alike).
fn alone(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_billion")).args(args).env("BILLION_THREADS", "1").output().unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", common::stderr(o));
}

/// The tensors of a safetensors file, as f32.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Adapters of two runs equal within 1e-5 of each tensor's largest value.
fn assert_same_adapters(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(&a.join("adapter_model.safetensors")), tensors(&b.join("adapter_model.safetensors")));
    assert_eq!(ta.len(), tb.len());
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 1e-5 * scale, "{name}: max |Δ| {worst:e} of max |x| {scale:e}");
    }
}

/// `finetune` arguments for a short deterministic run in `dir` writing `out`.
fn finetune_args(dir: &Path, model: &Path, out: &str, batch: &str, extra: &[&str]) -> Vec<String> {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let mut v = strings(&["finetune", "--model", model.to_str().unwrap(), "--device", "cpu", "--dropout", "0"]);
    v.extend(strings(&["--epochs", "1", "--max-steps", "4", "--lr", "1e-2", "--show", "0", "--json"]));
    v.extend(["--batch-size".into(), batch.into(), "--data".into(), p("train.jsonl")]);
    v.extend(["--eval-data".into(), p("eval.jsonl"), "--out".into(), p(out), "--results".into(), p("r.json")]);
    v.extend(strings(extra));
    v
}

fn training_task(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    billion::testing::write_chat_model(&model, 3).unwrap();
    common::write_even_odd_task(&dir.join("train.jsonl"), 0, 32);
    common::write_even_odd_task(&dir.join("eval.jsonl"), 100, 4);
    model
}

/// The loss is averaged over every answer token of a step, so two micro-batches of 4 accumulate to the
/// gradient of one batch of 8.
#[test]
fn accumulated_micro_batches_train_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = training_task(dir.path());
    let run = |out: &str, batch: &str, extra: &[&str]| {
        let args = finetune_args(dir.path(), &model, out, batch, extra);
        let o = common::billion(&args.iter().map(String::as_str).collect::<Vec<_>>());
        ok(&o, out);
    };
    run("whole", "8", &[]);
    run("accumulated", "4", &["--grad-accum", "2"]);
    assert_same_adapters(&dir.path().join("whole"), &dir.path().join("accumulated"));
}

#[test]
fn two_ranks_train_the_adapter_one_rank_trains() {
    let dir = tempfile::tempdir().unwrap();
    let model = training_task(dir.path());
    let args = |out: &str, batch: &str| finetune_args(dir.path(), &model, out, batch, &[]);
    let one = alone(&args("one", "8"));
    ok(&one, "one rank");
    let two = ranks(2, |_| 2, |_| args("two", "4"));
    ok(&two[0], "rank 0");
    ok(&two[1], "rank 1");
    assert!(common::stdout(&two[1]).is_empty(), "only rank 0 prints the record");
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(&common::stdout(&one)).unwrap(), serde_json::from_str(&common::stdout(&two[0])).unwrap());
    assert_eq!(b["world_size"], 2);
    assert_eq!(b["ranks"].as_array().unwrap().len(), 2);
    assert_eq!(a["steps"], b["steps"]);
    let tokens = |v: &serde_json::Value| {
        v["loss_curve"].as_array().unwrap().iter().map(|r| r["tokens"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(tokens(&a), tokens(&b), "each step trains the same examples");
    for (x, y) in a["loss_curve"].as_array().unwrap().iter().zip(b["loss_curve"].as_array().unwrap()) {
        let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step loss {x} vs {y}");
    }
    assert_same_adapters(&dir.path().join("one"), &dir.path().join("two"));
}

/// MMLU over two subjects, one of more than one chunk of questions (so that a rank scores a later chunk of a
/// subject whose first chunk the other rank has), and HumanEval with sampled completions.
#[test]
fn two_ranks_write_the_bench_records_one_rank_writes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&model, &cfg, 2, GgmlDType::Q8_0).unwrap();
    let mmlu = dir.path().join("mmlu");
    std::fs::create_dir_all(mmlu.join("dev")).unwrap();
    std::fs::create_dir_all(mmlu.join("test")).unwrap();
    let rows = |n: usize, w: &str| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "\"{w} {i}: which {}?\",one,two,three,four,{}\n",
                    "x".repeat(i % 7),
                    "ABCD".as_bytes()[i % 4] as char
                )
            })
            .collect()
    };
    for (s, n) in [("virology", 600), ("anatomy", 40)] {
        std::fs::write(mmlu.join(format!("dev/{s}_dev.csv")), rows(5, "dev")).unwrap();
        std::fs::write(mmlu.join(format!("test/{s}_test.csv")), rows(n, s)).unwrap();
    }
    let problems = common::humaneval_file(dir.path(), 5);
    let args = |res: &str| -> Vec<String> {
        let mut v = strings(&["bench", "--models", model.to_str().unwrap(), "--humaneval", "--humaneval-file"]);
        v.extend([problems.to_str().unwrap().into()]);
        v.extend(strings(&["--samples", "3", "--temperature", "0.8", "--max-tokens", "12", "--mmlu", "--mmlu-dir"]));
        v.extend([mmlu.to_str().unwrap().into(), "--shots".into(), "2".into(), "--results-dir".into()]);
        v.extend([dir.path().join(res).to_str().unwrap().into()]);
        v.extend(strings(&["--device", "cpu", "--batch-size", "8", "--json"]));
        v
    };
    let one = alone(&args("one"));
    ok(&one, "one rank");
    let two = ranks(2, |_| 2, |_| args("two"));
    ok(&two[0], "rank 0");
    ok(&two[1], "rank 1");
    let record = |o: &Output, which: &str, timings: &[&str]| -> serde_json::Value {
        let doc: serde_json::Value = serde_json::from_str(&common::stdout(o)).unwrap();
        let mut m = doc["models"][0][which].clone();
        for timing in timings {
            m.as_object_mut().unwrap().remove(*timing);
        }
        m
    };
    let mmlu = |o| record(o, "mmlu", &["seconds", "questions_per_s", "tokens_run"]);
    let (a, b) = (mmlu(&one), mmlu(&two[0]));
    assert_eq!(a["questions"], 640);
    assert_eq!(a, b, "the same MMLU record from one rank and from two");
    let humaneval = |o| record(o, "humaneval", &["generation_seconds", "run_seconds", "generation_tok_s"]);
    let (a, b) = (humaneval(&one), humaneval(&two[0]));
    assert_eq!(a["per_problem"].as_array().unwrap().len(), 5);
    assert_eq!(a, b, "the same HumanEval record (completions, outcomes, pass@k) from one rank and from two");
    assert!(!dir.path().join("two").join("benchmark_results.json").exists() || two[1].stdout.is_empty());
}

#[test]
fn two_ranks_generate_the_lines_one_rank_does() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    billion::testing::write_chat_model(&model, 5).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines: Vec<String> = (0..7)
        .map(|i| serde_json::json!({"id": i, "prompt": format!("hello {}", "ab".repeat(i))}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let args = strings(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-tokens",
        "6",
        "--device",
        "cpu",
        "--batch",
        "3",
    ]);
    let one = alone(&args);
    ok(&one, "one rank");
    let two = ranks(2, |_| 2, |_| args.clone());
    ok(&two[0], "rank 0");
    ok(&two[1], "rank 1");
    assert_eq!(common::stdout(&one).lines().count(), 7);
    assert_eq!(common::stdout(&one), common::stdout(&two[0]), "every line, in input order");
    assert!(common::stdout(&two[1]).is_empty());
}

#[test]
fn mismatched_missing_and_different_ranks_end_every_rank_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    billion::testing::write_chat_model(&model, 5).unwrap();
    let other = dir.path().join("other");
    billion::testing::write_chat_model(&other, 6).unwrap();
    let gen = |m: &Path| {
        strings(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu"])
    };
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    let batch_waiting = |m: &Path, timeout: &str| {
        let mut v = gen(m);
        v.truncate(3);
        v.extend(strings(&["--prompts", prompts.to_str().unwrap(), "--device", "cpu", "--dist-timeout", timeout]));
        v
    };
    let batch = |m: &Path| batch_waiting(m, "20");
    // WORLD_SIZE differs between the ranks.
    let out = ranks(2, |r| 2 + r, |_| batch(&model));
    for (r, o) in out.iter().enumerate() {
        assert!(!o.status.success(), "rank {r} should fail");
        assert!(common::stderr(o).contains("WORLD_SIZE=3"), "rank {r}: {}", common::stderr(o));
    }
    // The second rank runs another model.
    let out = ranks(2, |_| 2, |r| batch(if r == 0 { &model } else { &other }));
    for (r, o) in out.iter().enumerate() {
        assert!(!o.status.success(), "rank {r} should fail");
        assert!(common::stderr(o).contains("disagree on the model"), "rank {r}: {}", common::stderr(o));
    }
    // Rank 1 never starts: rank 0 gives up at --dist-timeout.
    let port = free_port().to_string();
    let started = std::time::Instant::now();
    let o = rank_command(&batch_waiting(&model, "2"), 0, 2, &port).output().unwrap();
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("rank(s) 1 did not join within 2 s"), "{}", common::stderr(&o));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // Bad values are refused before any work.
    let o = rank_command(&batch(&model), 3, 2, &port).output().unwrap();
    assert!(common::stderr(&o).contains("RANK=3 with WORLD_SIZE=2"), "{}", common::stderr(&o));
    let o = common::billion(&["generate", "--model", "m", "--prompt", "x", "--devices", "cuda:0,cuda:0"]);
    assert!(common::stderr(&o).contains("named twice"), "{}", common::stderr(&o));
}

/// Ctrl-C on one rank stops both at the same step with one checkpoint, which one rank then resumes and finishes.
#[test]
fn ctrl_c_on_one_rank_checkpoints_and_one_rank_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    billion::testing::write_chat_model(&model, 9).unwrap();
    common::write_even_odd_task(&dir.path().join("train.jsonl"), 0, 48);
    common::write_even_odd_task(&dir.path().join("eval.jsonl"), 100, 4);
    let mut args = finetune_args(dir.path(), &model, "run", "4", &[]);
    for flag in ["--max-steps", "--epochs", "--lr"] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args.drain(at..at + 2);
    }
    args.extend(strings(&["--epochs", "10", "--lr", "1e-3"]));
    let port = free_port().to_string();
    let spawn = |r: usize| rank_command(&args, r, 2, &port).stdout(std::process::Stdio::null()).spawn().unwrap();
    let (mut rank0, rank1) = (spawn(0), spawn(1));
    let log = common::interrupt_at_first_step(&mut rank0);
    assert_eq!(rank0.wait().unwrap().code(), Some(130), "{log}");
    let other = rank1.wait_with_output().unwrap();
    assert_eq!(other.status.code(), Some(130), "rank 1 stops at the same step: {}", common::stderr(&other));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/checkpoint/trainer_state.json")).unwrap())
            .unwrap();
    let (step, world) = (state["step"].as_u64().unwrap(), state["world_size"].as_u64().unwrap());
    assert_eq!(world, 2);
    assert!(step > 0 && step < 60, "stopped mid-run at step {step}");
    // One rank resumes: the same share of the data done, counted in its own (twice as large) steps.
    args.extend(["--resume".into(), dir.path().join("run/checkpoint").to_str().unwrap().into()]);
    let o = alone(&args);
    ok(&o, "resume with one rank");
    // 6 steps an epoch of two ranks' 2 × 4 examples are 12 of one rank's 4.
    let mapped = format!(
        "the checkpoint was written by 2 rank(s), this run has 1: step {step} of 60 there is step {} of 120 here",
        2 * step
    );
    assert!(common::stderr(&o).contains(&mapped), "{mapped}: {}", common::stderr(&o));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&common::stdout(&o)).unwrap()["steps"], 120);
    let record: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
    assert_eq!(record["world_size"], 1);
    assert!(!dir.path().join("run/checkpoint").exists(), "the spent checkpoint is removed");
}
