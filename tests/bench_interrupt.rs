//! Ctrl-C during `billion bench`: the MMLU question or HumanEval program being worked on finishes, the
//! finished part is saved marked interrupted (JSON and Markdown), what did not run is named, and the exit
//! status is 130; a second Ctrl-C quits at once.

mod common;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn tiny_gguf(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&path, &cfg, 1, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    path
}

/// Start bench; its stderr lines arrive on the channel.
fn start(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Wait for a stderr line containing `what`; returns every line seen.
fn wait_for(rx: &mpsc::Receiver<String>, what: &str) -> Vec<String> {
    let mut seen = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let hit = line.contains(what);
            seen.push(line);
            if hit {
                return seen;
            }
        }
    }
    panic!("no `{what}` on stderr: {seen:?}");
}

fn sigint(child: &Child) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
}

/// The exit code, waiting at most `limit`.
fn exit_code(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rest(rx: &mpsc::Receiver<String>) -> String {
    let mut all = vec![];
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
        all.push(l);
    }
    all.join("\n")
}

#[test]
fn ctrl_c_during_mmlu_keeps_the_answered_questions_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let mmlu = dir.path().join("mmlu");
    std::fs::create_dir_all(mmlu.join("dev")).unwrap();
    std::fs::create_dir_all(mmlu.join("test")).unwrap();
    let rows = |n: usize| -> String { (0..n).map(|i| format!("\"q{i}: which?\",one,two,three,four,A\n")).collect() };
    std::fs::write(mmlu.join("dev/anatomy_dev.csv"), rows(5)).unwrap();
    // Far more than can be answered before the interrupt.
    let asked = 20_000;
    std::fs::write(mmlu.join("test/anatomy_test.csv"), rows(asked)).unwrap();
    let he = dir.path().join("he.jsonl");
    std::fs::write(
        &he,
        r#"{"task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}"#,
    )
    .unwrap();
    let res = dir.path().join("results");
    let (mut child, rx) = start(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--mmlu",
        "--humaneval",
        "--mmlu-dir",
        mmlu.to_str().unwrap(),
        "--humaneval-file",
        he.to_str().unwrap(),
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    wait_for(&rx, "MMLU, 20000 questions");
    // Long enough for some questions even with other tests running; 20,000 take far longer.
    std::thread::sleep(Duration::from_millis(3000));
    sigint(&child);
    assert_eq!(exit_code(&mut child, Duration::from_secs(30)), Some(130));
    let err = rest(&rx);
    assert!(err.contains("MMLU stopped after") && err.contains("not run: humaneval"), "{err}");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("benchmark_results.json")).unwrap()).unwrap();
    let m = &doc["models"][0];
    assert_eq!(m["interrupted"], true);
    assert_eq!(m["mmlu"]["interrupted"], true);
    let answered = m["mmlu"]["questions"].as_u64().unwrap();
    assert!(answered > 0 && answered < asked as u64, "{answered} of {asked}");
    assert_eq!(m["not_run"], serde_json::json!(["humaneval"]), "nothing skipped silently");
    assert!(m.get("humaneval").is_none());
    let md = std::fs::read_to_string(res.join("benchmark_results.md")).unwrap();
    assert!(
        md.contains("## Interrupted runs") && md.contains(&format!("MMLU stopped after {answered} questions")),
        "{md}"
    );
}

/// `n` problems whose tests take `seconds` each in the sandbox.
fn slow_problems(dir: &Path, n: usize, seconds: f64) -> PathBuf {
    let path = dir.join("slow.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "task_id": format!("Slow/{i}"),
                // The sleep runs whatever the model writes: its completion lands inside a string literal
                // that the test code closes, so a garbled completion cannot end the program early.
                "prompt": format!("import time\ntime.sleep({seconds})\n\ndef f():\n    return 1\n\n_ = \"\"\""),
                "canonical_solution": "",
                "test": "\"\"\"\n\ndef check(c):\n    assert c() == 1\n",
                "entry_point": "f",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn ctrl_c_during_humaneval_runs_stops_at_the_current_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let he = slow_problems(dir.path(), 12, 1.0);
    let res = dir.path().join("results");
    let (mut child, rx) = start(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--humaneval",
        "--humaneval-file",
        he.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    wait_for(&rx, "HumanEval (base), 12 problems");
    std::thread::sleep(Duration::from_millis(1500));
    sigint(&child);
    let start = Instant::now();
    assert_eq!(exit_code(&mut child, Duration::from_secs(20)), Some(130));
    // The programs already running finish (1 s each); the other problems' do not start.
    assert!(start.elapsed() < Duration::from_secs(10), "only the programs running finish: {:?}", start.elapsed());
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("benchmark_results.json")).unwrap()).unwrap();
    let h = &doc["models"][0]["humaneval"];
    assert_eq!(h["interrupted"], true);
    let problems = h["problems"].as_u64().unwrap();
    assert!(problems < 12, "{problems}");
    assert_eq!(h["per_problem"].as_array().unwrap().len() as u64, problems);
    let md = std::fs::read_to_string(res.join("benchmark_results.md")).unwrap();
    assert!(md.contains(&format!("{problems} (interrupted)")), "{md}");
}

#[test]
fn a_second_ctrl_c_quits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let he = slow_problems(dir.path(), 4, 30.0);
    let res = dir.path().join("results");
    let (mut child, rx) = start(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--humaneval",
        "--humaneval-file",
        he.to_str().unwrap(),
        "--max-tokens",
        "4",
        "--timeout",
        "60",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    wait_for(&rx, "HumanEval (base)");
    std::thread::sleep(Duration::from_millis(800));
    sigint(&child);
    wait_for(&rx, "Ctrl-C again to quit now");
    let start = Instant::now();
    sigint(&child);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)), Some(130));
    // The running programs sleep 30 s: quitting well before that shows they were not waited for.
    assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
}

#[test]
fn ctrl_c_during_the_speed_step_keeps_no_partial_figures() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path());
    let res = dir.path().join("results");
    let (mut child, rx) = start(&[
        "bench",
        "--models",
        model.to_str().unwrap(),
        "--speed",
        "-p",
        "64",
        "-n",
        "64",
        "-r",
        "100000",
        "--results-dir",
        res.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    wait_for(&rx, "speed (-p 64 -n 64 -r 100000)");
    std::thread::sleep(Duration::from_millis(500));
    sigint(&child);
    assert_eq!(exit_code(&mut child, Duration::from_secs(30)), Some(130));
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("benchmark_results.json")).unwrap()).unwrap();
    let m = &doc["models"][0];
    assert_eq!(m["interrupted"], true);
    assert!(m.get("speed").is_none_or(|s| s.is_null()), "{m}");
    assert_eq!(m["not_run"], serde_json::json!(["speed"]));
}
