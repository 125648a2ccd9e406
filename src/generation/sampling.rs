//! Turning logits into the next token: greedy, or temperature / top-k / top-p sampling with a seeded RNG,
//! and an optional repeat penalty.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 (or below) means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 disables it. Applied to tokens of the last `repeat_last_n` positions.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, repeat_penalty: 1.0, repeat_last_n: 64, seed: 299792458 }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Apply the repeat penalty in place (CTRL-style: divide positive logits, multiply negative ones).
    pub fn penalize(&self, logits: &mut [f32], history: &[u32]) {
        if self.params.repeat_penalty == 1.0 {
            return;
        }
        let start = history.len().saturating_sub(self.params.repeat_last_n);
        let mut seen = std::collections::HashSet::new();
        for &id in &history[start..] {
            if seen.insert(id) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l >= 0.0 { *l / self.params.repeat_penalty } else { *l * self.params.repeat_penalty };
                }
            }
        }
    }

    /// The filtered, normalised distribution that sampling draws from (`None` when greedy).
    /// Speculative decoding uses the same function for draft and target.
    pub fn distribution(&self, logits: &[f32]) -> Option<Vec<f32>> {
        if self.params.is_greedy() {
            return None;
        }
        Some(probabilities(logits, self.params.temperature, self.params.top_k, self.params.top_p))
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.distribution(logits) {
            None => argmax(logits),
            Some(p) => self.draw(&p),
        }
    }

    /// Draw an index from a normalised distribution.
    pub fn draw(&mut self, probs: &[f32]) -> u32 {
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                last_nonzero = i;
                u -= p as f64;
                if u < 0.0 {
                    return i as u32;
                }
            }
        }
        last_nonzero as u32
    }

    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// softmax(logits / T) restricted to the top-k, then to the smallest set whose mass reaches top-p
/// (transformers' order: temperature, top-k, top-p), renormalised.
pub fn probabilities(logits: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Vec<f32> {
    let t = temperature.max(1e-6) as f32;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    let needs_sort = top_k.is_some_and(|k| k > 0 && k < probs.len()) || top_p.is_some_and(|p| p < 1.0);
    if needs_sort {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap_or(std::cmp::Ordering::Equal));
        let k = top_k.filter(|&k| k > 0).unwrap_or(probs.len()).min(probs.len());
        let kept_total: f32 = order[..k].iter().map(|&i| probs[i]).sum();
        let mut keep = k;
        if let Some(p) = top_p.filter(|&p| p < 1.0) {
            let mut acc = 0.0;
            for (n, &i) in order[..k].iter().enumerate() {
                acc += probs[i] / kept_total;
                if acc as f64 >= p {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
    }
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_filter() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let p = probabilities(&logits, 1.0, Some(2), None);
        assert_eq!(p[0], 0.0);
        assert_eq!(p[3], 0.0);
        assert!((p[1] + p[2] - 1.0).abs() < 1e-6);
        let p = probabilities(&logits, 1.0, None, Some(0.5));
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 1);
    }

    #[test]
    fn seeded_sampling_repeats() {
        let logits = [0.5f32, 0.4, 0.3, 0.2];
        let params = SamplingParams { temperature: 1.0, seed: 7, ..Default::default() };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn repeat_penalty_lowers_seen_tokens() {
        let s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..Default::default() });
        let mut l = vec![2.0f32, -2.0, 1.0];
        s.penalize(&mut l, &[0, 1]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }
}
