//! `billion chat`: template renders equal transformers' own, scripted multi-turn on a real model, KV reuse
//! equals a fresh prefill, and an interactive session through a pseudo-terminal.

mod common;

use billion::chat::template::{ChatTemplate, Message};
use billion::chat::ChatSession;
use billion::generation::{sampling::SamplingParams, GenerateParams};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

fn template_for(name: &str) -> Option<ChatTemplate> {
    let fixtures = common::shared("fixtures")?;
    Some(match name {
        "tinyllama" | "llama3" => {
            let dir = fixtures.join("tokenizers").join(name);
            let s = billion::tokenizer::SpecialTokens::from_dir(&dir).unwrap();
            ChatTemplate::new(s.chat_template, s.bos_token, s.eos_token)
        }
        "smollm2" => ChatTemplate::new(
            Some(std::fs::read_to_string(fixtures.join("chat-templates/smollm2_chat_template.jinja")).unwrap()),
            Some("<|im_start|>".into()),
            Some("<|im_end|>".into()),
        ),
        other => panic!("unknown template {other}"),
    })
}

#[test]
fn renders_equal_transformers() {
    let Some(dir) = common::shared("fixtures/chat-templates") else { return };
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_renders.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 18);
    for c in &cases {
        let name = c["template"].as_str().unwrap();
        let t = template_for(name).unwrap();
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = t.render(&messages, c["add_generation_prompt"].as_bool().unwrap(), &c["template_vars"]).unwrap();
        assert_eq!(
            got,
            c["rendered"].as_str().unwrap(),
            "{name} / {} / agp={}",
            c["conversation"],
            c["add_generation_prompt"]
        );
    }
}

#[test]
fn template_errors_and_fallback() {
    let t = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}".into()), None, None);
    let e = t.render(&[Message::new("user", "hi")], true, &serde_json::json!({})).unwrap_err().to_string();
    assert!(e.contains("roles must alternate"), "{e}");
    let f = ChatTemplate::new(None, None, None);
    let r = f
        .render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")], true, &serde_json::json!({}))
        .unwrap();
    assert_eq!(r, "System: Be brief.\n\nUser: Hi\n\nAssistant:");
}

fn smollm2() -> Option<std::path::PathBuf> {
    common::smollm2()
}

#[test]
fn scripted_multi_turn_remembers_context() {
    let Some(model) = smollm2() else { return };
    let mut child = Command::new(env!("CARGO_BIN_EXE_billion"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            "--json",
            "--device",
            "cpu",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"The secret word is banana.\nRepeat the secret word.\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let turns: Vec<serde_json::Value> =
        common::stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(turns.len(), 2);
    for t in &turns {
        let reply = t["reply"].as_str().unwrap();
        assert!(!reply.trim().is_empty());
        assert!(!reply.contains("<|im_end|>") && !reply.contains("<|im_start|>"), "{reply}");
    }
    assert!(turns.iter().any(|t| t["tokens"].as_u64().unwrap() < 48), "a reply ended at <|im_end|>: {turns:?}");
    // The second message never says the word: only the first turn's context holds it.
    assert!(
        turns[1]["reply"].as_str().unwrap().to_lowercase().contains("banana"),
        "second turn uses the first: {}",
        turns[1]
    );
    assert!(turns[1]["reused_tokens"].as_u64().unwrap() > 20, "the first turn's KV was reused: {}", turns[1]);
}

/// Reusing the KV cache across turns gives the replies of prefilling the whole conversation afresh — exactly,
/// on the regular forward pass (the CPU decode step writes the KV of the tokens it decodes through its own
/// loops, equal to a prefill's up to float rounding, so it is switched off here).
#[test]
fn kv_reuse_equals_fresh_prefill() {
    let Some(model) = smollm2() else { return };
    // Read when a model's first decode step builds its CPU step; the other tests here pass either way.
    std::env::set_var(billion::model::cpu_forward::DISABLE_ENV, "0");
    let opts = billion::load::LoadOptions { device: Some(billion::load::DeviceSpec::Cpu), ..Default::default() };
    let loaded = billion::load::load(model.to_str().unwrap(), &opts).unwrap();
    let params = GenerateParams::new(24, SamplingParams::default(), vec![]);
    let questions = ["Name a fruit.", "What color is it?", "Say it again in French."];
    let run = |reuse: bool| {
        let mut s = ChatSession::new(&loaded, Some("You are brief.".into()), params.clone()).unwrap();
        s.reuse_cache = reuse;
        let mut replies = vec![];
        let mut reused = 0;
        for q in questions {
            replies.push(s.turn(q, |_| {}).unwrap());
            reused += s.last.as_ref().unwrap().reused_tokens;
        }
        (replies, reused)
    };
    let (fresh, fresh_reused) = run(false);
    let (reused, reused_tokens) = run(true);
    assert_eq!(fresh_reused, 0);
    assert!(reused_tokens > 40, "turns 2 and 3 reuse the cache ({reused_tokens} tokens)");
    assert_eq!(fresh, reused, "reusing the KV cache changes nothing");
}

#[test]
fn one_turn_with_prompt_flag() {
    let Some(model) = smollm2() else { return };
    let out = common::billion(&[
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "What is the capital of France? Answer in one word.",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("Paris"), "{}", common::stdout(&out));
}

/// Run the binary on a pseudo-terminal, typing lines; returns everything it printed.
fn pty_session(args: &[&str], lines: &[(&str, &str)]) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty");
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billion"));
    // The terminal becomes the child's controlling terminal, so Ctrl-C (0x03) raises SIGINT as for a person.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd
        .args(args)
        .env("HOME", std::env::temp_dir())
        .env("TERM", "xterm")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut m = unsafe { std::fs::File::from_raw_fd(master) };
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = m.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    // Wait until `needle` appears after byte `from` of everything printed so far.
    let wait_for = |needle: &str, from: usize, seen: &mut String| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !seen[from.min(seen.len())..].contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("timed out waiting for {needle:?}; screen so far:\n{seen}"),
            }
        }
        from + seen[from..].find(needle).unwrap() + needle.len()
    };
    let mut pos = 0;
    for (line, expect) in lines {
        if !line.starts_with("^C") {
            pos = wait_for(">>> ", pos, &mut seen);
        }
        if let Some(after) = line.strip_prefix("^C") {
            // No prompt precedes an interrupt: it lands while the previous line's reply streams.
            // Interrupt the reply in progress once `after` shows, then expect `expect`.
            pos = wait_for(after, pos, &mut seen);
            m.write_all(b"\x03").unwrap();
            pos = wait_for(expect, pos, &mut seen);
            continue;
        }
        m.write_all(line.as_bytes()).unwrap();
        m.write_all(b"\r").unwrap();
        pos = wait_for(expect, pos, &mut seen);
    }
    let _ = child.wait();
    seen
}

#[test]
fn interactive_session_on_a_terminal() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("chat.json");
    let (save, load) = (format!("/save {}", saved.display()), format!("/load {}", saved.display()));
    let screen = pty_session(
        &["chat", "--model", model.to_str().unwrap(), "--temperature", "0", "--max-tokens", "400", "--device", "cpu"],
        &[
            ("What is the capital of France? Answer in one word.", "Paris"),
            ("/stats", "tok/s"),
            ("Write a very long story about a dragon who learns to bake bread.", "\n"),
            ("^C ", "(stopped after"),
            (save.as_str(), "(saved to"),
            ("/reset", "conversation cleared"),
            (load.as_str(), "(loaded 4 messages"),
            ("/exit", ""),
        ],
    );
    eprintln!("{screen}");
    assert!(screen.contains("Paris"), "{screen}");
    assert!(!screen.contains("<|im_end|>"), "{screen}");
    // "(stopped after N tokens)" is printed only when Ctrl-C cut the reply: N is short of --max-tokens 400.
    let stopped = screen.split("(stopped after ").nth(1).and_then(|r| r.split(' ').next()).unwrap();
    assert!(stopped.parse::<usize>().unwrap() < 400, "{screen}");
}

#[test]
fn long_history_drops_oldest_turns_but_keeps_the_system_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320); // context 256
    billion::testing::write_llama_gguf(&path, &cfg, 1, candle_core::quantized::GgmlDType::F32).unwrap();
    let loaded = billion::load::load(path.to_str().unwrap(), &billion::load::LoadOptions::default()).unwrap();
    let mut s =
        ChatSession::new(&loaded, Some("Be brief.".into()), GenerateParams::new(8, SamplingParams::default(), vec![]))
            .unwrap();
    assert!(s.template.is_fallback(), "the tiny GGUF has no template");
    let long = "the ".repeat(25); // about 75 tokens with the tiny vocabulary
    let mut dropped = 0;
    for _ in 0..6 {
        s.turn(&long, |_| {}).unwrap();
        dropped += s.last.as_ref().unwrap().dropped_messages;
        assert!(s.last.as_ref().unwrap().prompt_tokens + 8 <= 256, "each prompt fits with room to answer");
    }
    assert!(dropped > 0, "old turns were dropped");
    assert_eq!(s.system.as_deref(), Some("Be brief."));
    let too_long = "the ".repeat(400);
    let e = s.turn(&too_long, |_| {}).unwrap_err().to_string();
    assert!(e.contains("context window"), "{e}");
}
