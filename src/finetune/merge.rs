//! `--merge`: fold the adapter into the base weights (`W + (alpha/r) · B A`) and write a model that loads
//! without the adapter: a Hugging Face folder (safetensors + config + tokenizer files) for a folder base, or a
//! GGUF file (merged matrices stored as F16, or F32 where the base was F32) for a GGUF base. Either is written
//! beside its target and renamed into place whole (`files::publish`): a stopped merge leaves the previous
//! merged model or none, never part of one.

use super::files::publish;
use crate::formats::safetensors;
use crate::model::adapter::Lora;
use crate::model::Architecture;
use crate::util::{save_safetensors_atomic, temp_path_beside};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Files copied unchanged from a base folder into the merged one.
const SIDE_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// Merge into a copy of the Hugging Face folder `base`, written to the folder `out` (replacing it). `lora` is
/// in the folder model's own (Hugging Face) layout. `pause`: see [`publish`].
pub fn merge_hf_folder(base: &Path, lora: &Lora, out: &Path, pause: Option<Duration>) -> Result<PathBuf> {
    let tmp = temp_path_beside(out);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for f in SIDE_FILES {
        let src = base.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.join(f)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    let mut merged = 0;
    for file in safetensors::model_files(base)? {
        let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("cannot read {}", file.display()))?;
        for (module, _, _) in &lora.params {
            let key = format!("{module}.weight");
            if let Some(w) = tensors.get(&key) {
                let dtype = w.dtype();
                let m = lora.merged_weight(module, &w.to_device(&Device::Cpu)?)?.to_dtype(dtype)?;
                tensors.insert(key, m);
                merged += 1;
            }
        }
        let name = file.file_name().context("shard file name")?;
        save_safetensors_atomic(&tmp.join(name), &tensors)?;
    }
    if merged != lora.params.len() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("{} of the adapter's {} modules have weights in {}", merged, lora.params.len(), base.display());
    }
    publish(&tmp, out, pause)?;
    Ok(out.to_path_buf())
}

/// Merge into a copy of the GGUF file `base`, written to `out`. `lora` is in the GGUF model's layout (as
/// trained on it: interleaved q/k rows for llama). `pause`: see [`publish`].
pub fn merge_gguf(
    base: &Path,
    arch: Architecture,
    lora: &Lora,
    out: &Path,
    pause: Option<Duration>,
) -> Result<PathBuf> {
    let mut reader =
        std::io::BufReader::new(std::fs::File::open(base).with_context(|| format!("cannot open {}", base.display()))?);
    let content =
        gguf_file::Content::read(&mut reader).with_context(|| format!("{}: not a GGUF file", base.display()))?;
    let mut by_gguf: HashMap<String, &str> = HashMap::new();
    for (module, _, _) in &lora.params {
        let g =
            arch.gguf_name(&format!("{module}.weight")).with_context(|| format!("{module} has no GGUF tensor name"))?;
        by_gguf.insert(g, module.as_str());
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = vec![];
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu)?;
        let q = match by_gguf.remove(name.as_str()) {
            Some(module) => {
                let keep = if q.dtype() == GgmlDType::F32 { GgmlDType::F32 } else { GgmlDType::F16 };
                let w: Tensor = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                QTensor::quantize(&lora.merged_weight(module, &w)?, keep)?
            }
            None => q,
        };
        tensors.push((name.clone(), q));
    }
    if let Some(missing) = by_gguf.keys().next() {
        bail!("{}: no tensor {missing} to merge the adapter into", base.display());
    }
    let md: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = temp_path_beside(out);
    crate::formats::gguf::write_gguf(&tmp, &md, &t)?;
    publish(&tmp, out, pause)?;
    Ok(out.to_path_buf())
}
