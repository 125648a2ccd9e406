//! Where weights come from: memory-mapped safetensors (HF folders), GGUF files (tensors stay quantized), or
//! random values of the right shapes (`--random-weights`). Architectures ask by Hugging Face tensor name;
//! GGUF names are mapped here.

use super::config::Architecture;
use super::layers::{Embedding, Norm};
use super::linear::Linear;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Load-time quantization of dense weights (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4_0,
    Q4K,
}

impl Quantize {
    /// A `--quantize` value that may be absent.
    pub fn parse_opt(s: Option<&str>) -> Result<Option<Self>> {
        s.map_or(Ok(None), Self::parse)
    }

    pub fn parse(s: &str) -> Result<Option<Self>> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "" => None,
            "q8_0" | "q8" | "int8" => Some(Quantize::Q8_0),
            "q4_0" | "q4" | "int4" => Some(Quantize::Q4_0),
            "q4k" | "q4_k" => Some(Quantize::Q4K),
            other => bail!("--quantize: unknown `{other}` (expected none, q8_0, q4_0 or q4k)"),
        })
    }

    pub fn ggml(&self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Quantize::Q8_0 => "q8_0",
            Quantize::Q4_0 => "q4_0",
            Quantize::Q4K => "q4k",
        }
    }
}

/// One memory-mapped safetensors file. Tensors are copied out on demand and their pages are then released
/// from this process (`MADV_DONTNEED`), so a load peaks near the size of the loaded weights, not twice it.
struct MappedSafetensors {
    mmap: memmap2::Mmap,
    /// name → (dtype, shape, byte range in the file)
    tensors: HashMap<String, (DType, Vec<usize>, std::ops::Range<usize>)>,
}

impl MappedSafetensors {
    fn open(path: &Path) -> Result<Self> {
        let header = check_safetensors_header(path)?;
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: mapped read-only; the file is not expected to change while the model loads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let mut tensors = HashMap::new();
        let base = 8 + header.len;
        for (name, v) in header.json.as_object().into_iter().flatten() {
            if name == "__metadata__" {
                continue;
            }
            let bad = || anyhow::anyhow!("{}: malformed entry for tensor `{name}`", path.display());
            let dtype = match v.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)? {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                "F64" => DType::F64,
                "I64" => DType::I64,
                "U32" => DType::U32,
                "U8" => DType::U8,
                other => bail!("{}: tensor `{name}` has unsupported dtype {other}", path.display()),
            };
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
            if b < a || (b - a) != shape.iter().product::<usize>() * dtype.size_in_bytes() {
                bail!("{}: tensor `{name}` has {} bytes for shape {shape:?}", path.display(), b.saturating_sub(a));
            }
            tensors.insert(name.clone(), (dtype, shape, base + a..base + b));
        }
        Ok(Self { mmap, tensors })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some((dtype, shape, range)) = self.tensors.get(name) else { return Ok(None) };
        let t = Tensor::from_raw_buffer(&self.mmap[range.clone()], *dtype, shape, &Device::Cpu)?.to_device(device)?;
        // SAFETY: the mapping is read-only and file-backed, and no reference into this range outlives the copy
        // above; dropped pages are simply read again from the file if touched.
        let _ =
            unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
        Ok(Some(t))
    }
}

enum Source {
    SafeTensors { st: Vec<MappedSafetensors>, files: Vec<PathBuf> },
    Gguf { content: gguf_file::Content, file: RefCell<std::fs::File>, path: PathBuf },
    Random { std: f64 },
}

/// Weight provider for one model load.
pub struct Weights {
    source: Source,
    arch: Architecture,
    pub dtype: DType,
    pub device: Device,
    quantize: Option<Quantize>,
    /// Expand GGUF quantized tensors to dense weights of the compute dtype.
    dequantize: bool,
    /// Quantized weights whose shapes did not fit the block size and stayed dense.
    pub kept_dense: RefCell<Vec<String>>,
}

impl Weights {
    pub fn safetensors(files: Vec<PathBuf>, arch: Architecture, dtype: DType, device: &Device) -> Result<Self> {
        let st = files.iter().map(|f| MappedSafetensors::open(f)).collect::<Result<Vec<_>>>()?;
        Ok(Self::new(Source::SafeTensors { st, files }, arch, dtype, device))
    }

    pub fn gguf(
        content: gguf_file::Content,
        path: &Path,
        arch: Architecture,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self::new(Source::Gguf { content, file: RefCell::new(file), path: path.to_path_buf() }, arch, dtype, device))
    }

    pub fn random(arch: Architecture, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Random { std: 0.02 }, arch, dtype, device)
    }

    fn new(source: Source, arch: Architecture, dtype: DType, device: &Device) -> Self {
        Self {
            source,
            arch,
            dtype,
            device: device.clone(),
            quantize: None,
            dequantize: false,
            kept_dense: RefCell::new(vec![]),
        }
    }

    pub fn with_dequantize(mut self, d: bool) -> Self {
        self.dequantize = d;
        self
    }

    pub fn with_quantize(mut self, q: Option<Quantize>) -> Self {
        self.quantize = q;
        self
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    fn origin(&self) -> String {
        match &self.source {
            Source::SafeTensors { files, .. } => display_list(files),
            Source::Gguf { path, .. } => path.display().to_string(),
            Source::Random { .. } => "random weights".into(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::SafeTensors { st, .. } => st.iter().any(|f| f.tensors.contains_key(name)),
            Source::Gguf { content, .. } => {
                gguf_name(self.arch, name).is_some_and(|n| content.tensor_infos.contains_key(&n))
            }
            Source::Random { .. } => true,
        }
    }

    fn gguf_tensor(&self, name: &str) -> Result<QTensor> {
        let Source::Gguf { content, file, path } = &self.source else { unreachable!() };
        let gname = gguf_name(self.arch, name).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
        let mut f = file.borrow_mut();
        content
            .tensor(&mut *f, &gname, &self.device)
            .with_context(|| format!("{}: cannot read tensor `{gname}`", path.display()))
    }

    /// A dense tensor in the compute dtype. `init` is what random weights use: `Init::Normal` for matrices.
    pub fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match &self.source {
            Source::SafeTensors { st, .. } => {
                let mut found = None;
                for f in st {
                    if let Some(t) = f.load(name, &self.device)? {
                        found = Some(t);
                        break;
                    }
                }
                found.with_context(|| format!("{}: no tensor `{name}`", self.origin()))?
            }
            Source::Gguf { .. } => self.gguf_tensor(name)?.dequantize(&self.device)?,
            Source::Random { std } => match init {
                Init::Normal => Tensor::randn(0f32, *std as f32, shape, &self.device)?,
                Init::Ones => Tensor::ones(shape, DType::F32, &self.device)?,
                Init::Zeros => Tensor::zeros(shape, DType::F32, &self.device)?,
            },
        };
        if t.dims() != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", self.origin(), t.dims(), shape);
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    pub fn linear(&self, name: &str, out_f: usize, in_f: usize, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.tensor(&format!("{name}.bias"), &[out_f], Init::Zeros)?) } else { None };
        let wname = format!("{name}.weight");
        if let Source::Gguf { .. } = &self.source {
            let q = self.gguf_tensor(&wname)?;
            if q.shape().dims() != [out_f, in_f] {
                bail!(
                    "{}: tensor `{wname}` has shape {:?}, expected [{out_f}, {in_f}]",
                    self.origin(),
                    q.shape().dims()
                );
            }
            return if is_float(q.dtype()) || self.dequantize {
                Ok(Linear::dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?, bias)?)
            } else {
                Ok(Linear::quantized(Arc::new(q), bias)?)
            };
        }
        let w = self.tensor(&wname, &[out_f, in_f], Init::Normal)?;
        self.maybe_quantize(&wname, w, bias)
    }

    fn maybe_quantize(&self, name: &str, w: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        match self.quantize {
            Some(q) if w.dim(1)? % q.ggml().block_size() == 0 => Ok(Linear::quantize(&w, bias, q.ggml())?),
            Some(_) => {
                self.kept_dense.borrow_mut().push(name.to_string());
                Ok(Linear::dense(w, bias)?)
            }
            None => Ok(Linear::dense(w, bias)?),
        }
    }

    pub fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        if let Source::Gguf { .. } = &self.source {
            let q = self.gguf_tensor(name)?;
            if q.shape().dims() != [vocab, hidden] {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, expected [{vocab}, {hidden}]",
                    self.origin(),
                    q.shape().dims()
                );
            }
            return Ok(if is_float(q.dtype()) || self.dequantize {
                Embedding::Dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
            } else {
                Embedding::Quantized(Arc::new(q), self.dtype)
            });
        }
        Ok(Embedding::Dense(self.tensor(name, &[vocab, hidden], Init::Normal)?))
    }

    /// The output projection: its own tensor when present, else the (tied) input embedding.
    pub fn lm_head(&self, name: &str, embed: &Embedding, vocab: usize, hidden: usize, tied: bool) -> Result<Linear> {
        let exists = !matches!(self.source, Source::Random { .. }) && self.contains(&format!("{name}.weight"));
        if exists || (!tied && matches!(self.source, Source::Random { .. })) {
            return self.linear(name, vocab, hidden, false);
        }
        match embed {
            Embedding::Dense(w) => self.maybe_quantize(&format!("{name}.weight"), w.clone(), None),
            Embedding::Quantized(q, _) => Ok(Linear::quantized(q.clone(), None)?),
        }
    }

    pub fn rms_norm(&self, name: &str, size: usize, eps: f64) -> Result<Norm> {
        Ok(Norm::Rms { weight: self.tensor(&format!("{name}.weight"), &[size], Init::Ones)?, eps })
    }

    pub fn layer_norm(&self, name: &str, size: usize, eps: f64, bias: bool) -> Result<Norm> {
        let weight = self.tensor(&format!("{name}.weight"), &[size], Init::Ones)?;
        let bias = if bias { Some(self.tensor(&format!("{name}.bias"), &[size], Init::Zeros)?) } else { None };
        Ok(Norm::Layer { weight, bias, eps })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal,
    Ones,
    Zeros,
}

fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

fn display_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Validate a safetensors header and that the file holds every byte it declares, so a truncated download
/// is a clear error instead of a fault on first touch of the mapping.
pub struct SafetensorsHeader {
    pub len: usize,
    pub json: serde_json::Value,
}

pub fn check_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut len_buf = [0u8; 8];
    f.read_exact(&mut len_buf)
        .map_err(|_| anyhow::anyhow!("{}: not a safetensors file (shorter than its 8-byte header)", path.display()))?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        bail!(
            "{}: truncated or not a safetensors file (header of {header_len} bytes, file of {file_len})",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("{}: corrupt safetensors header: {e}", path.display()))?;
    let mut data_end = 0u64;
    if let Some(obj) = json.as_object() {
        for (k, v) in obj {
            if k == "__metadata__" {
                continue;
            }
            if let Some(end) = v.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()) {
                data_end = data_end.max(end);
            }
        }
    }
    let have = file_len - 8 - header_len;
    if have < data_end {
        bail!(
            "{}: truncated safetensors file: its header declares {data_end} bytes of tensor data but only {have} are present",
            path.display()
        );
    }
    Ok(SafetensorsHeader { len: header_len as usize, json })
}

/// Map a Hugging Face tensor name to its llama.cpp GGUF name.
pub fn gguf_name(arch: Architecture, hf: &str) -> Option<String> {
    let (stem, suffix) = match hf.rsplit_once('.') {
        Some((s, suf @ ("weight" | "bias"))) => (s, suf),
        _ => (hf, "weight"),
    };
    let top = |s: &str| Some(format!("{s}.{suffix}"));
    match (arch, stem) {
        (Architecture::GptNeoX, "gpt_neox.embed_in") | (_, "model.embed_tokens") => return top("token_embd"),
        (Architecture::GptNeoX, "gpt_neox.final_layer_norm") | (_, "model.norm") => return top("output_norm"),
        (_, "lm_head") | (_, "embed_out") => return top("output"),
        _ => {}
    }
    let rest = stem.strip_prefix("model.layers.").or_else(|| stem.strip_prefix("gpt_neox.layers."))?;
    let (idx, part) = rest.split_once('.')?;
    let mapped = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "attention.query_key_value" => "attn_qkv",
        "attention.dense" => "attn_output",
        "mlp.dense_h_to_4h" => "ffn_up",
        "mlp.dense_4h_to_h" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{idx}.{mapped}.{suffix}"))
}

/// Files of a Hugging Face model folder: `model.safetensors`, or the shards listed in its index.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
