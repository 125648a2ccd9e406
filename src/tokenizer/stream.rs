//! Streaming detokenization: emit text as tokens arrive, never half of a multi-byte UTF-8 character, and
//! with the same spacing as decoding the whole sequence at once.

use super::Tokenizer;
use anyhow::Result;

pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window still needed for context (the last emitted token).
    prev: usize,
    /// End of what has been emitted.
    current: usize,
}

impl<'a> TokenStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: vec![], prev: 0, current: 0 }
    }

    /// Add a token; returns newly complete text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.ids[self.prev..self.current], true)?;
        self.ids.push(id);
        let after = self.tokenizer.decode(&self.ids[self.prev..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before) {
            let text = after[before.len()..].to_string();
            self.prev = self.current;
            self.current = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Whatever is left (an incomplete character at the very end is emitted as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tokenizer.decode(&self.ids[self.prev..self.current], true)?;
        let after = self.tokenizer.decode(&self.ids[self.prev..], true)?;
        self.prev = self.current;
        self.current = self.ids.len();
        Ok(after.strip_prefix(&before).filter(|s| !s.is_empty()).map(String::from))
    }
}
