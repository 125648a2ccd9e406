//! HumanEval: complete each prompt, then run prompt + completion + tests in a separate, constrained Python
//! process: fresh temporary folder, time limit with the whole process tree killed, address-space / CPU / file-size
//! / process limits, no network (a new network namespace where the OS allows), stdin closed, and destructive
//! standard-library calls disabled (as the reference harness's `reliability_guard` does).

use super::records::{HumanEvalRecord, ProblemRecord};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The usual stop sequences for HumanEval completions.
pub const STOP_SEQUENCES: [&str; 5] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"];

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

/// Problems from a .jsonl or .jsonl.gz file.
pub fn load_file(path: &Path) -> Result<Vec<Problem>> {
    let bytes = std::fs::read(path).with_context(|| format!("--humaneval-file: cannot read {}", path.display()))?;
    let text = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{}: corrupt gzip", path.display()))?;
        s
    } else {
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", path.display()))?
    };
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        out.push(
            serde_json::from_str(line)
                .with_context(|| format!("{}: line {} is not a HumanEval problem", path.display(), i + 1))?,
        );
    }
    if out.is_empty() {
        bail!("{}: no problems", path.display());
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", content = "error", rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    /// The last line of the error output.
    Failed(String),
    TimedOut,
}

#[derive(Debug, Clone)]
pub struct Sandbox {
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub file_bytes: u64,
    pub max_processes: u64,
    pub parallel: usize,
    pub python: String,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
            memory_bytes: 1 << 30,
            file_bytes: 16 << 20,
            max_processes: 64,
            parallel: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            python: "python3".into(),
        }
    }
}

/// The reference harness's guard, run before the program: no destructive file, process or network calls.
const GUARD: &str = r#"
import builtins, os, shutil, subprocess, sys, socket, faulthandler
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchown", "getcwd", "chdir", "lchflags", "lchmod"]:
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
socket.socket = None
builtins.exit = None
builtins.quit = None
for _mod in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
    sys.modules[_mod] = None
del _name, _mod
"#;

/// prompt + completion + "\n" + test + "\n" + "check(entry_point)".
pub fn check_program(p: &Problem, completion: &str) -> String {
    format!("{}{}\n{}\ncheck({})\n", p.prompt, completion, p.test, p.entry_point)
}

/// Inside new mount, PID and network namespaces: every mount read-only except the program's folder ($0).
const ISOLATE: &str = r#"mount --make-rprivate / && mount --bind "$0" "$0" || exit 97
for m in $(awk '{print $2}' /proc/self/mounts); do [ "$m" = "$0" ] || mount -o remount,bind,ro "$m" 2>/dev/null; done
shift; exec "$@""#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// Read-only filesystem but the program's folder, own PID and network namespaces.
    Full,
    /// Own PID and network namespaces.
    PidNet,
    /// Limits and the guard only (no namespaces allowed here).
    None,
}

fn isolation() -> Isolation {
    static LEVEL: std::sync::OnceLock<Isolation> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let ok = |args: &[&str]| {
            Command::new("unshare")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let probe = std::env::temp_dir();
        let probe = probe.to_string_lossy();
        if ok(&["--fork", "--pid", "--net", "--mount", "--kill-child", "--", "sh", "-c", ISOLATE, &probe, "x", "true"])
        {
            Isolation::Full
        } else if ok(&["--fork", "--pid", "--net", "--kill-child", "--", "true"]) {
            Isolation::PidNet
        } else {
            Isolation::None
        }
    })
}

impl Sandbox {
    /// Run one program; never returns an error for what the program does.
    pub fn run(&self, program: &str) -> Result<Outcome> {
        let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
        let script = dir.path().join("program.py");
        std::fs::write(&script, format!("{GUARD}\n{program}"))?;
        let err_path = dir.path().join("stderr.txt");
        // In a new PID namespace the program is init: when it dies or is killed, every process it started dies
        // too; a new network namespace has no way out; a private mount namespace makes the filesystem read-only.
        let dir_str = dir.path().to_string_lossy().into_owned();
        let mut cmd = match isolation() {
            Isolation::Full => {
                let mut c = Command::new("unshare");
                c.args([
                    "--fork",
                    "--pid",
                    "--net",
                    "--mount",
                    "--kill-child",
                    "--",
                    "sh",
                    "-c",
                    ISOLATE,
                    &dir_str,
                    "x",
                ]);
                c.args([&self.python, "-I", "-B"]);
                c
            }
            Isolation::PidNet => {
                let mut c = Command::new("unshare");
                c.args(["--fork", "--pid", "--net", "--kill-child", "--", &self.python, "-I", "-B"]);
                c
            }
            Isolation::None => {
                let mut c = Command::new(&self.python);
                c.args(["-I", "-B"]);
                c
            }
        };
        cmd.arg(&script)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?);
        let (mem, fsize, nproc, cpu) =
            (self.memory_bytes, self.file_bytes, self.max_processes, self.timeout.as_secs() + 1);
        // SAFETY: only async-signal-safe calls (setsid, setrlimit) between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::setsid();
                let set = |res, v: u64| {
                    let lim = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
                    libc::setrlimit(res, &lim);
                };
                set(libc::RLIMIT_AS, mem);
                set(libc::RLIMIT_CPU, cpu);
                set(libc::RLIMIT_FSIZE, fsize);
                set(libc::RLIMIT_NPROC, nproc);
                set(libc::RLIMIT_CORE, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", self.python))?;
        let pid = child.id() as i32;
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if Instant::now() >= deadline {
                // SAFETY: signalling the process group we created with setsid.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(match status {
            None => Outcome::TimedOut,
            Some(s) if s.success() => Outcome::Passed,
            Some(s) => {
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                use std::os::unix::process::ExitStatusExt;
                if last.is_empty() {
                    Outcome::Failed(match s.signal() {
                        Some(sig) => format!("killed by signal {sig}"),
                        None => format!("exit status {}", s.code().unwrap_or(-1)),
                    })
                } else {
                    Outcome::Failed(last)
                }
            }
        })
    }

    /// Run many programs, `parallel` at a time, keeping their order.
    pub fn run_all(&self, programs: &[String], progress: impl Fn() + Sync) -> Result<Vec<Outcome>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<Outcome>>>> =
            programs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..self.parallel.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= programs.len() {
                        break;
                    }
                    let r = self.run(&programs[i]);
                    *results[i].lock().expect("result slot") = Some(r);
                    progress();
                });
            }
        });
        results.into_iter().map(|m| m.into_inner().expect("result slot").expect("every program ran")).collect()
    }
}

/// The unbiased pass@k estimator: 1 − C(n−c, k) / C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    let mut prod = 1.0;
    for i in (n - c + 1)..=n {
        prod *= 1.0 - k as f64 / i as f64;
    }
    1.0 - prod
}

/// Score completions: `completions[i]` is (problem index, text) and `outcomes[i]` its sandbox outcome. Problems
/// without completions are left out; pass@1 is the mean over the rest, pass@10 the mean over those with at
/// least 10 completions (None when none has). `samples` and `temperature` are recorded as asked.
pub fn summarize(
    problems: &[Problem],
    completions: &[(usize, String)],
    outcomes: &[Outcome],
    samples: usize,
    temperature: f64,
) -> HumanEvalRecord {
    let mut per_problem = vec![];
    let mut pass1 = 0.0;
    let mut pass10 = vec![];
    for (pi, p) in problems.iter().enumerate() {
        let mine: Vec<(&String, &Outcome)> =
            completions.iter().zip(outcomes).filter(|((i, _), _)| *i == pi).map(|((_, c), o)| (c, o)).collect();
        if mine.is_empty() {
            continue;
        }
        let c = mine.iter().filter(|(_, o)| **o == Outcome::Passed).count();
        pass1 += pass_at_k(mine.len(), c, 1);
        if mine.len() >= 10 {
            pass10.push(pass_at_k(mine.len(), c, 10));
        }
        per_problem.push(ProblemRecord {
            task_id: p.task_id.clone(),
            samples: mine.len(),
            passed: c,
            outcomes: mine.iter().map(|(_, o)| (*o).clone()).collect(),
            completion: mine[0].0.clone(),
        });
    }
    let n = per_problem.len().max(1) as f64;
    HumanEvalRecord {
        problems: per_problem.len(),
        samples,
        temperature,
        pass_at_1: pass1 / n,
        pass_at_10: if pass10.is_empty() { None } else { Some(pass10.iter().sum::<f64>() / pass10.len() as f64) },
        per_problem,
        extra: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(id: &str) -> Problem {
        Problem {
            task_id: id.into(),
            prompt: String::new(),
            canonical_solution: String::new(),
            test: String::new(),
            entry_point: String::new(),
        }
    }

    #[test]
    fn pass_at_k_is_averaged_over_problems_with_completions() {
        let problems = [problem("t/0"), problem("t/1"), problem("t/2")];
        // t/0: 2 of 2 pass; t/1: none generated (interrupted); t/2: 1 of 2 passes.
        let completions: Vec<(usize, String)> =
            [(0, "a"), (0, "b"), (2, "c"), (2, "d")].iter().map(|(i, c)| (*i, c.to_string())).collect();
        let outcomes = [Outcome::Passed, Outcome::Passed, Outcome::Failed("E".into()), Outcome::Passed];
        let r = summarize(&problems, &completions, &outcomes, 2, 0.8);
        assert_eq!((r.problems, r.samples, r.temperature), (2, 2, 0.8));
        assert_eq!(r.pass_at_1, (1.0 + 0.5) / 2.0);
        assert_eq!(r.pass_at_10, None, "no problem has 10 completions");
        assert_eq!(r.per_problem.iter().map(|p| p.task_id.as_str()).collect::<Vec<_>>(), ["t/0", "t/2"]);
        let t2 = &r.per_problem[1];
        assert_eq!((t2.samples, t2.passed, t2.completion.as_str()), (2, 1, "c"));
        assert_eq!(t2.outcomes, [Outcome::Failed("E".into()), Outcome::Passed]);
    }

    #[test]
    fn pass_at_10_needs_ten_completions() {
        let problems = [problem("t/0"), problem("t/1")];
        let mut completions = vec![];
        let mut outcomes = vec![];
        for i in 0..12 {
            completions.push((0, format!("c{i}")));
            outcomes.push(if i < 3 { Outcome::Passed } else { Outcome::TimedOut });
        }
        completions.push((1, "only".into()));
        outcomes.push(Outcome::Passed);
        let r = summarize(&problems, &completions, &outcomes, 12, 1.0);
        assert_eq!(r.pass_at_10, Some(pass_at_k(12, 3, 10)), "only t/0 counts for pass@10");
        assert!((r.pass_at_1 - (0.25 + 1.0) / 2.0).abs() < 1e-12);
        // Nothing generated at all.
        let empty = summarize(&problems, &[], &[], 1, 0.0);
        assert_eq!((empty.problems, empty.pass_at_1, empty.pass_at_10), (0, 0.0, None));
    }
}
