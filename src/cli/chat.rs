//! `billion chat`: an interactive REPL (line editing, history, streamed replies, Ctrl-C stops a reply), one
//! turn with `--prompt`, or one turn per stdin line when stdin is not a terminal.

use super::{LoadArgs, SamplingArgs};
use crate::chat::{template::FALLBACK_DESCRIPTION, ChatSession};
use crate::generation::GenerateParams;
use anyhow::{Context, Result};
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: LoadArgs,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this one message and exit
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Most tokens per reply
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// One JSON object per turn on stdout instead of text
    #[arg(long)]
    pub json: bool,
    /// Print tokens and tokens/s after each reply
    #[arg(long)]
    pub verbose: bool,
    /// Re-read the whole history every turn instead of reusing the KV cache (for checks)
    #[arg(long, hide = true)]
    pub no_cache_reuse: bool,
}

fn print_stats(s: &crate::chat::TurnStats) {
    eprintln!(
        "[{} prompt tokens ({} reused), {} generated; prefill {:.1} tok/s, decode {:.1} tok/s, ttft {:.0} ms]",
        s.prompt_tokens, s.reused_tokens, s.tokens, s.prefill_tok_s, s.decode_tok_s, s.ttft_ms
    );
}

pub fn run(a: ChatArgs) -> Result<()> {
    let sampling = a.sampling.params()?;
    let loaded = a.model.load()?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let mut params = GenerateParams::new(a.max_tokens, sampling, vec![]);
    params.interrupt = Some(interrupt.clone());
    let mut session = ChatSession::new(&loaded, a.system.clone(), params)?;
    session.reuse_cache = !a.no_cache_reuse;
    if session.template.is_fallback() {
        eprintln!("note: {FALLBACK_DESCRIPTION}");
    }
    let mut turn_no = 0;
    let mut one_turn = |session: &mut ChatSession, text: &str, stream: bool| -> Result<()> {
        turn_no += 1;
        interrupt.store(false, Ordering::Relaxed);
        let stdout = std::io::stdout();
        let reply = session.turn(text, |t| {
            if stream {
                let mut o = stdout.lock();
                let _ = o.write_all(t.as_bytes());
                let _ = o.flush();
            }
        })?;
        let stats = session.last.clone().unwrap_or_default();
        if stats.dropped_messages > 0 {
            eprintln!("note: dropped the {} oldest message(s) to fit the context window", stats.dropped_messages);
        }
        if a.json {
            let v = serde_json::json!({
                "turn": turn_no, "reply": reply, "tokens": stats.tokens, "prompt_tokens": stats.prompt_tokens,
                "decode_tok_s": stats.decode_tok_s, "reused_tokens": stats.reused_tokens,
            });
            println!("{v}");
        } else {
            println!();
        }
        if a.verbose {
            print_stats(&stats);
        }
        Ok(())
    };

    if let Some(p) = &a.prompt {
        return one_turn(&mut session, p, !a.json);
    }
    if !std::io::stdin().is_terminal() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            one_turn(&mut session, &line, !a.json)?;
        }
        return Ok(());
    }

    // Interactive: Ctrl-C during a reply stops that reply; at the prompt the line editor sees it.
    let flag = interrupt.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("cannot install the Ctrl-C handler")?;
    let mut rl = rustyline::DefaultEditor::new().context("cannot start the line editor")?;
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    eprintln!("chatting with {} — /help for commands, Ctrl-D or /exit to leave", loaded.source.display());
    loop {
        let line = match rl.readline(">>> ") {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /exit to leave)");
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line.as_str());
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map(|(n, r)| (n, r.trim())).unwrap_or((cmd, ""));
            match name {
                "exit" | "quit" => break,
                "reset" => {
                    session.reset();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    session.system = if arg.is_empty() { None } else { Some(arg.to_string()) };
                    eprintln!("(system prompt {})", if arg.is_empty() { "removed" } else { "set" });
                }
                "save" if !arg.is_empty() => match crate::util::write_atomic(
                    std::path::Path::new(arg),
                    serde_json::to_string_pretty(&session.to_json())?.as_bytes(),
                ) {
                    Ok(()) => eprintln!("(saved to {arg})"),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "load" if !arg.is_empty() => {
                    let r = std::fs::read_to_string(arg)
                        .map_err(anyhow::Error::from)
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(anyhow::Error::from))
                        .and_then(|v| session.load_json(&v));
                    match r {
                        Ok(()) => eprintln!("(loaded {} messages from {arg})", session.messages.len()),
                        Err(e) => eprintln!("error: /load {arg}: {e:#}"),
                    }
                }
                "stats" => match &session.last {
                    Some(s) => print_stats(s),
                    None => eprintln!("(no reply yet)"),
                },
                _ => eprintln!(
                    "commands: /reset  /system TEXT  /save FILE  /load FILE  /stats  /help  /exit\n\
                     Ctrl-C stops a reply; Ctrl-D leaves"
                ),
            }
            continue;
        }
        if let Err(e) = one_turn(&mut session, &line, true) {
            eprintln!("error: {e:#}");
        }
        if interrupt.load(Ordering::Relaxed) {
            eprintln!("(stopped)");
        }
    }
    if let Some(h) = &history {
        let _ = std::fs::create_dir_all(h.parent().unwrap_or(std::path::Path::new(".")));
        let _ = rl.save_history(h);
    }
    Ok(())
}

fn history_path() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(std::path::PathBuf::from(home).join(".cache").join("billion").join("chat_history.txt"))
}
