//! Faults injected into real runs of the binary, each followed by a rerun that must finish with nothing lost
//! and no partial file taken for a whole one: downloads cut mid-file, answered with a server error or wrong
//! bytes, stalled by a silent hub, starved by a full disk or killed with SIGKILL; results writes starved by a
//! full disk or killed; and stdout closed under a running command.
//!
//! A full disk is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG the way
//! they fail with ENOSPC), which needs no privileges.

mod common;
#[path = "common/hub_server.rs"]
mod hub_server;

use hub_server::{sha256, HubEnv, TINY_REPO};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WEIGHTS: &str = "model.safetensors";

/// Let the command write files of at most `bytes` bytes, as if the disk filled there.
fn limit_file_size(cmd: &mut Command, bytes: u64) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
}

/// Wait until `ready` holds (polling), or fail after 20 s.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// No file in the cache passes for the weights unless it holds all of them: the snapshot link and every
/// finished blob are either absent or byte-identical to what the hub serves; only `.incomplete` files are
/// partial.
fn assert_no_partial_taken(e: &HubEnv) {
    let want = e.served(WEIGHTS);
    let link = e.snapshot().join(WEIGHTS);
    if link.exists() {
        assert_eq!(std::fs::read(&link).unwrap(), want, "the snapshot's {WEIGHTS} is whole");
    }
    let blob = e.repo_dir().join("blobs").join(sha256(&want));
    if blob.exists() {
        assert_eq!(std::fs::read(&blob).unwrap(), want, "the finished blob is whole");
    }
    for name in e.blobs() {
        if !name.ends_with(".incomplete") {
            let bytes = std::fs::read(e.repo_dir().join("blobs").join(&name)).unwrap();
            assert_eq!(sha256(&bytes)[..name.len().min(64)], name[..name.len().min(64)], "blob {name} is whole");
        }
    }
}

fn assert_weights_absent(e: &HubEnv) {
    assert!(!e.snapshot().join(WEIGHTS).exists(), "no {WEIGHTS} in the snapshot after a failed download");
    assert!(!e.repo_dir().join("blobs").join(sha256(&e.served(WEIGHTS))).exists(), "no finished blob");
    assert_no_partial_taken(e);
}

/// The rerun: succeeds, leaves no partial file, and `--verify` agrees with the hub.
fn rerun_completes(e: &HubEnv) {
    let out = e.run(&["download", TINY_REPO], &[]);
    assert!(out.status.success(), "rerun: {}", common::stderr(&out));
    assert_eq!(std::fs::read(e.snapshot().join(WEIGHTS)).unwrap(), e.served(WEIGHTS));
    assert!(e.blobs().iter().all(|n| !n.ends_with(".incomplete")), "{:?}", e.blobs());
    let verify = e.run(&["download", "--verify", TINY_REPO], &[]);
    assert!(verify.status.success(), "{}", common::stderr(&verify));
}

#[test]
fn download_cut_mid_file_resumes_on_the_rerun() {
    let e = HubEnv::new();
    e.hub.state.lock().unwrap().drop_once.insert(WEIGHTS.into());
    let out = e.run(&["download", TINY_REPO], &[("BILLION_HUB_RETRIES", "0")]);
    assert!(!out.status.success(), "the first run is cut off");
    assert!(common::stderr(&out).contains("next run resumes"), "{}", common::stderr(&out));
    assert_weights_absent(&e);
    assert!(e.blobs().iter().any(|n| n.ends_with(".incomplete")), "the partial file is kept for resuming");
    rerun_completes(&e);
    assert!(e.hub.saw_range_for(WEIGHTS), "the rerun asked for the rest with Range");
}

#[test]
fn wrong_sha256_is_refused_and_the_rerun_gets_the_right_bytes() {
    let e = HubEnv::new();
    e.hub.state.lock().unwrap().corrupt.insert(WEIGHTS.into());
    let out = e.run(&["download", TINY_REPO], &[]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("checksum mismatch for model.safetensors") && err.contains("expected sha256"), "{err}");
    assert_weights_absent(&e);
    assert!(!e.blobs().iter().any(|n| n.ends_with(".incomplete")), "the wrong bytes are deleted: {:?}", e.blobs());
    assert_eq!(e.hub.requests_for(WEIGHTS), 2, "retried once");
    e.hub.state.lock().unwrap().corrupt.clear();
    rerun_completes(&e);
}

#[test]
fn server_errors_are_retried_then_reported() {
    let e = HubEnv::new();
    // A passing 503 is retried within the run.
    e.hub.state.lock().unwrap().fail_status.insert(WEIGHTS.into(), (503, 1));
    let out = e.run(&["download", TINY_REPO], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(e.hub.requests_for(WEIGHTS), 2);
    assert_no_partial_taken(&e);

    // A lasting 500 ends the run with the status named; the rerun after the hub recovers completes.
    let e = HubEnv::new();
    e.hub.state.lock().unwrap().fail_status.insert(WEIGHTS.into(), (500, 1000));
    let out = e.run(&["download", TINY_REPO], &[("BILLION_HUB_RETRIES", "1")]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("HTTP 500") && err.contains(WEIGHTS), "{err}");
    assert_eq!(e.hub.requests_for(WEIGHTS), 2, "one retry");
    assert_weights_absent(&e);
    e.hub.state.lock().unwrap().fail_status.clear();
    rerun_completes(&e);
}

#[test]
fn a_stalled_hub_times_out_with_a_clear_error() {
    let e = HubEnv::new();
    e.hub.state.lock().unwrap().stall.insert(WEIGHTS.into());
    let start = Instant::now();
    let out = e.run(&["download", TINY_REPO], &[("BILLION_HUB_TIMEOUT_S", "1"), ("BILLION_HUB_RETRIES", "1")]);
    let took = start.elapsed();
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("sent nothing for 1 s") && err.contains("BILLION_HUB_TIMEOUT_S"), "{err}");
    assert!(took < Duration::from_secs(15), "two 1 s timeouts took {took:?}");
    assert_weights_absent(&e);
    e.hub.state.lock().unwrap().stall.clear();
    rerun_completes(&e);
}

#[test]
fn disk_full_during_a_download() {
    let e = HubEnv::new();
    let size = e.served(WEIGHTS).len() as u64;
    let mut cmd = e.command(&["download", TINY_REPO], &[]);
    limit_file_size(&mut cmd, size / 3);
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the disk filled");
    let err = common::stderr(&out);
    assert!(err.contains("cannot write") && err.contains("File too large"), "{err}");
    assert_weights_absent(&e);
    rerun_completes(&e);
}

#[test]
fn sigkill_during_a_download() {
    let e = HubEnv::new();
    e.hub.state.lock().unwrap().slow.insert(WEIGHTS.into(), (4096, Duration::from_millis(25)));
    let mut child = e.command(&["download", TINY_REPO], &[]).stderr(Stdio::null()).spawn().unwrap();
    // The weights' own partial blob (a small file's partial could also be on disk for a moment).
    let partial = e.repo_dir().join("blobs").join(format!("{}.incomplete", sha256(&e.served(WEIGHTS))));
    wait_for("part of the weights on disk", || std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_weights_absent(&e);
    e.hub.state.lock().unwrap().slow.clear();
    rerun_completes(&e);
    assert!(e.hub.saw_range_for(WEIGHTS), "the rerun resumed the killed download");
}

/// Two tiny GGUF models and a results folder for `bench --speed` runs.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
        for (i, name) in ["first.gguf", "second.gguf"].iter().enumerate() {
            let path = dir.path().join(name);
            billion::testing::write_llama_gguf(&path, &cfg, i as u64, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        }
        Bench { dir }
    }

    fn results(&self) -> PathBuf {
        self.dir.path().join("results")
    }

    fn json(&self) -> PathBuf {
        self.results().join("benchmark_results.json")
    }

    fn command(&self, model: &str) -> Command {
        let model = self.dir.path().join(model);
        let mut c = Command::new(env!("CARGO_BIN_EXE_billion"));
        c.args(["bench", "--models", model.to_str().unwrap(), "--speed", "-p", "8", "-n", "4", "-r", "1"]).args([
            "--device",
            "cpu",
            "--results-dir",
            self.results().to_str().unwrap(),
        ]);
        c
    }

    fn run(&self, model: &str) {
        let out = self.command(model).output().unwrap();
        assert!(out.status.success(), "bench {model}: {}", common::stderr(&out));
    }

    fn models_in_results(&self) -> Vec<String> {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(self.json()).unwrap()).unwrap();
        let mut names: Vec<String> = doc["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Path::new(m["name"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn temp_files(&self) -> Vec<String> {
        std::fs::read_dir(self.results())
            .unwrap()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }
}

#[test]
fn disk_full_during_a_results_write() {
    let b = Bench::new();
    b.run("first.gguf");
    let before = std::fs::read(b.json()).unwrap();
    // The second model's results make the file bigger than the disk now allows.
    let mut cmd = b.command("second.gguf");
    limit_file_size(&mut cmd, before.len() as u64);
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the results did not fit");
    let err = common::stderr(&out);
    assert!(err.contains("benchmark_results.json") && err.contains("File too large"), "{err}");
    assert_eq!(std::fs::read(b.json()).unwrap(), before, "the earlier results are intact");
    assert!(b.temp_files().is_empty(), "no temporary file left: {:?}", b.temp_files());
    b.run("second.gguf");
    assert_eq!(b.models_in_results(), ["first.gguf", "second.gguf"], "nothing lost");
}

#[test]
fn sigkill_during_a_results_write() {
    let b = Bench::new();
    b.run("first.gguf");
    let before = std::fs::read(b.json()).unwrap();
    let mut child =
        b.command("second.gguf").env("BILLION_WRITE_PAUSE_MS", "20000").stderr(Stdio::null()).spawn().unwrap();
    wait_for("the results half written", || !b.temp_files().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(b.json()).unwrap(), before, "the results file is the earlier whole one");
    b.run("second.gguf");
    assert_eq!(b.models_in_results(), ["first.gguf", "second.gguf"], "nothing lost");
    assert!(b.temp_files().is_empty(), "the killed writer's temporary file is cleaned up: {:?}", b.temp_files());
}

/// Run `billion ARGS` with stdout's reader gone before it writes; returns (status code, stderr).
fn with_closed_stdout(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // A pipe whose read end is closed before the child starts: its first write fails, every time.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), common::stderr(&out))
}

#[test]
fn closed_stdout_ends_quietly() {
    let home = tempfile::tempdir().unwrap();
    let env = [("HF_HOME", home.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let (code, err) = with_closed_stdout(&["download", "--list", "--json"], &env);
    assert_eq!(code, Some(billion::util::CLOSED_STDOUT_EXIT), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");

    let b = Bench::new();
    let model = b.dir.path().join("first.gguf");
    let model = model.to_str().unwrap();
    for args in [
        vec!["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-tokens", "16"],
        vec!["generate", "--model", model, "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json"],
        vec!["info", "--model", model],
        vec!["info", "--model", model, "--json"],
        vec!["download", "--list"],
    ] {
        // Each of these writes to stdout, so each meets the closed pipe and ends with the quiet status.
        let (code, err) = with_closed_stdout(&args, &env);
        assert_eq!(code, Some(billion::util::CLOSED_STDOUT_EXIT), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    }
}
