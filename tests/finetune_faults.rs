//! `billion finetune` under faults, on self-made tiny models: bad outputs and values are refused before any
//! work with one line naming the flag; a process killed (SIGKILL) while a checkpoint or a merged model is
//! being put in place leaves the previous one whole and nothing partial at the final path, and the rerun
//! finishes; every file written has mode 0644 and the settings as given.

mod common;

use billion::model::config::Architecture;
use billion::testing::{tiny_config, write_chat_model, write_llama_gguf};
use candle_core::quantized::GgmlDType;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tiny chat model and a task in a fresh folder.
fn workspace(seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_chat_model(&model, seed).unwrap();
    common::write_even_odd_task(&dir.path().join("train.jsonl"), 0, 48);
    common::write_even_odd_task(&dir.path().join("eval.jsonl"), 100, 4);
    (dir, model)
}

/// `finetune` on the CPU with the workspace's data, writing to `out` and `results`; `extra` appended.
fn args(model: &Path, work: &Path, out: &Path, results: &Path, extra: &[&str]) -> Vec<String> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut v: Vec<String> = ["finetune", "--model", &s(model), "--device", "cpu", "--batch-size", "8", "--show", "0"]
        .map(String::from)
        .to_vec();
    v.extend(["--data".into(), s(&work.join("train.jsonl")), "--eval-data".into(), s(&work.join("eval.jsonl"))]);
    v.extend(["--out".into(), s(out), "--results".into(), s(results)]);
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn billion(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_billion"));
    c.args(args);
    c
}

fn run_ok(mut c: Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "finetune failed: {}", common::stderr(&o));
    o
}

/// Start a run with stderr piped.
fn spawn_piped(mut c: Command) -> Child {
    c.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap()
}

/// Ctrl-C (SIGINT) once the run's first progress line shows training under way. Returns its stderr and what
/// it printed so far.
fn interrupt_once_training(child: &mut Child) -> (BufReader<std::process::ChildStderr>, String) {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!("the run ended ({status}) before training: {log}");
        }
        log.push_str(&line);
        if line.starts_with("step ") {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            return (err, log);
        }
    }
}

/// The first entry of `dir` whose name passes `name_ok` and that holds `inside` (or is a file, for ""),
/// waited for up to a minute.
fn wait_for_entry(dir: &Path, name_ok: impl Fn(&str) -> bool, inside: &str) -> PathBuf {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if name_ok(&name) && (if inside.is_empty() { p.is_file() } else { p.join(inside).exists() }) {
                return p;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no entry appeared in {}", dir.display());
}

/// A temporary entry of this project's (`.<name>.<pid>.tmp`) for `name`.
fn is_temp_of(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix(&format!(".{name}."))
        .and_then(|r| r.strip_suffix(".tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

fn temp_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect()
}

fn sigkill(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

fn checkpoint_step(dir: &Path) -> u64 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap();
    state["step"].as_u64().unwrap()
}

/// The command the interrupted run printed to continue it, from its error line.
fn printed_resume_command(log: &str) -> String {
    let line = log.lines().find(|l| l.contains("continue with: ")).unwrap_or_else(|| panic!("no command: {log}"));
    line.split_once("continue with: ").unwrap().1.to_string()
}

/// `cmd` run by the shell in `cwd`, the shell replaced by the command (signals reach it).
fn shell(cmd: &str, cwd: &Path) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", &format!("exec {cmd}")]).current_dir(cwd);
    c
}

/// Output paths, the model and every value are checked before any work: each failure is one line naming the
/// flag, nothing was evaluated or trained, and the output folder was not created.
#[test]
fn bad_outputs_and_values_fail_before_any_work() {
    let (dir, model) = workspace(21);
    let w = dir.path();
    let out = w.join("out");
    let results = w.join("results.json");
    std::fs::write(w.join("not-results.json"), r#"{"something": "else"}"#).unwrap();
    std::fs::create_dir_all(w.join("no-marker")).unwrap();
    std::fs::write(w.join("no-marker").join("trainer_state.json"), "{}").unwrap();
    let file_out = w.join("a-file");
    std::fs::write(&file_out, "x").unwrap();
    let with = |out: &Path, results: &Path, extra: &[&str]| args(&model, w, out, results, extra);
    let no_marker = w.join("no-marker").to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&out, Path::new("/proc/x.json"), &[]), "--results: "),
        (with(&out, &w.join("not-results.json"), &[]), "--results: "),
        (with(&out, w, &[]), "--results: "),
        (with(Path::new("/proc/x"), &results, &[]), "--out: "),
        (with(&file_out, &results, &[]), "--out: "),
        (with(&out, &results, &["--max-steps", "0"]), "--max-steps: must be at least 1"),
        (with(&out, &results, &["--lr=-1"]), "--lr: must be a positive number, got -1"),
        (with(&out, &results, &["--dropout", "1"]), "--dropout: must be in [0, 1), got 1"),
        (with(&out, &results, &["--max-grad-norm", "0"]), "--max-grad-norm: must be a positive number"),
        (with(&out, &results, &["--resume", &no_marker]), "incomplete checkpoint"),
    ];
    for (a, expected) in cases {
        let started = Instant::now();
        let o = billion(&a).output().unwrap();
        let err = common::stderr(&o);
        assert!(!o.status.success(), "{a:?} succeeded");
        assert!(err.contains(expected), "{a:?}: expected {expected:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!err.contains("evaluating") && !err.contains("step "), "work was done before failing: {err}");
        assert!(!out.exists(), "{a:?}: the output folder was created before failing");
        eprintln!("{:.0} ms: {}", started.elapsed().as_secs_f64() * 1e3, err.trim());
    }

    // A merged model's place taken by something of the other kind is refused before training too.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("merged"), "not a folder").unwrap();
    let o = billion(&with(&out, &results, &["--merge"])).output().unwrap();
    let err = common::stderr(&o);
    assert!(!o.status.success() && err.contains("--merge: ") && err.contains("in the way"), "{err}");
    assert!(!err.contains("evaluating"), "{err}");
    assert!(!results.exists());
}

/// SIGKILL while a checkpoint is being put in place (written in full, not yet renamed): the previous
/// checkpoint stays whole and resumable, the unfinished one is never taken for it, and following the printed
/// command finishes the run, its leftovers and its checkpoint removed. A checkpoint folder without its
/// completion marker is refused.
#[test]
fn killed_during_a_checkpoint_save_keeps_the_previous_one() {
    let (dir, model) = workspace(22);
    let w = dir.path();
    let out = w.join("out");
    let results = w.join("results.json");
    // 6 steps an epoch: 60 steps, a progress line every 6.
    let a = args(&model, w, &out, &results, &["--epochs", "10", "--lr", "1e-3"]);

    // A first Ctrl-C: a checkpoint.
    let mut child = spawn_piped(billion(&a));
    let (mut err, mut log) = interrupt_once_training(&mut child);
    err.read_to_string(&mut log).unwrap();
    assert!(!child.wait().unwrap().success(), "{log}");
    let ckpt = out.join("checkpoint");
    let first = checkpoint_step(&ckpt);
    let resume = printed_resume_command(&log);

    // Resumed, interrupted again, and killed while the newer checkpoint waits to replace the first.
    let mut c = shell(&resume, w);
    c.env("BILLION_FINETUNE_PAUSE_IN_SAVE_MS", "20000");
    let mut child = spawn_piped(c);
    let (_err, _) = interrupt_once_training(&mut child);
    let pending = wait_for_entry(&out, |n| is_temp_of(n, "checkpoint"), "checkpoint_complete");
    assert!(checkpoint_step(&pending) > first, "the newer checkpoint is complete beside the old one");
    assert_eq!(checkpoint_step(&ckpt), first, "the old checkpoint is in place while the new one waits");
    sigkill(&mut child);
    assert_eq!(checkpoint_step(&ckpt), first, "the killed save left the previous checkpoint whole");
    assert!(ckpt.join("checkpoint_complete").is_file());
    for f in std::fs::read_dir(&ckpt).unwrap().flatten() {
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o644, "{:?}", f.file_name());
    }

    // A folder without its completion marker is never resumed from.
    std::fs::remove_file(pending.join("checkpoint_complete")).unwrap();
    let mut partial = a.clone();
    partial.extend(["--resume".to_string(), pending.to_str().unwrap().to_string()]);
    let o = billion(&partial).output().unwrap();
    let e = common::stderr(&o);
    assert!(!o.status.success() && e.contains("--resume: ") && e.contains("incomplete checkpoint"), "{e}");

    // The printed command again: the run finishes from the first checkpoint, with nothing left behind.
    let o = run_ok(shell(&resume, w));
    let e = common::stderr(&o);
    assert!(e.contains(&format!("resuming at step {first} of 60")), "{e}");
    assert!(e.contains("removed 1 unfinished temporary"), "{e}");
    assert!(!e.contains("not used"), "the printed command carries the run's own settings: {e}");
    assert!(!ckpt.exists(), "the spent checkpoint is removed");
    assert_eq!(temp_entries(&out), Vec::<String>::new());
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["steps"], 60);
    assert_eq!(runs[0]["loss_curve"].as_array().unwrap().len(), 60, "no step lost or repeated");
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("adapter_config.json").is_file());
}

/// SIGKILL while a merged model is being put in place: the previous merged model stays whole at the final
/// path (never a part of the new one), and the rerun replaces it. Folder bases merge into a folder, GGUF
/// bases into a file.
fn killed_during_a_merge(model: &Path, w: &Path, merged_name: &str, weights_in_merged: &str) {
    let out = w.join("out");
    let results = w.join("results.json");
    let merged = out.join(merged_name);
    let weights = || {
        std::fs::read(if weights_in_merged.is_empty() { merged.clone() } else { merged.join(weights_in_merged) })
            .unwrap()
    };
    let run = |seed: &str| args(model, w, &out, &results, &["--max-steps", "2", "--merge", "--seed", seed]);

    run_ok(billion(&run("1")));
    let first = weights();

    let mut c = billion(&run("2"));
    c.env("BILLION_FINETUNE_PAUSE_IN_SAVE_MS", "20000").stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    wait_for_entry(&out, |n| is_temp_of(n, merged_name), weights_in_merged);
    assert_eq!(weights(), first, "the first merged model is in place while the new one waits");
    sigkill(&mut child);
    assert_eq!(weights(), first, "the killed merge left the previous merged model whole");
    assert!(!temp_entries(&out).is_empty(), "the killed merge left its temporary copy");

    let o = run_ok(billion(&run("2")));
    assert!(common::stderr(&o).contains("removed 1 unfinished temporary"), "{}", common::stderr(&o));
    assert_ne!(weights(), first, "the rerun's merged model replaced the first");
    assert_eq!(temp_entries(&out), Vec::<String>::new());
    // What is at the final path is a whole model: it loads and runs.
    let gen = ["generate", "--model", merged.to_str().unwrap(), "--device", "cpu", "--prompt-ids", "1,2,3"];
    let g = common::billion(&[&gen[..], &["--max-tokens", "2"]].concat());
    assert!(g.status.success(), "{}", common::stderr(&g));
}

#[test]
fn killed_during_a_folder_merge_keeps_the_previous_merged_model() {
    let (dir, model) = workspace(23);
    killed_during_a_merge(&model, dir.path(), "merged", "model.safetensors");
}

#[test]
fn killed_during_a_gguf_merge_keeps_the_previous_merged_model() {
    let (dir, _) = workspace(24);
    let gguf = dir.path().join("tiny.gguf");
    write_llama_gguf(&gguf, &tiny_config(Architecture::Llama, 320), 24, GgmlDType::F32).unwrap();
    killed_during_a_merge(&gguf, dir.path(), "merged.gguf", "");
}

/// Every file of an adapter and a merged model is written 0644, whatever the umask (the tensors were 0600,
/// the configs 0644), and the adapter config records the dropout as given.
#[test]
fn outputs_are_0644_and_record_settings_as_given() {
    let (dir, model) = workspace(25);
    let w = dir.path();
    let out = w.join("out");
    let results = w.join("results.json");
    let mut c = billion(&args(&model, w, &out, &results, &["--max-steps", "1", "--merge", "--dropout", "0.05"]));
    // SAFETY: umask is async-signal-safe; only the child's mask changes.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        })
    };
    run_ok(c);
    let mut files = vec![];
    for dir in [out.clone(), out.join("merged")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().is_file() {
                files.push((e.path(), e.metadata().unwrap().permissions().mode() & 0o777));
            }
        }
    }
    assert!(files.len() >= 6, "{files:?}");
    for (path, mode) in &files {
        assert_eq!(*mode, 0o644, "{}: mode {mode:o}", path.display());
    }
    let cfg = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(cfg.contains(r#""lora_dropout": 0.05,"#), "{cfg}");
    let doc = std::fs::read_to_string(&results).unwrap();
    assert!(doc.contains(r#""dropout": 0.05,"#), "{doc}");
}
