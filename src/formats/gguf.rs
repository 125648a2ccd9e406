//! The GGUF format: reading a file's header (metadata and tensor table) with errors that name the file,
//! typed metadata lookups, the file's main tensor type, and writing GGUF files atomically.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use std::path::Path;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Open and parse a GGUF header, with errors that name the file. The header is checked before and after
/// candle parses it: the metadata alignment must be usable, every tensor's shape must have a size that fits
/// in memory arithmetic, and every tensor's bytes must lie inside the file, so later code may use the
/// tensor table without overflow or out-of-file reads.
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || magic != GGUF_MAGIC {
        bail!("{}: not a GGUF file (bad magic {:02x?}, expected \"GGUF\")", path.display(), magic);
    }
    let file_len = f.metadata()?.len();
    let mut header = std::io::BufReader::new(std::fs::File::open(path)?);
    check_alignment(&mut header, file_len)
        .map_err(|e| anyhow::anyhow!("{}: corrupt GGUF file: {e}", path.display()))?;
    let mut f = std::fs::File::open(path)?;
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| anyhow::anyhow!("{}: corrupt GGUF file: {e}", path.display()))?;
    // Every tensor's bytes must lie inside the file: a truncated download is an error here, not at first use.
    for (name, info) in &content.tensor_infos {
        let bytes = stored_bytes(info).with_context(|| {
            format!(
                "{}: corrupt GGUF file: tensor `{name}` has shape {:?}, which is not a whole number of {:?} blocks \
                 or too large",
                path.display(),
                info.shape.dims(),
                info.ggml_dtype
            )
        })?;
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

/// Bytes a tensor takes in the file, or `None` when its element count overflows or is not a whole number
/// of its type's blocks.
fn stored_bytes(info: &gguf_file::TensorInfo) -> Option<u64> {
    let elems = info.shape.dims().iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let dt = info.ggml_dtype;
    if !elems.is_multiple_of(dt.block_size()) {
        return None;
    }
    u64::try_from((elems / dt.block_size()).checked_mul(dt.type_size())?).ok()
}

/// Walk the metadata of a GGUF header without building it, and refuse a `general.alignment` that candle
/// would divide by (zero) or that is not a power of two (the GGUF spec's rule). Lengths are skipped, never
/// allocated, and must fit in the file.
fn check_alignment<R: std::io::Read + std::io::Seek>(r: &mut R, file_len: u64) -> Result<()> {
    let _magic = read_u32(r)?;
    let wide = match read_u32(r)? {
        1 => false,
        2 | 3 => true,
        v => bail!("unsupported GGUF version {v} (expected 1, 2 or 3)"),
    };
    let mut walk = HeaderWalk { r, wide, file_len };
    let _tensor_count = walk.length()?;
    let kv_count = walk.length()?;
    for _ in 0..kv_count {
        let key_len = walk.length()?;
        let is_alignment = key_len == ALIGNMENT_KEY.len() as u64 && {
            let mut key = [0u8; ALIGNMENT_KEY.len()];
            walk.r.read_exact(&mut key).context("header ends early")?;
            key == *ALIGNMENT_KEY
        };
        if !is_alignment && key_len != ALIGNMENT_KEY.len() as u64 {
            walk.skip(key_len)?;
        }
        let value_type = read_u32(walk.r)?;
        if is_alignment {
            let value = match value_type {
                0 | 1 => Some(u64::from(read_array::<_, 1>(walk.r)?[0])),
                2 | 3 => Some(u64::from(u16::from_le_bytes(read_array(walk.r)?))),
                4 | 5 => Some(u64::from(read_u32(walk.r)?)),
                _ => None,
            };
            if let Some(alignment) = value {
                // Signed types read as unsigned: a negative alignment is not a power of two either way.
                if !alignment.is_power_of_two() {
                    bail!("general.alignment is {alignment}; it must be a power of two");
                }
                return Ok(());
            }
        }
        walk.skip_value(value_type, 0)?;
    }
    Ok(())
}

const ALIGNMENT_KEY: &[u8; 17] = b"general.alignment";

fn read_array<R: std::io::Read, const N: usize>(r: &mut R) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).context("header ends early")?;
    Ok(b)
}

fn read_u32<R: std::io::Read>(r: &mut R) -> Result<u32> {
    Ok(u32::from_le_bytes(read_array(r)?))
}

/// A cursor over a GGUF header that skips values by their encoded sizes.
struct HeaderWalk<'a, R> {
    r: &'a mut R,
    /// Version 2 and 3 lengths are u64, version 1 lengths u32.
    wide: bool,
    file_len: u64,
}

impl<R: std::io::Read + std::io::Seek> HeaderWalk<'_, R> {
    fn length(&mut self) -> Result<u64> {
        if self.wide {
            Ok(u64::from_le_bytes(read_array(self.r)?))
        } else {
            read_u32(self.r).map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let pos = self.r.stream_position()?;
        if n > self.file_len.saturating_sub(pos) {
            bail!("a length of {n} bytes at byte {pos} runs past the end of the file ({} bytes)", self.file_len);
        }
        self.r.seek(std::io::SeekFrom::Current(n as i64))?;
        Ok(())
    }

    fn skip_value(&mut self, value_type: u32, depth: usize) -> Result<()> {
        // Deeper than any real file; candle refuses the same nesting.
        if depth > 64 {
            bail!("metadata arrays nested deeper than 64");
        }
        match value_type {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 => {
                let item_type = read_u32(self.r)?;
                let n = self.length()?;
                match item_type {
                    0 | 1 | 7 => self.skip(n),
                    2 | 3 => self.skip(n.saturating_mul(2)),
                    4..=6 => self.skip(n.saturating_mul(4)),
                    10..=12 => self.skip(n.saturating_mul(8)),
                    _ => {
                        // Each item takes at least one byte, so a count past the file's end is refused
                        // before walking it.
                        let pos = self.r.stream_position()?;
                        if n > self.file_len.saturating_sub(pos) {
                            bail!("an array of {n} items at byte {pos} is longer than the rest of the file");
                        }
                        (0..n).try_for_each(|_| self.skip_value(item_type, depth + 1))
                    }
                }
            }
            t => bail!("unknown metadata value type {t}"),
        }
    }
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

/// Write a GGUF file atomically (temp file + rename); a failed write removes the temporary file.
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, &Value)],
    tensors: &[(&str, &candle_core::quantized::QTensor)],
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out.gguf".into());
    // Per process, so two writers of the same file never share a temporary file.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut f = std::io::BufWriter::new(file);
        gguf_file::write(&mut f, metadata, tensors)?;
        use std::io::Write;
        f.flush()?;
        f.get_ref().sync_all()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header by hand: `kvs` (key, type, value bytes) then one tensor `t` of `dims` and type F32.
    fn header(kvs: &[(&str, u32, Vec<u8>)], dims: &[u64]) -> Vec<u8> {
        let mut b = GGUF_MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        b.extend(1u64.to_le_bytes());
        b.push(b't');
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(b.len() + 64, 0);
        b
    }

    fn read(bytes: &[u8]) -> Result<gguf_file::Content> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, bytes).unwrap();
        read_content(&path)
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        assert!(read(&header(&[], &[4])).is_ok());
        // candle divides by the alignment.
        let zero = header(&[("general.alignment", 4, 0u32.to_le_bytes().to_vec())], &[4]);
        assert!(read(&zero).unwrap_err().to_string().contains("power of two"));
        let odd = header(&[("general.alignment", 2, 3u16.to_le_bytes().to_vec())], &[4]);
        assert!(read(&odd).unwrap_err().to_string().contains("power of two"));
        let fine = header(&[("general.name", 8, [1u64.to_le_bytes().to_vec(), b"x".to_vec()].concat())], &[4]);
        assert!(read(&fine).is_ok());
        // An element count that overflows: refused before anything multiplies it.
        let huge = header(&[], &[1 << 40, 1 << 40]);
        assert!(read(&huge).unwrap_err().to_string().contains("too large"));
        // A string length past the end of the file, inside an array the walk skips.
        let mut array = 8u32.to_le_bytes().to_vec();
        array.extend(1u64.to_le_bytes());
        array.extend(u64::MAX.to_le_bytes());
        assert!(read(&header(&[("a", 9, array)], &[4])).is_err());
    }
}
