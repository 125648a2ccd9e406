//! Where weights come from: memory-mapped safetensors (HF folders), GGUF files (tensors stay quantized), or
//! random values of the right shapes (`--random-weights`). Architectures ask by Hugging Face tensor name;
//! GGUF names are mapped here.

use super::arch::Architecture;
use super::layers::{Embedding, Norm};
use super::linear::Linear;
use super::quant::{is_float, Quantize};
use crate::formats::safetensors::{self, TensorEntry};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One memory-mapped safetensors file. Tensors are copied out on demand and their pages are then released
/// from this process (`MADV_DONTNEED`), so a load peaks near the size of the loaded weights, not twice it.
struct MappedSafetensors {
    mmap: memmap2::Mmap,
    tensors: HashMap<String, TensorEntry>,
}

impl MappedSafetensors {
    fn open(path: &Path) -> Result<Self> {
        let header = safetensors::read_header(path)?;
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: mapped read-only; the file is not expected to change while the model loads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        // The header was checked against the file's length, so every range lies inside the mapping.
        Ok(Self { mmap, tensors: header.tensors })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(TensorEntry { dtype, shape, range }) = self.tensors.get(name) else { return Ok(None) };
        let t = Tensor::from_raw_buffer(&self.mmap[range.clone()], *dtype, shape, &Device::Cpu)?.to_device(device)?;
        // SAFETY: the mapping is read-only and file-backed, and no reference into this range outlives the copy
        // above; dropped pages are simply read again from the file if touched.
        let _ =
            unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len()) };
        Ok(Some(t))
    }
}

enum Source {
    SafeTensors {
        st: Vec<MappedSafetensors>,
        files: Vec<PathBuf>,
    },
    Gguf {
        content: gguf_file::Content,
        file: RefCell<std::fs::File>,
        path: PathBuf,
    },
    /// Random values; `record` lists every tensor asked for (name, shape, init), so that test models of any
    /// architecture can be written from what the architecture itself loads.
    Random {
        std: f64,
        record: RefCell<Vec<(String, Vec<usize>, Init)>>,
    },
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
        Self::new(Source::Random { std: 0.02, record: RefCell::new(vec![]) }, arch, dtype, device)
    }

    /// Every tensor requested so far from random weights: name, shape and how it was initialised.
    pub fn requested(&self) -> Vec<(String, Vec<usize>, Init)> {
        match &self.source {
            Source::Random { record, .. } => record.borrow().clone(),
            _ => vec![],
        }
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
                self.arch.gguf_name(name).is_some_and(|n| content.tensor_infos.contains_key(&n))
            }
            Source::Random { .. } => true,
        }
    }

    fn gguf_tensor(&self, name: &str) -> Result<QTensor> {
        let Source::Gguf { content, file, path } = &self.source else { unreachable!() };
        let gname = self.arch.gguf_name(name).with_context(|| format!("no GGUF name for tensor `{name}`"))?;
        let mut f = file.borrow_mut();
        content
            .tensor(&mut *f, &gname, &self.device)
            .with_context(|| format!("{}: cannot read tensor `{gname}`", path.display()))
    }

    /// A dense tensor in the compute dtype. `init` is what random weights use: `Init::Normal` for matrices.
    pub fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        Ok(self.tensor_as_stored(name, shape, init)?.to_dtype(self.dtype)?)
    }

    /// On the CPU with f32 compute, half-precision matrices stay half: our kernels widen them in registers,
    /// which halves the bytes a product streams (and the memory). `--quantize` and `--dequantize` take over.
    fn keeps_half(&self, stored: DType) -> bool {
        self.device.is_cpu()
            && self.dtype == DType::F32
            && matches!(stored, DType::F16 | DType::BF16)
            && self.quantize.is_none()
            && !self.dequantize
    }

    /// A GGUF half-precision tensor as a dense tensor of the same dtype, where it [stays half](Self::keeps_half).
    fn gguf_half(&self, q: &QTensor) -> Result<Option<Tensor>> {
        let dtype = match q.dtype() {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => return Ok(None),
        };
        if !self.keeps_half(dtype) {
            return Ok(None);
        }
        Ok(Some(Tensor::from_raw_buffer(&q.data()?, dtype, q.shape().dims(), &Device::Cpu)?))
    }

    /// A dense tensor in the dtype it is stored in (random weights: f32).
    fn tensor_as_stored(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
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
            Source::Random { std, record } => {
                record.borrow_mut().push((name.to_string(), shape.to_vec(), init));
                match init {
                    Init::Normal => Tensor::randn(0f32, *std as f32, shape, &self.device)?,
                    Init::Ones => Tensor::ones(shape, DType::F32, &self.device)?,
                    Init::Zeros => Tensor::zeros(shape, DType::F32, &self.device)?,
                }
            }
        };
        if t.dims() != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", self.origin(), t.dims(), shape);
        }
        Ok(t)
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
            if let Some(w) = self.gguf_half(&q)? {
                return Ok(Linear::dense(w, bias)?);
            }
            return if is_float(q.dtype()) || self.dequantize {
                Ok(Linear::dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?, bias)?)
            } else {
                Ok(Linear::quantized(Arc::new(q), bias)?)
            };
        }
        let w = self.tensor_as_stored(&wname, &[out_f, in_f], Init::Normal)?;
        if self.keeps_half(w.dtype()) {
            return Ok(Linear::dense(w, bias)?);
        }
        self.maybe_quantize(&wname, w.to_dtype(self.dtype)?, bias)
    }

    fn maybe_quantize(&self, name: &str, w: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        match self.quantize {
            Some(q) if q.fits(w.dim(1)?) => Ok(Linear::quantize(&w, bias, q.ggml())?),
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
            if let Some(w) = self.gguf_half(&q)? {
                return Ok(Embedding::Half(w, self.dtype));
            }
            return Ok(if is_float(q.dtype()) || self.dequantize {
                Embedding::Dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
            } else {
                match Linear::pack(&q)? {
                    Some(p) => Embedding::Packed(Arc::new(p), self.dtype),
                    None => Embedding::Quantized(Arc::new(q), self.dtype),
                }
            });
        }
        let w = self.tensor_as_stored(name, &[vocab, hidden], Init::Normal)?;
        Ok(if self.keeps_half(w.dtype()) {
            Embedding::Half(w, self.dtype)
        } else {
            Embedding::Dense(w.to_dtype(self.dtype)?)
        })
    }

    /// The output projection: its own tensor when present, else the (tied) input embedding.
    pub fn lm_head(&self, name: &str, embed: &Embedding, vocab: usize, hidden: usize, tied: bool) -> Result<Linear> {
        let exists = !matches!(self.source, Source::Random { .. }) && self.contains(&format!("{name}.weight"));
        if exists || (!tied && matches!(self.source, Source::Random { .. })) {
            return self.linear(name, vocab, hidden, false);
        }
        match embed {
            Embedding::Dense(w) => self.maybe_quantize(&format!("{name}.weight"), w.clone(), None),
            Embedding::Half(w, _) => Ok(Linear::dense(w.clone(), None)?),
            Embedding::Quantized(q, _) => Ok(Linear::quantized(q.clone(), None)?),
            Embedding::Packed(p, _) => Ok(Linear::packed(p.clone(), None)?),
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

fn display_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}
