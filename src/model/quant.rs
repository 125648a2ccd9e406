//! Quantization types: the load-time `--quantize` choices and what each GGML type costs in memory. The
//! kernels that read each type are in `linear.rs` (candle's matmuls) and `decode_graph.rs` (our CUDA
//! matvecs); this file is where a new type is named.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;

/// Load-time quantization of dense weights (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4_0,
    Q4K,
}

impl Quantize {
    /// `none` → `None`; otherwise the type.
    pub fn parse(s: &str) -> Result<Option<Self>> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => None,
            "q8_0" | "q8" | "int8" => Some(Quantize::Q8_0),
            "q4_0" | "q4" | "int4" => Some(Quantize::Q4_0),
            "q4k" | "q4_k" => Some(Quantize::Q4K),
            other => bail!("unknown quantization `{other}` (expected none, q8_0, q4_0 or q4k)"),
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

    /// Can a matrix with rows of `width` elements be stored in this type (whole blocks per row)?
    pub fn fits(&self, width: usize) -> bool {
        width.is_multiple_of(self.ggml().block_size())
    }

    /// Bytes of a `rows × width` matrix in this type, or `None` where it stays dense.
    pub fn matrix_bytes(&self, rows: usize, width: usize) -> Option<u64> {
        let g = self.ggml();
        self.fits(width).then(|| (rows * width / g.block_size() * g.type_size()) as u64)
    }
}

/// A `--quantize` value: `none` or a type; clap's parser for the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeChoice(pub Option<Quantize>);

impl std::str::FromStr for QuantizeChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Quantize::parse(s).map(QuantizeChoice).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for QuantizeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.map_or("none", |q| q.name()))
    }
}

/// GGUF tensor types that are plain floats (dequantized at load, not quantized).
pub fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_others() {
        assert_eq!(Quantize::parse("Q8_0").unwrap(), Some(Quantize::Q8_0));
        assert_eq!(Quantize::parse("none").unwrap(), None);
        assert_eq!(Quantize::parse("q4_k").unwrap(), Some(Quantize::Q4K));
        assert!(Quantize::parse("q3").unwrap_err().to_string().contains("expected none, q8_0"));
        assert_eq!("q4k".parse::<QuantizeChoice>().unwrap().to_string(), "q4k");
    }

    #[test]
    fn q4k_needs_whole_256_blocks() {
        assert!(Quantize::Q4K.fits(2048) && !Quantize::Q4K.fits(576));
        assert_eq!(Quantize::Q8_0.matrix_bytes(2, 64), Some(2 * 2 * 34));
        assert_eq!(Quantize::Q4K.matrix_bytes(2, 64), None);
    }
}
