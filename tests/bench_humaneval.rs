//! HumanEval execution: every canonical solution passes; wrong, raising, looping, forking, memory-hungry,
//! file-deleting and network-using completions fail or time out, and nothing outside the sandbox changes.

mod common;

use billion::bench::humaneval::{check_program, load_file, pass_at_k, Outcome, Problem, Sandbox};

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
    // Network.
    let net = run(
        "    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n    return a + b\n",
    );
    assert!(matches!(net, Outcome::Failed(_)), "{net:?}");
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
