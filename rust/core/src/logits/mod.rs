//! Per-step scoring on the CPU: repetition penalty, temperature, top-k, top-p, min-p, seeded
//! sampling, argmax and log-probabilities over one row of logits.

mod cold;
mod rng;

pub use cold::{cold_choose, cold_scores, ColdParams};
pub use rng::Rng;

use crate::error::{Error, Result};

/// How the next token is chosen from a row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's.
    pub min_p: f32,
    /// transformers' CTRL-style penalty on every token already in the sequence (1 = off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        check_param(
            "temperature",
            t,
            t.is_finite() && t >= 0.0,
            "a finite number >= 0",
        )?;
        let p = self.top_p;
        check_param("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        let m = self.min_p;
        check_param("min_p", m, (0.0..=1.0).contains(&m), "in [0, 1]")?;
        let r = self.repetition_penalty;
        check_param(
            "repetition_penalty",
            r,
            r.is_finite() && r > 0.0,
            "a finite number > 0",
        )
    }
}

/// `Ok` when `ok`, else the error "`name` must be `rule`, got `value`".
pub(crate) fn check_param(name: &str, value: f32, ok: bool, rule: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name} must be {rule}, got {value}"
        )))
    }
}

/// Index of the largest value; the first one on ties, as `torch.argmax` does.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(xs)[index]`, computed stably.
pub fn log_prob(xs: &[f32], index: usize) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Vectorised exp in chunks, summed in f64 so a 50k-token vocabulary loses no precision.
    let mut buf = [0f32; 1024];
    let mut sum = 0f64;
    for chunk in xs.chunks(buf.len()) {
        let part = &mut buf[..chunk.len()];
        part.iter_mut().zip(chunk).for_each(|(b, &x)| *b = x - max);
        crate::model::exp_in_place(part);
        sum += part.iter().map(|&e| e as f64).sum::<f64>();
    }
    xs[index] - max - sum.ln() as f32
}

/// Divides positive logits and multiplies negative ones by `penalty` for every token in `seen`.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let i = t as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let x = logits[i];
            logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
        }
    }
}

/// The normalised distribution sampling draws from: `(token, probability)` pairs, most likely
/// first, after temperature, top-k, top-p and min-p.
pub fn sampling_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let t = p.temperature;
    let mut cands: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, x / t))
        .filter(|(_, x)| *x > f32::NEG_INFINITY)
        .collect();
    let k = if p.top_k == 0 {
        cands.len()
    } else {
        p.top_k.min(cands.len())
    };
    if k < cands.len() {
        cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cands.truncate(k);
    }
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cands.first().map(|c| c.1).unwrap_or(0.0);
    let mut probs: Vec<(u32, f32)> = cands.iter().map(|&(i, x)| (i, (x - max).exp())).collect();
    normalise(&mut probs);
    if p.top_p < 1.0 {
        let mut before = 0.0f32;
        let mut keep = 0;
        for &(_, q) in &probs {
            if before >= p.top_p && keep > 0 {
                break;
            }
            before += q;
            keep += 1;
        }
        probs.truncate(keep);
        normalise(&mut probs);
    }
    if p.min_p > 0.0 {
        let cut = p.min_p * probs.first().map(|c| c.1).unwrap_or(0.0);
        probs.retain(|c| c.1 >= cut);
        normalise(&mut probs);
    }
    probs
}

fn normalise(probs: &mut [(u32, f32)]) {
    let sum: f32 = probs.iter().map(|c| c.1).sum();
    if sum > 0.0 {
        probs.iter_mut().for_each(|c| c.1 /= sum);
    }
}

/// Chooses the next token; `logits` must be finite (check with [`all_finite`] first).
pub fn choose(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.is_greedy() {
        return argmax(logits) as u32;
    }
    let dist = sampling_distribution(logits, p);
    let u = rng.next_f32();
    let mut acc = 0.0;
    for &(tok, q) in &dist {
        acc += q;
        if u < acc {
            return tok;
        }
    }
    dist.last().map(|c| c.0).unwrap_or(0)
}

pub fn all_finite(xs: &[f32]) -> bool {
    xs.iter().all(|x| !x.is_nan() && *x != f32::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
            min_p,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn filters_follow_their_definitions() {
        let probs = [0.5f32, 0.25, 0.15, 0.1];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let ids = |d: Vec<(u32, f32)>| d.iter().map(|c| c.0).collect::<Vec<_>>();
        assert_eq!(
            ids(sampling_distribution(&logits, &params(2, 1.0, 0.0))),
            [0, 1]
        );
        // 0.5 < 0.7, 0.75 >= 0.7: the first two reach top_p.
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 0.7, 0.0))),
            [0, 1]
        );
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 0.5, 0.0))),
            [0]
        );
        // min_p 0.28 keeps tokens with p >= 0.14.
        assert_eq!(
            ids(sampling_distribution(&logits, &params(0, 1.0, 0.28))),
            [0, 1, 2]
        );
        let d = sampling_distribution(&logits, &params(0, 1.0, 0.0));
        for (c, p) in d.iter().zip(probs) {
            assert!((c.1 - p).abs() < 1e-6);
        }
    }

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn log_prob_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((log_prob(&l, 2) - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let mut p = SamplingParams::greedy();
        p.temperature = -1.0;
        assert!(p.validate().is_err());
        p.temperature = 1.0;
        p.top_p = 0.0;
        assert!(p.validate().is_err());
        p.top_p = 1.5;
        assert!(p.validate().is_err());
    }
}
