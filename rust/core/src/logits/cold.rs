//! Contrastive LoRA Decoding (Heisler et al., KDD 2025): contrast the adapted expert's logits
//! with its own base model's.
//!
//! Keep `V = {i : s_e[i] >= ln(alpha) + max(s_e)}` (tokens the expert finds plausible), score
//! `(1 + beta)·s_e - beta·(s_b / base_temperature)` on `V` and `-inf` elsewhere, then take the
//! argmax or sample `softmax(score / temperature)` over `V`.

use candle_core::{DType, Tensor};

use super::{check_param, choose, top_k_indices, Rng, SamplingParams};
use crate::error::{Error, Result};
use crate::kernels::cpu::max_value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColdParams {
    /// Plausibility cut: tokens below `alpha` times the expert's best probability are dropped.
    pub alpha: f32,
    /// Contrast strength; 0 is plain decoding with the expert.
    pub beta: f32,
    /// The base logits are divided by it before contrasting.
    pub base_temperature: f32,
    pub sample: bool,
    /// Temperature of the contrastive scores when sampling.
    pub temperature: f32,
    pub seed: u64,
    /// Run base and expert rows through one forward pass (true) or two (the naive version).
    pub paired: bool,
}

impl Default for ColdParams {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            beta: 0.5,
            base_temperature: 1.0,
            sample: false,
            temperature: 1.0,
            seed: 0,
            paired: true,
        }
    }
}

impl ColdParams {
    pub fn validate(&self) -> Result<()> {
        let a = self.alpha;
        check_param("CoLD alpha", a, a > 0.0 && a <= 1.0, "in (0, 1]")?;
        let b = self.beta;
        check_param(
            "CoLD beta",
            b,
            b.is_finite() && b >= 0.0,
            "a finite number >= 0",
        )?;
        let bt = self.base_temperature;
        let positive = "a finite number > 0";
        check_param(
            "CoLD base_temperature",
            bt,
            bt.is_finite() && bt > 0.0,
            positive,
        )?;
        let t = self.temperature;
        check_param("CoLD temperature", t, t.is_finite() && t > 0.0, positive)
    }
}

/// The contrastive scores: finite on the plausible set `V`, `-inf` elsewhere.
pub fn cold_scores(expert: &[f32], base: &[f32], p: &ColdParams) -> Vec<f32> {
    let cut = plausibility_cut(expert, p);
    expert
        .iter()
        .zip(base)
        .map(|(&e, &b)| score(e, b, cut, p))
        .collect()
}

fn plausibility_cut(expert: &[f32], p: &ColdParams) -> f32 {
    p.alpha.ln() + max_value(expert)
}

fn score(e: f32, b: f32, cut: f32, p: &ColdParams) -> f32 {
    if e >= cut {
        (1.0 + p.beta) * e - p.beta * (b / p.base_temperature)
    } else {
        f32::NEG_INFINITY
    }
}

/// The token CoLD picks from one expert row and its base row.
pub fn cold_choose(expert: &[f32], base: &[f32], p: &ColdParams, rng: &mut Rng) -> u32 {
    if !p.sample {
        // `argmax(cold_scores(..))` without building the scores: the first best one wins.
        let cut = plausibility_cut(expert, p);
        let mut best = (0, f32::NEG_INFINITY);
        for (i, (&e, &b)) in expert.iter().zip(base).enumerate() {
            let s = score(e, b, cut, p);
            if s > best.1 {
                best = (i, s);
            }
        }
        return best.0 as u32;
    }
    let scores = cold_scores(expert, base, p);
    let params = SamplingParams {
        temperature: p.temperature,
        ..SamplingParams::greedy()
    };
    choose(&scores, &params, rng)
}

/// The best `k` CoLD candidates of each (expert, base) row pair (`[pairs, vocab]` tensors, one
/// shape and dtype), best first, as `(token, score)` with [`cold_scores`]' scores; rows with
/// fewer than `k` plausible tokens get fewer. Rows on a CUDA device (k up to 16) run the fused
/// kernel of `cuda/cold.cu` and only the candidates leave the GPU; otherwise the host scores them.
pub fn cold_top_k(
    expert: &Tensor,
    base: &Tensor,
    p: &ColdParams,
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    p.validate()?;
    let (pairs, vocab) = expert.dims2()?;
    if base.dims() != expert.dims() {
        return Err(Error::invalid(format!(
            "CoLD takes expert and base rows of one shape: {:?} and {:?}",
            expert.dims(),
            base.dims()
        )));
    }
    if k == 0 || k > vocab {
        return Err(Error::invalid(format!(
            "CoLD top-k needs 1 <= k <= the vocabulary size (k = {k}, vocabulary {vocab})"
        )));
    }
    #[cfg(feature = "cuda")]
    if expert.device().is_cuda() && k <= crate::kernels::cuda::COLD_MAX_K {
        return cold_top_k_cuda(expert, base, p, k);
    }
    let expert = expert.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let base = base.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    debug_assert_eq!(expert.len(), pairs);
    Ok(expert
        .iter()
        .zip(&base)
        .map(|(e, b)| {
            let scores = cold_scores(e, b, p);
            top_k_indices(&scores, k)
                .into_iter()
                .filter(|&i| scores[i].is_finite())
                .map(|i| (i as u32, scores[i]))
                .collect()
        })
        .collect())
}

/// The kernel scores log-softmaxed rows; the host's score of the same token differs by the
/// pair's constant `(1+beta)·lse_e - beta·lse_b/t`, added back here.
#[cfg(feature = "cuda")]
fn cold_top_k_cuda(
    expert: &Tensor,
    base: &Tensor,
    p: &ColdParams,
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>> {
    let out =
        crate::kernels::cuda::cold_top_k(expert, base, k, p.alpha, p.beta, p.base_temperature)?;
    Ok((0..out.pairs)
        .map(|r| {
            let shift =
                (1.0 + p.beta) * out.lse[2 * r] - p.beta * out.lse[2 * r + 1] / p.base_temperature;
            (0..k)
                .map(|j| (out.index[r * k + j], out.score[r * k + j]))
                .take_while(|&(i, _)| i >= 0)
                .map(|(i, s)| (i as u32, s + shift))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logits::argmax;

    #[test]
    fn top_k_takes_the_best_plausible_scores() {
        let expert = [2.0f32, 1.9, -5.0, 0.0, 1.9];
        let base = [3.0f32, 0.0, -10.0, 0.0, 0.0];
        let p = ColdParams::default();
        let t = |v: &[f32]| Tensor::from_slice(v, (1, v.len()), &candle_core::Device::Cpu).unwrap();
        let got = cold_top_k(&t(&expert), &t(&base), &p, 5).unwrap();
        // Tokens 1 and 4 tie (2.85) and come in index order; 2 is below the cut.
        assert_eq!(got.len(), 1);
        let ids: Vec<u32> = got[0].iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, [1, 4, 0, 3]);
        let scores = cold_scores(&expert, &base, &p);
        assert!(got[0].iter().all(|&(i, s)| s == scores[i as usize]));
        assert!(cold_top_k(&t(&expert), &t(&base[..4]), &p, 1).is_err());
        assert!(cold_top_k(&t(&expert), &t(&base), &p, 0).is_err());
        assert!(cold_top_k(&t(&expert), &t(&base), &p, 6).is_err());
    }

    #[test]
    fn greedy_pick_is_the_argmax_of_the_scores() {
        let mut rng = Rng::new(7, 0);
        for beta in [0.0, 0.5, 2.0] {
            let p = ColdParams {
                beta,
                ..ColdParams::default()
            };
            for _ in 0..50 {
                let expert: Vec<f32> = (0..300).map(|_| 4.0 * rng.next_f32()).collect();
                let base: Vec<f32> = (0..300).map(|_| 4.0 * rng.next_f32()).collect();
                let want = argmax(&cold_scores(&expert, &base, &p)) as u32;
                assert_eq!(cold_choose(&expert, &base, &p, &mut Rng::new(0, 0)), want);
            }
        }
    }

    #[test]
    fn plausibility_cut_and_contrast() {
        let expert = [2.0f32, 1.9, -5.0, 0.0];
        let base = [3.0f32, 0.0, -10.0, 0.0];
        let p = ColdParams::default();
        let s = cold_scores(&expert, &base, &p);
        // ln(0.1) + 2 = -0.30: tokens 0, 1 and 3 are plausible, 2 is not.
        assert!(s[2] == f32::NEG_INFINITY && s[3].is_finite());
        assert!((s[0] - (1.5 * 2.0 - 0.5 * 3.0)).abs() < 1e-6);
        // The base model's strong preference for token 0 makes CoLD pick token 1.
        assert_eq!(cold_choose(&expert, &base, &p, &mut Rng::new(0, 0)), 1);
        let plain = ColdParams { beta: 0.0, ..p };
        assert_eq!(cold_choose(&expert, &base, &plain, &mut Rng::new(0, 0)), 0);
        let sampled = ColdParams { sample: true, ..p };
        for seed in 0..50 {
            let t = cold_choose(&expert, &base, &sampled, &mut Rng::new(seed, 0));
            assert_ne!(t, 2, "sampling never leaves the plausible set");
        }
        assert!(ColdParams { alpha: 0.0, ..p }.validate().is_err());
        assert!(ColdParams { beta: -1.0, ..p }.validate().is_err());
        assert!(ColdParams {
            base_temperature: 0.0,
            ..p
        }
        .validate()
        .is_err());
    }
}
