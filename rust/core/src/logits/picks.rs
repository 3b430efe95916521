//! Choosing tokens where the logits are: on a GPU the rows stay there and only the chosen tokens
//! (and their log-probabilities) cross to the host. The same code runs on the CPU, where it must
//! choose exactly what the per-row host scorers choose.

use candle_core::{DType, Tensor};

use super::{check_rows_finite, cold_top_k, sample_rows, ColdParams, SamplingParams};
use crate::error::{Error, Result};

/// How one row's next token is chosen; `R` names the logit rows (indices, or sequence ids).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick<R = usize> {
    /// A draw from `row`'s logits with the uniform number `u` (the argmax when `params` is greedy).
    Sample {
        row: R,
        params: SamplingParams,
        u: f32,
    },
    /// Greedy CoLD: the best token of `row` (the expert) contrasted with `base`.
    Cold { row: R, base: R, params: ColdParams },
}

impl<R: Copy> Pick<R> {
    /// The row whose distribution the chosen token's log-probability is taken under.
    pub fn row(&self) -> R {
        match *self {
            Pick::Sample { row, .. } | Pick::Cold { row, .. } => row,
        }
    }

    /// The same pick over rows named another way.
    pub fn map_rows<S>(self, mut f: impl FnMut(R) -> Result<S>) -> Result<Pick<S>> {
        Ok(match self {
            Pick::Sample { row, params, u } => Pick::Sample {
                row: f(row)?,
                params,
                u,
            },
            Pick::Cold { row, base, params } => Pick::Cold {
                row: f(row)?,
                base: f(base)?,
                params,
            },
        })
    }
}

/// A pick's result: the token and its log-probability under the row's own logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Picked {
    pub token: u32,
    pub logprob: f32,
}

/// Makes `picks` over `rows` (`[1, vocab]` logits each, on one device): draws grouped by their
/// parameters, CoLD pairs likewise, each group in one call, then every chosen token's
/// log-probability in one pass. `step` names the generation step in a non-finite-logits error.
pub fn pick_tokens(rows: &[Tensor], picks: &[Pick], step: usize) -> Result<Vec<Picked>> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let stack = |idx: &[usize]| -> Result<Tensor> {
        let parts: Vec<Tensor> = idx.iter().map(|&i| rows[i].clone()).collect();
        Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?)
    };
    if let Some(bad) = picks
        .iter()
        .flat_map(|p| match *p {
            Pick::Sample { row, .. } => [row, row],
            Pick::Cold { row, base, .. } => [row, base],
        })
        .find(|&r| r >= rows.len())
    {
        return Err(Error::invalid(format!(
            "a pick names logit row {bad} of {}",
            rows.len()
        )));
    }
    let own: Vec<usize> = picks.iter().map(Pick::row).collect();
    let all = stack(&own)?;
    check_rows_finite(&all, step)?;
    // Usually one group holds every pick, in order: its own rows are then `all`.
    let own_rows = |members: &[usize]| -> Result<Tensor> {
        if members.len() == picks.len() {
            Ok(all.clone())
        } else {
            stack(&members.iter().map(|&m| picks[m].row()).collect::<Vec<_>>())
        }
    };

    let mut tokens = vec![0u32; picks.len()];
    for (params, members) in group_by(picks, |p| match *p {
        Pick::Sample { params, .. } => Some(params),
        Pick::Cold { .. } => None,
    }) {
        let us: Vec<f32> = members
            .iter()
            .map(|&m| match picks[m] {
                Pick::Sample { u, .. } => u,
                Pick::Cold { .. } => 0.0,
            })
            .collect();
        for (&m, t) in members
            .iter()
            .zip(sample_rows(&own_rows(&members)?, &params, &us)?)
        {
            tokens[m] = t;
        }
    }
    for (params, members) in group_by(picks, |p| match *p {
        Pick::Cold { params, .. } => Some(params),
        Pick::Sample { .. } => None,
    }) {
        let bases: Vec<usize> = members
            .iter()
            .map(|&m| match picks[m] {
                Pick::Cold { base, .. } => base,
                Pick::Sample { row, .. } => row,
            })
            .collect();
        let base_rows = stack(&bases)?;
        check_rows_finite(&base_rows, step)?;
        let best = cold_top_k(&own_rows(&members)?, &base_rows, &params, 1)?;
        for (&m, cands) in members.iter().zip(best) {
            // The expert's best token always passes its own plausibility cut.
            tokens[m] = cands
                .first()
                .map(|&(t, _)| t)
                .ok_or_else(|| Error::invalid("CoLD found no plausible token"))?;
        }
    }

    let chosen = Tensor::from_vec(tokens.clone(), (tokens.len(), 1), all.device())?;
    let logprobs = candle_nn::ops::log_softmax(&all, 1)?
        .gather(&chosen, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(tokens
        .into_iter()
        .zip(logprobs)
        .map(|(token, logprob)| Picked { token, logprob })
        .collect())
}

/// The picks grouped by the key `key` gives them (those it gives none are left out), groups in
/// order of first appearance.
fn group_by<K: PartialEq>(
    picks: &[Pick],
    key: impl Fn(&Pick) -> Option<K>,
) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, p) in picks.iter().enumerate() {
        let Some(k) = key(p) else { continue };
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups
}
