//! SentencePiece-style tokenizer built from GGUF metadata (`tokenizer.ggml.model = llama`): tokens with
//! scores, merged greedily by highest score over adjacent pairs (llama.cpp's SPM algorithm), with byte
//! fallback (`<0xXX>`) for pieces missing from the vocabulary.

use std::collections::{BinaryHeap, HashMap};

pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_USER_DEFINED: i32 = 4;
pub const TYPE_BYTE: i32 = 6;

#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    lookup: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    /// Control / user-defined tokens matched literally in text, longest first.
    specials: Vec<(String, u32)>,
    pub add_space_prefix: bool,
    unk_id: Option<u32>,
}

#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    // Highest score first; on ties, the leftmost pair.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.partial_cmp(&o.score).unwrap_or(std::cmp::Ordering::Equal).then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    prev: isize,
    next: isize,
    start: usize,
    len: usize,
}

impl SpmTokenizer {
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        add_space_prefix: bool,
        unk_id: Option<u32>,
    ) -> Self {
        let lookup: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = lookup.get(&format!("<0x{b:02X}>")).copied();
        }
        let mut specials: Vec<(String, u32)> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TYPE_CONTROL || **t == TYPE_USER_DEFINED)
            .map(|(i, _)| (tokens[i].clone(), i as u32))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Self { tokens, scores, types, lookup, byte_tokens, specials, add_space_prefix, unk_id }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.lookup.get(s).copied()
    }

    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.types.get(id as usize), Some(&TYPE_CONTROL) | Some(&TYPE_UNKNOWN))
    }

    /// Split text around special tokens: `Ok(text)` fragments and `Err(id)` special tokens.
    fn partition<'a>(&self, text: &'a str) -> Vec<Result<&'a str, u32>> {
        let mut out = vec![];
        let mut rest_start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            let found = self.specials.iter().find(|(s, _)| text[i..].starts_with(s.as_str()));
            match found {
                Some((s, id)) => {
                    if rest_start < i {
                        out.push(Ok(&text[rest_start..i]));
                    }
                    out.push(Err(*id));
                    i += s.len();
                    rest_start = i;
                }
                None => {
                    i += 1;
                    while i < bytes.len() && !text.is_char_boundary(i) {
                        i += 1;
                    }
                }
            }
        }
        if rest_start < text.len() {
            out.push(Ok(&text[rest_start..]));
        }
        out
    }

    /// Encode without BOS/EOS. Special tokens written in the text are recognised.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = vec![];
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Ok(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let s = s.replace(' ', "\u{2581}");
                    self.encode_piece(&s, &mut out);
                    prev_special = false;
                }
                Err(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        out
    }

    fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut symbols: Vec<Symbol> = vec![];
        for (idx, (start, ch)) in text.char_indices().enumerate() {
            symbols.push(Symbol { prev: idx as isize - 1, next: idx as isize + 1, start, len: ch.len_utf8() });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = -1;
        }
        let mut heap = BinaryHeap::new();
        let mut rev_merge: HashMap<String, (usize, usize)> = HashMap::new();
        let try_add = |left: isize,
                       right: isize,
                       symbols: &Vec<Symbol>,
                       heap: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<String, (usize, usize)>| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (symbols[left as usize], symbols[right as usize]);
            let piece = &text[l.start..r.start + r.len];
            if let Some(&id) = self.lookup.get(piece) {
                heap.push(Bigram { score: self.scores[id as usize], left: left as usize, size: piece.len() });
                rev.insert(piece.to_string(), (left as usize, right as usize));
            }
        };
        for i in 1..symbols.len() {
            try_add(i as isize - 1, i as isize, &symbols, &mut heap, &mut rev_merge);
        }
        while let Some(bg) = heap.pop() {
            let left = bg.left;
            let right = symbols[left].next;
            if symbols[left].len == 0 || right < 0 {
                continue;
            }
            let right = right as usize;
            if symbols[right].len == 0 || symbols[left].len + symbols[right].len != bg.size {
                continue; // outdated: one side was merged since this pair was queued
            }
            symbols[left].len += symbols[right].len;
            symbols[right].len = 0;
            symbols[left].next = symbols[right].next;
            if symbols[right].next >= 0 {
                let n = symbols[right].next as usize;
                symbols[n].prev = left as isize;
            }
            let (p, n) = (symbols[left].prev, symbols[left].next);
            try_add(p, left as isize, &symbols, &mut heap, &mut rev_merge);
            try_add(left as isize, n, &symbols, &mut heap, &mut rev_merge);
        }
        let mut i: isize = if symbols.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = symbols[i as usize];
            self.resegment(text, s.start, s.len, &rev_merge, &symbols, out);
            i = s.next;
        }
    }

    fn resegment(
        &self,
        text: &str,
        start: usize,
        len: usize,
        rev: &HashMap<String, (usize, usize)>,
        symbols: &[Symbol],
        out: &mut Vec<u32>,
    ) {
        let piece = &text[start..start + len];
        if let Some(&id) = self.lookup.get(piece) {
            out.push(id);
            return;
        }
        if let Some(&(l, r)) = rev.get(piece) {
            let (ls, rs) = (symbols[l].start, symbols[r].start);
            self.resegment(text, ls, rs - ls, rev, symbols, out);
            self.resegment(text, rs, start + len - rs, rev, symbols, out);
            return;
        }
        for b in piece.bytes() {
            match (self.byte_tokens[b as usize], self.unk_id) {
                (Some(id), _) | (None, Some(id)) => out.push(id),
                (None, None) => {}
            }
        }
    }

    /// Bytes of one token as it appears in text (`▁` → space, `<0xXX>` → that byte, control → nothing).
    pub fn token_bytes(&self, id: u32, skip_special: bool) -> Vec<u8> {
        let Some(tok) = self.tokens.get(id as usize) else { return vec![] };
        match self.types.get(id as usize).copied().unwrap_or(TYPE_NORMAL) {
            TYPE_CONTROL | TYPE_UNKNOWN if skip_special => vec![],
            TYPE_BYTE => {
                let hex = tok.trim_start_matches("<0x").trim_end_matches('>');
                u8::from_str_radix(hex, 16).map(|b| vec![b]).unwrap_or_default()
            }
            _ => tok.replace('\u{2581}', " ").into_bytes(),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = vec![];
        for &id in ids {
            bytes.extend(self.token_bytes(id, skip_special));
        }
        // The prefix space that encoding added is not part of the text.
        if self.add_space_prefix && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
