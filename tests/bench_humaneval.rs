//! HumanEval execution: every canonical solution passes; wrong, raising, looping, forking, memory-hungry,
//! file-deleting and network-using completions fail or time out, and nothing outside the sandbox changes. The
//! isolation itself is tested with raw calls that the Python guard does not stop: reads of files outside, raw
//! sockets to a listener on the host's loopback, creating and deleting files through libc, and the file-size
//! and process limits.

mod common;

use billion::bench::humaneval::{
    check_program, instruct_program, isolation, load_file, pass_at_k, Isolation, Outcome, Problem, Sandbox,
};

#[test]
fn canonical_solutions_all_pass() {
    let Some(file) = common::shared("data/humaneval/HumanEval.jsonl.gz") else { return };
    let problems = load_file(&file).unwrap();
    assert_eq!(problems.len(), 164);
    let programs: Vec<String> = problems.iter().map(|p| check_program(p, &p.canonical_solution)).collect();
    let outcomes = Sandbox::default().run_all(&programs, || {}).unwrap();
    let failed: Vec<String> = problems
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o != Outcome::Passed)
        .map(|(p, o)| format!("{}: {o:?}", p.task_id))
        .collect();
    assert!(failed.is_empty(), "{} of 164 canonical solutions did not pass:\n{}", failed.len(), failed.join("\n"));
}

fn problem() -> Problem {
    Problem {
        task_id: "t/0".into(),
        prompt: "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n".into(),
        canonical_solution: "    return a + b\n".into(),
        test: "def check(candidate):\n    assert candidate(2, 3) == 5\n".into(),
        entry_point: "add".into(),
    }
}

#[test]
fn hostile_completions_fail_and_change_nothing_outside() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("keep.txt");
    std::fs::write(&victim, "precious").unwrap();
    let v = victim.display().to_string();
    let marker = format!("bx{}", std::process::id() % 1_000_000);
    let sb = Sandbox { timeout: std::time::Duration::from_secs(3), ..Default::default() };
    let run = |completion: &str| sb.run(&check_program(&problem(), completion)).unwrap();

    assert_eq!(run("    return a + b\n"), Outcome::Passed);
    assert!(matches!(run("    return a - b\n"), Outcome::Failed(e) if e.contains("AssertionError")));
    assert!(matches!(run("    raise ValueError('nope')\n"), Outcome::Failed(e) if e.contains("ValueError: nope")));
    assert_eq!(run("    while True:\n        pass\n"), Outcome::TimedOut);
    // Without a limit this would take 10 GB; the address-space limit makes it fail at once.
    let mem = run("    x = []\n    while True:\n        x.append(' ' * 10**10)\n");
    assert!(matches!(&mem, Outcome::Failed(e) if e.contains("MemoryError")), "{mem:?}");
    // Deleting or overwriting files outside the sandbox.
    for attack in [
        format!("    import os\n    os.remove({v:?})\n    return a + b\n"),
        format!("    import shutil\n    shutil.rmtree({:?})\n    return a + b\n", outside.path().display().to_string()),
        format!("    open({v:?}, 'w').write('gone')\n    return a + b\n"),
    ] {
        let o = run(&attack);
        assert!(matches!(o, Outcome::Failed(_)), "{attack}: {o:?}");
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "nothing outside the sandbox changed");
    // Processes that outlive the program: forked with ctypes (past the guard) and left sleeping.
    // Each child renames itself (PR_SET_NAME) so it can be found in /proc afterwards.
    let fork = format!(
        "    import ctypes, time\n    libc = ctypes.CDLL(None)\n    for _ in range(20):\n        if libc.fork() == 0:\n            libc.prctl(15, b'{marker}', 0, 0, 0)\n            time.sleep(600)\n    while True:\n        pass\n"
    );
    assert_eq!(run(&fork), Outcome::TimedOut);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let survivors = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .filter(|c| c.trim() == marker)
        .count();
    assert_eq!(survivors, 0, "every process of the sandbox was killed");
}

#[test]
fn pass_at_k_is_the_unbiased_estimator() {
    assert_eq!(pass_at_k(1, 1, 1), 1.0);
    assert_eq!(pass_at_k(1, 0, 1), 0.0);
    assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
    // 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
    assert_eq!(pass_at_k(10, 8, 5), 1.0);
}

/// The sandbox's isolation: run as root on Linux it must be a root of its own; elsewhere the isolation tests
/// say so and skip.
fn full_isolation() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let level = isolation("python3");
    if root {
        assert!(
            matches!(level, Isolation::NewRoot { .. }),
            "running as root, the sandbox should get its own root: {level:?}"
        );
        true
    } else {
        eprintln!("skipping: not root, the sandbox runs with {level:?}");
        false
    }
}

fn sandbox() -> Sandbox {
    Sandbox { timeout: std::time::Duration::from_secs(5), ..Default::default() }
}

/// A program that passes the check only if `body` (run first, at the top level of the function) does not raise.
fn attempt(body: &str) -> String {
    let mut completion = String::new();
    for line in body.lines() {
        completion.push_str(&format!("    {line}\n"));
    }
    completion.push_str("    return a + b\n");
    check_program(&problem(), &completion)
}

#[test]
fn files_outside_the_sandbox_cannot_be_read() {
    if !full_isolation() {
        return;
    }
    let secret =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sandbox-secret-{}", std::process::id()));
    std::fs::write(&secret, "secret").unwrap();
    let sb = sandbox();
    for path in ["/etc/passwd", secret.to_str().unwrap(), "/root", "/home", env!("CARGO_MANIFEST_DIR")] {
        let read = format!("import os\np = {path:?}\nprint(os.listdir(p) if os.path.isdir(p) else open(p).read())");
        let o = sb.run(&attempt(&read)).unwrap();
        assert!(matches!(&o, Outcome::Failed(e) if e.contains("No such file or directory")), "{path}: {o:?}");
    }
    std::fs::remove_file(&secret).unwrap();
    // Its own folder is writable and the interpreter's modules load.
    let own = "import hashlib, json, os\nopen('out.txt', 'w').write('x')\nassert os.listdir('.') and hashlib.md5(b'').hexdigest()";
    assert_eq!(sb.run(&attempt(own)).unwrap(), Outcome::Passed);
}

#[test]
fn the_filesystem_is_read_only_to_raw_calls() {
    if !full_isolation() {
        return;
    }
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("keep.txt");
    std::fs::write(&victim, "precious").unwrap();
    let sb = sandbox();
    // Past the guard: os.open and libc's unlink/open (the guard removes only os.remove, os.unlink, …).
    let attacks = [
        format!("import os\nos.close(os.open({:?}, os.O_CREAT | os.O_WRONLY))", outside.path().join("new").display().to_string()),
        format!("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.unlink({:?}.encode()) != 0: raise OSError(ctypes.get_errno(), 'unlink')", victim.display().to_string()),
        "import os\nos.close(os.open('/usr/lib/sandbox-probe', os.O_CREAT | os.O_WRONLY))".to_string(),
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.open(b'/sandbox-probe', 0o101, 0o644) < 0: raise OSError(ctypes.get_errno(), 'open')".to_string(),
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.mount(b'none', b'/usr', b'tmpfs', 0, None) != 0: raise OSError(ctypes.get_errno(), 'mount')".to_string(),
    ];
    for a in &attacks {
        let o = sb.run(&attempt(a)).unwrap();
        assert!(matches!(&o, Outcome::Failed(e) if e.contains("Error")), "{a}: {o:?}");
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!outside.path().join("new").exists() && !std::path::Path::new("/usr/lib/sandbox-probe").exists());
}

#[test]
fn no_network_even_to_the_hosts_loopback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // _socket is the C module under socket.socket, which the guard removes.
    let connect = format!("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))");
    // The same code outside the sandbox connects.
    let outside = std::process::Command::new("python3").args(["-c", &connect]).output().unwrap();
    assert!(outside.status.success(), "{}", String::from_utf8_lossy(&outside.stderr));
    if matches!(isolation("python3"), Isolation::LimitsOnly) {
        eprintln!("skipping: no network namespace here");
        return;
    }
    let o = sandbox().run(&attempt(&connect)).unwrap();
    // In its own network namespace the host's loopback does not exist: the connect itself fails.
    let refused = |e: &str| e.contains("Network is unreachable") || e.contains("Connection refused");
    assert!(matches!(&o, Outcome::Failed(e) if refused(e)), "{o:?}");
}

#[test]
fn file_size_and_process_limits_hold() {
    if !full_isolation() {
        return;
    }
    let sb = sandbox();
    // 16 MiB per file: 1 MiB is fine, 17 MiB is refused.
    let write = |mib: usize| format!("with open('big', 'wb') as f:\n    f.write(b'x' * ({mib} << 20))");
    assert_eq!(sb.run(&attempt(&write(1))).unwrap(), Outcome::Passed);
    let big = sb.run(&attempt(&write(17))).unwrap();
    assert!(matches!(&big, Outcome::Failed(e) if e.contains("File too large")), "{big:?}");
    // 64 processes: forks past the guard are refused before 64 (the children wait, then exit).
    let forks = "import ctypes, time\nlibc = ctypes.CDLL(None)\nfor n in range(200):\n    pid = libc.fork()\n    if pid == 0:\n        time.sleep(1)\n        libc._exit(0)\n    if pid < 0:\n        raise RuntimeError(f'fork refused after {n}')";
    let o = sb.run(&attempt(forks)).unwrap();
    let refused_after = match &o {
        Outcome::Failed(e) if e.contains("fork refused after") => e.rsplit(' ').next().unwrap().parse::<u64>().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(refused_after < sb.max_processes, "{refused_after}");
}

#[test]
fn instruct_replies_run_against_the_original_prompt() {
    let sb = sandbox();
    let p = problem();
    let replies = [
        ("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nThis returns the sum.", Outcome::Passed),
        ("```python\nreturn a + b\n```", Outcome::Passed),
        ("    return a + b\n", Outcome::Passed),
        ("The answer is a + b.", Outcome::Failed(String::new())),
    ];
    for (reply, want) in replies {
        let o = sb.run(&instruct_program(&p, reply)).unwrap();
        assert_eq!(std::mem::discriminant(&o), std::mem::discriminant(&want), "{reply:?}: {o:?}");
    }
}
