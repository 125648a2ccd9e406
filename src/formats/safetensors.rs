//! The safetensors format: header validation against the file's length, the tensor table (dtype, shape,
//! byte range), and the file list of a Hugging Face model folder (single file or index of shards).

use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Headers larger than this are refused (real ones are a few MB at most).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a safetensors file: its dtype, shape and absolute byte range in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// A validated safetensors header: every tensor's entry is well formed and its bytes lie inside the file.
#[derive(Debug)]
pub struct Header {
    /// Bytes of the JSON header (the data starts at `8 + len`).
    pub len: usize,
    pub tensors: HashMap<String, TensorEntry>,
}

impl Header {
    /// The most common dtype among the tensors, lower case ("bf16", "f32" …).
    pub fn main_dtype(&self) -> Option<String> {
        let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
        for t in self.tensors.values() {
            *counts.entry(dtype_name(t.dtype)).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k.to_string())
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        DType::I64 => "i64",
        DType::U32 => "u32",
        DType::U8 => "u8",
        _ => "other",
    }
}

/// Read and validate the header of the safetensors file at `path`, so that a truncated download or a corrupt
/// file is a clear error naming the file instead of a fault on first touch of a mapping.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut len_buf = [0u8; 8];
    f.read_exact(&mut len_buf)
        .map_err(|_| anyhow::anyhow!("{}: not a safetensors file (shorter than its 8-byte header)", path.display()))?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        bail!(
            "{}: truncated or not a safetensors file (header of {header_len} bytes, file of {file_len})",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("{}: corrupt safetensors header: {e}", path.display()))?;
    let Some(obj) = json.as_object() else {
        bail!("{}: corrupt safetensors header: not a JSON object", path.display())
    };
    let base = 8 + header_len as usize;
    let have = (file_len - 8 - header_len) as usize;
    let mut tensors = HashMap::new();
    let mut data_end = 0usize;
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = || anyhow::anyhow!("{}: malformed entry for tensor `{name}`", path.display());
        let dtype_str = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?;
        let dtype = parse_dtype(dtype_str)
            .with_context(|| format!("{}: tensor `{name}` has unsupported dtype {dtype_str}", path.display()))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
            .collect::<Result<_>>()?;
        let offsets = v.get("data_offsets").and_then(|o| o.as_array()).ok_or_else(bad)?;
        let (a, b) = (
            offsets.first().and_then(|x| x.as_u64()).ok_or_else(bad)? as usize,
            offsets.get(1).and_then(|x| x.as_u64()).ok_or_else(bad)? as usize,
        );
        let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(bad)?;
        if b < a || Some(b - a) != elems.checked_mul(dtype.size_in_bytes()) {
            bail!("{}: tensor `{name}` has {} bytes for shape {shape:?}", path.display(), b.saturating_sub(a));
        }
        if b > have {
            bail!(
                "{}: truncated safetensors file: tensor `{name}` ends at byte {b} of the data but only {have} are present",
                path.display()
            );
        }
        data_end = data_end.max(b);
        tensors.insert(name.clone(), TensorEntry { dtype, shape, range: base + a..base + b });
    }
    if have < data_end {
        bail!(
            "{}: truncated safetensors file: its header declares {data_end} bytes of tensor data but only {have} are present",
            path.display()
        );
    }
    Ok(Header { len: header_len as usize, tensors })
}

/// Files of a Hugging Face model folder: `model.safetensors`, or the shards listed in its index.
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map`", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                bail!("{} names shard {} which is missing", index.display(), f.display());
            }
        }
        return Ok(files);
    }
    bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn header_is_checked_against_the_file_length() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.safetensors");
        let h = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        write(&p, h, 16);
        let header = read_header(&p).unwrap();
        assert_eq!(header.tensors["w"].range, 8 + h.len()..8 + h.len() + 16);
        assert_eq!(header.main_dtype().as_deref(), Some("f32"));
        write(&p, h, 8);
        assert!(read_header(&p).unwrap_err().to_string().contains("truncated"));
        write(&p, r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, 16);
        assert!(read_header(&p).unwrap_err().to_string().contains("bytes for shape"));
        write(&p, r#"{"w":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,16]}}"#, 16);
        assert!(read_header(&p).is_err(), "overflowing shape");
    }
}
