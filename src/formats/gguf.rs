//! The GGUF format: reading a file's header (metadata and tensor table) with errors that name the file,
//! typed metadata lookups, the file's main tensor type, and writing GGUF files atomically.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use std::path::Path;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Open and parse a GGUF header, with errors that name the file.
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || magic != GGUF_MAGIC {
        bail!("{}: not a GGUF file (bad magic {:02x?}, expected \"GGUF\")", path.display(), magic);
    }
    let mut f = std::fs::File::open(path)?;
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| anyhow::anyhow!("{}: corrupt GGUF file: {e}", path.display()))?;
    // Every tensor's bytes must lie inside the file: a truncated download is an error here, not at first use.
    let file_len = f.metadata()?.len();
    for (name, info) in &content.tensor_infos {
        let dt = info.ggml_dtype;
        let bytes = (info.shape.elem_count() / dt.block_size() * dt.type_size()) as u64;
        let end = content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
        if end > file_len {
            bail!(
                "{}: truncated GGUF file: tensor `{name}` ends at byte {end} but the file has {file_len}",
                path.display()
            );
        }
    }
    Ok(content)
}

/// Does the file at `path` start with the GGUF magic?
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == GGUF_MAGIC
}

/// The most common tensor type among a GGUF file's 2-D weights (what the file "is": Q4_1, Q8_0, F32 …).
pub fn main_tensor_type(c: &gguf_file::Content) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for info in c.tensor_infos.values() {
        if info.shape.rank() == 2 {
            *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += info.shape.elem_count();
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k).unwrap_or_else(|| "unknown".into())
}

/// Bytes the file's tensors take in memory (their stored, possibly quantized, sizes).
pub fn tensor_bytes(c: &gguf_file::Content) -> u64 {
    c.tensor_infos
        .values()
        .map(|i| (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64)
        .sum()
}

pub fn meta_str<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    c.metadata.get(key).and_then(|v| v.to_string().ok()).map(|s| s.as_str())
}

pub fn meta_u64(c: &gguf_file::Content, key: &str) -> Option<u64> {
    let v = c.metadata.get(key)?;
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::I8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::I16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::I32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    }
}

pub fn meta_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    match c.metadata.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => meta_u64(c, key).map(|x| x as f64),
    }
}

pub fn meta_bool(c: &gguf_file::Content, key: &str) -> Option<bool> {
    c.metadata.get(key).and_then(|v| v.to_bool().ok())
}

/// Write a GGUF file atomically (temp file + rename).
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, &Value)],
    tensors: &[(&str, &candle_core::quantized::QTensor)],
) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        gguf_file::write(&mut f, metadata, tensors)?;
        use std::io::Write;
        f.flush()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
