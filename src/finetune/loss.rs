//! The training loss: Hugging Face's causal-LM cross-entropy over the answer tokens only.

use super::data::IGNORE;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The rows of `[b·t, vocab]` logits that predict a label, and those labels: logits at t predict the label at
/// t+1; labels equal to -100 are skipped. `labels` is `[b, t]`.
pub fn labelled_rows(labels: &Tensor, vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let (b, t) = labels.dims2()?;
    let labels: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let mut rows = vec![];
    let mut targets = vec![];
    for bi in 0..b {
        for ti in 0..t - 1 {
            let l = labels[bi * t + ti + 1];
            if l != IGNORE {
                if l < 0 || l as usize >= vocab {
                    bail!("label {l} is outside the vocabulary of {vocab}");
                }
                rows.push((bi * t + ti) as u32);
                targets.push(l as u32);
            }
        }
    }
    Ok((rows, targets))
}

/// The causal-LM loss from logits of the labelled positions only (`Model::forward_rows` with the rows of
/// [`labelled_rows`]): `[n, vocab]` logits, `n` targets (u32). The same value and gradients as
/// [`causal_lm_loss`] over every position's logits.
pub fn selected_rows_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n == 0 {
        bail!("every label is ignored (-100): nothing to learn from");
    }
    let rows = Tensor::arange(0u32, n as u32, logits.device())?;
    Ok(crate::ops::autograd::cross_entropy_rows(logits, &rows, targets)?.mean_all()?)
}

/// Hugging Face's causal-LM loss: the mean negative log-likelihood over [`labelled_rows`].
/// `logits` `[b, t, vocab]`, `labels` `[b, t]` (i64).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets) = labelled_rows(labels, v)?;
    if rows.is_empty() {
        bail!("every label is ignored (-100): nothing to learn from");
    }
    let device = logits.device();
    let flat = logits.reshape((b * t, v))?;
    let rows = Tensor::new(rows.as_slice(), device)?;
    let target = Tensor::new(targets.as_slice(), device)?;
    Ok(crate::ops::autograd::cross_entropy_rows(&flat, &rows, &target)?.mean_all()?)
}
