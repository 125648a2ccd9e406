//! Fine-tuning data: JSONL of `{"instruction", "input"?, "output"}` or `{"messages": [...]}`, rendered with
//! the model's chat template and tokenized so that only the assistant's tokens carry labels (the prompt's
//! labels are -100, ignored by the loss), as trl's completion-only training does.

use crate::chat::template::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The label of a token the loss ignores.
pub const IGNORE: i64 = -100;

/// The shipped default task: classify short reviews, answering with exactly one word. Base instruct models
/// answer in a sentence; the exact-match metric shows what 100 examples teach.
pub const DEFAULT_TRAIN: &str = include_str!("default_dataset/train.jsonl");
pub const DEFAULT_EVAL: &str = include_str!("default_dataset/eval.jsonl");

/// One conversation; the last message is the assistant's answer that evaluation generates.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub messages: Vec<Message>,
}

impl Example {
    /// Everything before the final assistant message (the evaluation prompt).
    pub fn prompt_messages(&self) -> &[Message] {
        &self.messages[..self.messages.len() - 1]
    }

    /// The final assistant message (the expected answer).
    pub fn answer(&self) -> &str {
        &self.messages[self.messages.len() - 1].content
    }
}

/// A tokenized example: ids and labels of equal length.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Tokenized {
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// Parse JSONL text; `origin` names the file in errors (with the line number).
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Example>> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{origin}:{}", i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        out.push(example_from(&v).with_context(at)?);
    }
    if out.is_empty() {
        bail!("{origin}: no examples (expected one JSON object per line)");
    }
    Ok(out)
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse_jsonl(&text, &path.display().to_string())
}

fn example_from(v: &Value) -> Result<Example> {
    let text = |k: &str| -> Result<Option<String>> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => bail!("\"{k}\" must be a string"),
        }
    };
    if let Some(m) = v.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(m.clone())
            .context("\"messages\" must be a list of {\"role\", \"content\"} objects")?;
        for m in &messages {
            if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                bail!("unknown role \"{}\" (expected system, user or assistant)", m.role);
            }
        }
        if messages.last().map(|m| m.role.as_str()) != Some("assistant") {
            bail!("\"messages\" must end with an assistant message (the answer to learn)");
        }
        if !messages.iter().any(|m| m.role == "user") {
            bail!("\"messages\" has no user message");
        }
        return Ok(Example { messages });
    }
    let (Some(instruction), Some(output)) = (text("instruction")?, text("output")?) else {
        bail!("expected {{\"instruction\", \"input\"?, \"output\"}} or {{\"messages\": [...]}}");
    };
    let user = match text("input")?.filter(|s| !s.trim().is_empty()) {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction,
    };
    Ok(Example { messages: vec![Message::new("user", &user), Message::new("assistant", &output)] })
}

/// Renders examples into token ids with labels on assistant turns only.
pub struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: ChatTemplate,
    /// Appended after each answer when the template has no end-of-turn marker of its own (the fallback format).
    pub eos_id: Option<u32>,
}

impl<'a> Renderer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        let template = ChatTemplate::new(
            tokenizer.chat_template.clone(),
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        );
        Self { tokenizer, template, eos_id: tokenizer.eos_ids.first().copied() }
    }

    fn render(&self, messages: &[Message], generation_prompt: bool) -> Result<String> {
        self.template.render(messages, generation_prompt, &serde_json::json!({}))
    }

    fn encode(&self, text: &str, first: bool) -> Result<Vec<u32>> {
        // The template writes its own BOS; the fallback format needs the tokenizer's.
        self.tokenizer.encode(text, first && self.template.is_fallback())
    }

    /// Prompt tokens for generating the final answer.
    pub fn prompt_ids(&self, ex: &Example) -> Result<Vec<u32>> {
        self.encode(&self.render(ex.prompt_messages(), true)?, true)
    }

    /// Token ids and labels: each rendered piece is tokenized on its own, so label boundaries fall exactly
    /// where the template puts the assistant's text; the pieces join into what rendering the whole gives.
    pub fn tokenize(&self, ex: &Example, max_len: usize) -> Result<Tokenized> {
        let mut ids = vec![];
        let mut labels = vec![];
        let mut done = String::new();
        for (i, m) in ex.messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render(&ex.messages[..i], true)?;
            let full = self.render(&ex.messages[..=i], false)?;
            let (Some(p_new), Some(a_new)) = (prompt.strip_prefix(done.as_str()), full.strip_prefix(prompt.as_str()))
            else {
                bail!("the chat template does not render conversations as growing prefixes; cannot mask the prompt");
            };
            let p_ids = self.encode(p_new, ids.is_empty())?;
            labels.extend(std::iter::repeat_n(IGNORE, p_ids.len()));
            ids.extend(p_ids);
            let mut a_ids = self.encode(a_new, false)?;
            if self.template.is_fallback() {
                a_ids.extend(self.eos_id);
            }
            labels.extend(a_ids.iter().map(|&t| t as i64));
            ids.extend(a_ids);
            done = full;
        }
        if ids.len() > max_len {
            ids.truncate(max_len);
            labels.truncate(max_len);
        }
        Ok(Tokenized { ids, labels })
    }
}

/// Split off `fraction` of the examples (at least one) for evaluation, after a seeded shuffle.
pub fn split(mut examples: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if examples.len() < 2 {
        bail!("the data has {} example(s): need at least 2 to hold one out for evaluation", examples.len());
    }
    shuffle(&mut examples, seed);
    let n_eval = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let eval = examples.split_off(examples.len() - n_eval);
    Ok((examples, eval))
}

/// A deterministic Fisher–Yates shuffle (splitmix64), the same on every platform and run.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_shapes_and_names_bad_lines() {
        let ex = parse_jsonl(
            "{\"instruction\":\"Say hi\",\"output\":\"hi\"}\n\n{\"instruction\":\"Add\",\"input\":\"1+1\",\"output\":\"2\"}\n\
             {\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n",
            "d.jsonl",
        )
        .unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[1].messages[0].content, "Add\n\n1+1");
        assert_eq!(ex[2].answer(), "b");
        let e = parse_jsonl("{\"instruction\":\"x\"}\n", "d.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("d.jsonl:1"), "{e:#}");
        let e = parse_jsonl("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]}", "d.jsonl").unwrap_err();
        assert!(format!("{e:#}").contains("end with an assistant"), "{e:#}");
        assert!(parse_jsonl("not json", "d.jsonl").is_err());
    }

    #[test]
    fn default_dataset_is_100_plus_held_out() {
        assert_eq!(parse_jsonl(DEFAULT_TRAIN, "train").unwrap().len(), 100);
        let eval = parse_jsonl(DEFAULT_EVAL, "eval").unwrap();
        assert_eq!(eval.len(), 20);
        let train: Vec<_> = parse_jsonl(DEFAULT_TRAIN, "train").unwrap();
        assert!(eval.iter().all(|e| !train.contains(e)), "held-out examples must not be trained on");
    }

    #[test]
    fn split_and_shuffle_are_deterministic() {
        let ex = parse_jsonl(DEFAULT_TRAIN, "train").unwrap();
        let (a, b) = split(ex.clone(), 0.1, 3).unwrap();
        let (c, d) = split(ex, 0.1, 3).unwrap();
        assert_eq!((a.len(), b.len()), (90, 10));
        assert_eq!(a, c);
        assert_eq!(b, d);
    }
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn labels_cover_exactly_the_answers() {
        let dir = tempfile::tempdir().unwrap();
        crate::testing::write_chat_model(dir.path(), 1).unwrap();
        let tok = crate::tokenizer::from_model_dir(dir.path()).unwrap().unwrap();
        let r = Renderer::new(&tok);
        assert!(!r.template.is_fallback());
        let ex = parse_jsonl(
            "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"hi\"},\
             {\"role\":\"assistant\",\"content\":\"hello\"},{\"role\":\"user\",\"content\":\"2+2?\"},\
             {\"role\":\"assistant\",\"content\":\"4\"}]}",
            "t",
        )
        .unwrap()
        .remove(0);
        let t = r.tokenize(&ex, 1000).unwrap();
        // The pieces join into exactly what encoding the whole render gives.
        let full = r.template.render(&ex.messages, false, &serde_json::json!({})).unwrap();
        assert_eq!(t.ids, tok.encode(&full, false).unwrap());
        let labelled: Vec<u32> = t.labels.iter().filter(|&&l| l != IGNORE).map(|&l| l as u32).collect();
        assert_eq!(tok.decode(&labelled, false).unwrap(), "hello<|im_end|>\n4<|im_end|>\n");
        // The evaluation prompt ends where the last answer begins.
        let prompt = r.prompt_ids(&ex).unwrap();
        assert_eq!(&t.ids[..prompt.len()], prompt.as_slice());
        assert_eq!(t.labels[prompt.len()], t.ids[prompt.len()] as i64);
        assert_eq!(t.labels[prompt.len() - 1], IGNORE);
        // --max-len cuts from the end.
        let short = r.tokenize(&ex, 10).unwrap();
        assert_eq!(short.ids.len(), 10);
        assert_eq!(short.trained_tokens(), 0);
    }
}
