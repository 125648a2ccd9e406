//! HumanEval: complete each prompt, then run prompt + completion + tests in a separate, constrained Python
//! process. Where the machine allows it (root, Linux namespaces) the program runs in a root of its own that
//! holds only the interpreter's files (read-only) and the program's folder, as an unprivileged user without
//! capabilities, in new PID and network namespaces; everywhere: a time limit with the whole process tree
//! killed, address-space / CPU / file-size / process limits, stdin closed, and destructive standard-library
//! calls disabled (as the reference harness's `reliability_guard` does).
//!
//! Two ways to ask: `base` continues the prompt as the paper's harness does; `instruct` (for chat models, as
//! evalplus and bigcode-evaluation-harness ask instruction-tuned models) sends the prompt as a chat message,
//! takes the code of the reply's first fenced block and completes the function against the original prompt.

use super::records::{HumanEvalRecord, ProblemRecord};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
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

/// The most a problems file may inflate to.
const MAX_INFLATED_BYTES: u64 = 256 << 20;

/// Problems from a .jsonl or .jsonl.gz file.
pub fn load_file(path: &Path) -> Result<Vec<Problem>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    if !gzip && path.extension().is_some_and(|e| e == "gz") {
        bail!("{}: not a gzip file (the name ends in .gz but the content does not start like gzip)", path.display());
    }
    let text = if gzip {
        // HumanEval is ~0.2 MB inflated; a cap keeps a hostile file (a gzip bomb) from taking the memory.
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .take(MAX_INFLATED_BYTES + 1)
            .read_to_string(&mut s)
            .with_context(|| format!("{}: corrupt gzip", path.display()))?;
        if s.len() as u64 > MAX_INFLATED_BYTES {
            bail!("{}: decompresses to more than {} MiB", path.display(), MAX_INFLATED_BYTES >> 20);
        }
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

/// prompt + completion + "\n" + test + "\n" + "check(entry_point)".
pub fn check_program(p: &Problem, completion: &str) -> String {
    format!("{}{}\n{}\ncheck({})\n", p.prompt, completion, p.test, p.entry_point)
}

/// The user message of instruct mode (evalplus's instruction): the prompt in a code block.
pub fn instruct_message(p: &Problem) -> String {
    format!(
        "Please provide a self-contained Python script that solves the following problem in a markdown code block:\n```python\n{}\n```\n",
        p.prompt.trim()
    )
}

/// The code of a chat reply: its first fenced block (to the closing fence, or to the end when the reply was cut
/// short), or the whole reply when it has none.
pub fn extract_code(reply: &str) -> String {
    let Some(open) = reply.find("```") else { return reply.to_string() };
    // The fence line's info string ("python", "py", …) is not code.
    let after = &reply[open + 3..];
    let body = match after.find('\n') {
        Some(nl) => &after[nl + 1..],
        None => return String::new(),
    };
    // The closing fence: the first line that starts with ``` (or the end of a reply cut short).
    let mut end = body.len();
    let mut at = 0;
    for line in body.split_inclusive('\n') {
        if line.trim_start().starts_with("```") {
            end = at;
            break;
        }
        at += line.len();
    }
    body[..end].to_string()
}

/// Does `code` define the function `name` at the top level?
pub fn defines(code: &str, name: &str) -> bool {
    code.lines().any(|l| {
        let l = l.strip_prefix("async ").unwrap_or(l);
        l.strip_prefix("def ")
            .is_some_and(|rest| rest.trim_start().strip_prefix(name).is_some_and(|r| r.trim_start().starts_with('(')))
    })
}

/// The program of an instruct-mode reply. When the reply's code defines the entry point it follows the whole
/// prompt (whose imports and helper functions it may use; its definition replaces the prompt's stub). Otherwise
/// the code completes the prompt's function as a base completion does (indented into its body when the reply
/// gave it at the top level).
pub fn instruct_program(p: &Problem, reply: &str) -> String {
    let code = extract_code(reply);
    if defines(&code, &p.entry_point) {
        return format!("{}\n{}\n\n{}\ncheck({})\n", p.prompt, code.trim_end(), p.test, p.entry_point);
    }
    let at_top_level = code.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| !l.starts_with([' ', '\t']));
    let body = if at_top_level {
        code.lines()
            .map(|l| if l.trim().is_empty() { String::new() } else { format!("    {l}") })
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        code
    };
    check_program(p, &body)
}

#[derive(Debug, Clone)]
pub struct Sandbox {
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub file_bytes: u64,
    pub max_processes: u64,
    pub parallel: usize,
    /// The interpreter, looked up on the sandbox's PATH (/usr/local/bin:/usr/bin:/bin) unless a path.
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

/// The PATH programs run with.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Run inside new mount, PID and network namespaces (as root): a new root on a small tmpfs with the system's
/// library folders and the interpreter's prefixes bound read-only, the program's folder ($1) bound writable,
/// /dev's harmless devices, then pivot_root, the old root detached, the new root read-only, and the program
/// started as user $3 with no capabilities and no way to gain any. $2 is the mount point of the new root; the
/// arguments up to `--` are extra read-only folders; the rest is the command.
const NEW_ROOT: &str = r#"set -e
W="$1"; R="$2"; U="$3"; shift 3
PROGRAM_PATH="$PATH"; PATH="/usr/sbin:/sbin:$PATH"
mount --make-rprivate /
mount -t tmpfs -o size=1m,mode=755 sandbox-root "$R"
bind_ro() { mkdir -p "$R$1"; mount -o bind,ro "$1" "$R$1"; }
for d in /usr /lib /lib32 /lib64 /libx32 /bin /sbin; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"; elif [ -d "$d" ]; then bind_ro "$d"; fi
done
while [ "$1" != "--" ]; do bind_ro "$1"; shift; done; shift
mkdir -p "$R/etc" "$R/dev" "$R/proc" "$R/.old" "$R$W"
if [ -f /etc/ld.so.cache ]; then touch "$R/etc/ld.so.cache"; mount --bind /etc/ld.so.cache "$R/etc/ld.so.cache"; fi
for f in null zero random urandom; do touch "$R/dev/$f"; mount --bind "/dev/$f" "$R/dev/$f"; done
mount --bind "$W" "$R$W"
mount -t proc proc "$R/proc"
cd "$R"
pivot_root . .old
umount -l /.old
umount /proc
rmdir /.old /proc
mount -o remount,bind,ro /
cd "$W"
PATH="$PROGRAM_PATH"
exec setpriv --reuid="$U" --regid="$U" --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@""#;

/// How far programs are isolated on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// A root of its own (see [`NEW_ROOT`]), an unprivileged user, own PID and network namespaces. `python` is
    /// the interpreter's real path, `prefixes` the folders besides the system's that it needs.
    NewRoot { python: PathBuf, prefixes: Vec<PathBuf> },
    /// Own PID and network namespaces, the whole filesystem visible.
    PidNet,
    /// Resource limits and the guard only (no namespaces allowed here).
    LimitsOnly,
}

impl Isolation {
    /// For the results.
    pub fn describe(&self) -> &'static str {
        match self {
            Isolation::NewRoot { .. } => "own root (interpreter read-only), unprivileged user, no network, own PIDs",
            Isolation::PidNet => "no network, own PIDs, whole filesystem visible",
            Isolation::LimitsOnly => "resource limits and the Python guard only",
        }
    }
}

/// Folders the new root has in any case.
const SYSTEM_DIRS: [&str; 7] = ["/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin"];

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.env_clear().env("PATH", SANDBOX_PATH).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null())
}

/// The interpreter's real path and the folders it reads (its prefixes) outside the system folders.
fn interpreter(python: &str) -> Option<(PathBuf, Vec<PathBuf>)> {
    let out = Command::new(python)
        .args([
            "-I",
            "-c",
            "import os, sys\nfor p in (sys.executable, sys.base_prefix, sys.prefix): print(os.path.realpath(p))",
        ])
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines().map(PathBuf::from);
    let exe = lines.next()?;
    let system = |p: &Path| SYSTEM_DIRS.iter().any(|d| p.starts_with(d));
    let mut prefixes: Vec<PathBuf> = vec![];
    for p in lines.chain(exe.parent().map(Path::to_path_buf)) {
        if !system(&p) && p.is_dir() && !prefixes.iter().any(|q| p.starts_with(q)) {
            prefixes.retain(|q| !q.starts_with(&p));
            prefixes.push(p);
        }
    }
    Some((exe, prefixes))
}

/// The isolation available for `python`, probed once per interpreter.
pub fn isolation(python: &str) -> Isolation {
    static LEVELS: OnceLock<Mutex<Vec<(String, Isolation)>>> = OnceLock::new();
    let levels = LEVELS.get_or_init(|| Mutex::new(vec![]));
    let mut known = levels.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, level)) = known.iter().find(|(p, _)| p == python) {
        return level.clone();
    }
    let level = probe(python);
    known.push((python.to_string(), level.clone()));
    level
}

fn probe(python: &str) -> Isolation {
    if let Some((exe, prefixes)) = interpreter(python) {
        let dir = tempfile::tempdir().ok();
        let works = dir.as_ref().is_some_and(|d| {
            let cmd = SandboxDir::new(d.path(), next_uid()).and_then(|s| s.new_root_command(&exe, &prefixes));
            cmd.is_ok_and(|mut cmd| quiet(cmd.args(["-I", "-c", "pass"])).status().is_ok_and(|st| st.success()))
        });
        if works {
            return Isolation::NewRoot { python: exe, prefixes };
        }
    }
    let pid_net = quiet(Command::new("unshare").args(["--fork", "--pid", "--net", "--kill-child", "--", "true"]))
        .status()
        .is_ok_and(|s| s.success());
    if pid_net {
        Isolation::PidNet
    } else {
        Isolation::LimitsOnly
    }
}

/// A user id of its own for each program (so the process limit counts only its processes), far above any
/// account's.
fn next_uid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (1 << 30) + (std::process::id().wrapping_mul(4096).wrapping_add(n) % (1 << 29))
}

/// One program's folders: `work` (the program, its cwd, HOME and TMPDIR; the only writable place) and `root`
/// (where its new root is mounted), inside one temporary folder.
/// Programs running right now (process group, temporary folder), so that a forced quit can end them and
/// remove their folders instead of leaving them to their timeouts.
static RUNNING: std::sync::Mutex<Vec<(i32, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// One entry of [`RUNNING`] for as long as its program runs.
struct Running(i32);

impl Running {
    fn register(pgid: i32, dir: &Path) -> Self {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).push((pgid, dir.to_path_buf()));
        Running(pgid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _)| *p != self.0);
    }
}

/// End every program still running (their whole process groups) and remove their folders: for a quit that
/// will not wait for them (a second Ctrl-C).
pub fn kill_running_programs() {
    let running = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for (pgid, dir) in running {
        // SAFETY: signalling a process group this process created with setsid.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(dir);
    }
}

struct SandboxDir {
    work: PathBuf,
    root: PathBuf,
    uid: u32,
}

impl SandboxDir {
    fn new(base: &Path, uid: u32) -> Result<Self> {
        let (work, root) = (base.join("work"), base.join("root"));
        std::fs::create_dir(&work)?;
        std::fs::create_dir(&root)?;
        Ok(Self { work, root, uid })
    }

    /// Give the work folder to the program's user (only root can, and only the new root needs it).
    fn hand_over(&self) -> Result<()> {
        std::os::unix::fs::chown(&self.work, Some(self.uid), Some(self.uid))
            .with_context(|| format!("cannot give {} to the sandbox user", self.work.display()))
    }

    fn new_root_command(&self, python: &Path, prefixes: &[PathBuf]) -> Result<Command> {
        self.hand_over()?;
        let mut c = Command::new("unshare");
        c.args(["--fork", "--pid", "--net", "--mount", "--kill-child", "--", "sh", "-c", NEW_ROOT, "sandbox"]);
        c.arg(&self.work).arg(&self.root).arg(self.uid.to_string());
        c.args(prefixes).arg("--").arg(python);
        Ok(c)
    }
}

impl Sandbox {
    /// How far this sandbox isolates programs here.
    pub fn isolation(&self) -> Isolation {
        isolation(&self.python)
    }

    /// Run one program; never returns an error for what the program does.
    pub fn run(&self, program: &str) -> Result<Outcome> {
        let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
        let sd = SandboxDir::new(dir.path(), next_uid()).context("cannot create the sandbox's folders")?;
        let script = sd.work.join("program.py");
        std::fs::write(&script, format!("{GUARD}\n{program}"))?;
        // Outside the program's folder, so the program cannot replace it.
        let err_path = dir.path().join("stderr.txt");
        // In a new PID namespace the program is init: when it dies or is killed, every process it started dies
        // too; a new network namespace has no way out; a new root shows only the interpreter and the program.
        let mut cmd = match self.isolation() {
            Isolation::NewRoot { python, prefixes } => sd.new_root_command(&python, &prefixes)?,
            Isolation::PidNet => {
                let mut c = Command::new("unshare");
                c.args(["--fork", "--pid", "--net", "--kill-child", "--", &self.python]);
                c
            }
            Isolation::LimitsOnly => Command::new(&self.python),
        };
        cmd.args(["-I", "-B"])
            .arg(&script)
            .current_dir(&sd.work)
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .env("HOME", &sd.work)
            .env("TMPDIR", &sd.work)
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
        let _running = Running::register(pid, dir.path());
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
        let never = AtomicBool::new(false);
        Ok(self.run_until(programs, &never, progress)?.into_iter().map(|o| o.expect("ran without a stop")).collect())
    }

    /// Like [`Sandbox::run_all`], but no program starts once `stop` is set: those left are `None` (the ones
    /// running finish, within their time limit).
    pub fn run_until(
        &self,
        programs: &[String],
        stop: &AtomicBool,
        progress: impl Fn() + Sync,
    ) -> Result<Vec<Option<Outcome>>> {
        let next = AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Result<Outcome>>>> = programs.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..self.parallel.max(1) {
                s.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= programs.len() {
                        break;
                    }
                    let r = self.run(&programs[i]);
                    *results[i].lock().expect("result slot") = Some(r);
                    progress();
                });
            }
        });
        results.into_iter().map(|m| m.into_inner().expect("result slot").transpose()).collect()
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
/// least 10 completions (None when none has). `samples` and `temperature` are recorded as asked; the caller
/// adds the mode, the sandbox and whether it was interrupted.
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
        ..Default::default()
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

    #[test]
    fn code_comes_from_the_first_fenced_block() {
        let reply = "Sure! Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds.\n```\nprint(1)\n```";
        assert_eq!(extract_code(reply), "def add(a, b):\n    return a + b\n");
        assert_eq!(extract_code("```\nx = 1\n"), "x = 1\n", "a reply cut short keeps what it has");
        assert_eq!(extract_code("    return a + b\n"), "    return a + b\n", "no block: the whole reply");
        assert_eq!(extract_code("```py\n  y = 2\n  ```\n"), "  y = 2\n", "an indented closing fence");
        assert!(defines("import math\ndef add(a, b):\n    pass", "add"));
        assert!(defines("async def  add (a):", "add"));
        assert!(!defines("def adder(a, b):", "add") && !defines("    def add(a):", "add"));
    }

    #[test]
    fn instruct_programs_complete_the_prompt() {
        let p = Problem {
            task_id: "t/0".into(),
            prompt: "import math\n\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n".into(),
            canonical_solution: String::new(),
            test: "def check(candidate):\n    assert candidate(2, 3) == 5\n".into(),
            entry_point: "add".into(),
        };
        let whole = instruct_program(&p, "```python\ndef add(a, b):\n    return math.floor(a + b)\n```\nDone.");
        assert!(whole.starts_with(&p.prompt), "the prompt's imports come first: {whole}");
        assert!(whole.contains("\ndef add(a, b):\n    return math.floor(a + b)\n") && whole.ends_with("check(add)\n"));
        assert!(!whole.contains("Done."));
        // A body given at the top level is indented into the function.
        let body = instruct_program(&p, "```python\nreturn a + b\n```");
        assert_eq!(body, check_program(&p, "    return a + b"));
        assert!(instruct_message(&p).contains("```python\nimport math\n\ndef add(a, b):"));
    }

    #[test]
    fn a_gz_name_without_gzip_content_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("HumanEval.jsonl.gz");
        std::fs::write(&path, "{\"task_id\": 1}\n").unwrap();
        let e = load_file(&path).unwrap_err().to_string();
        assert!(e.contains("not a gzip file"), "{e}");
    }
}
