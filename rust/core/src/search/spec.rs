//! The parameters of each search strategy, validated before anything runs.

use super::answers::{Extractor, Vote};
use super::beam::BeamParams;
use super::callbacks::{Evaluator, Scorer};
use crate::error::{Error, Result};
use crate::logits::{ColdParams, SamplingParams};
use crate::lora::Verifier;
use std::sync::Arc;

/// How a search picks tokens: the model's own distribution (after `sampling`), or CoLD's
/// contrastive scores against the base model (needs an adapter).
pub type TokenScorer = Option<ColdParams>;

/// How best-of-N ranks its candidates (higher is better).
#[derive(Debug, Clone)]
pub enum Ranking {
    MeanLogprob,
    SumLogprob,
    Callback(Scorer),
    /// A loaded verifier's score (its step probabilities aggregated as it says), its rows in
    /// the same passes as the samples.
    Verifier(Arc<Verifier>),
}

#[derive(Debug, Clone)]
pub struct BestOfNParams {
    pub n: usize,
    pub sampling: SamplingParams,
    pub ranking: Ranking,
    pub cold: TokenScorer,
}

#[derive(Debug, Clone)]
pub struct SelfConsistencyParams {
    pub n: usize,
    pub sampling: SamplingParams,
    pub extract: Extractor,
    pub vote: Vote,
    /// The weight of a weighted vote: `None` is the completion's mean token probability.
    pub weight: Option<Scorer>,
    /// The weight of a weighted vote is this verifier's score of the completion (the weighted
    /// majority of search-and-learn); exclusive with `weight`.
    pub verifier: Option<Arc<Verifier>>,
    /// Stop sampling once the Beta rule is at least this sure of the leading answer.
    pub stop_when_confident: Option<f64>,
    /// Samples per round when `stop_when_confident` is set.
    pub round_size: usize,
    pub cold: TokenScorer,
}

#[derive(Debug, Clone)]
pub enum ToTGenerate {
    /// `proposals` independent samples of the next thought.
    Sample,
    /// One completion of `template` (with `{problem}` and `{state}`) lists the next thoughts,
    /// one per line; the first `proposals` become children.
    Propose { template: String },
}

#[derive(Debug, Clone)]
pub enum ToTEvaluator {
    /// The model rates each state from `template` (`{problem}`, `{state}`), `samples` times,
    /// each reply one line of at most `max_tokens`; the last of the words sure / likely /
    /// impossible in a reply counts 20 / 1 / 0.001 and the sum is the value.
    SelfValue {
        template: String,
        samples: usize,
        max_tokens: usize,
    },
    Callback(Evaluator),
    /// A loaded verifier's score of the state's steps (aggregated as it says).
    Verifier(Arc<Verifier>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToTSearch {
    Bfs,
    Dfs,
}

#[derive(Debug, Clone)]
pub struct ToTParams {
    pub step_delimiter: String,
    pub proposals: usize,
    pub breadth: usize,
    pub depth: usize,
    pub generate: ToTGenerate,
    pub evaluator: ToTEvaluator,
    pub search: ToTSearch,
    /// DFS prunes states valued below it; BFS ignores it.
    pub value_threshold: f64,
    pub max_step_tokens: usize,
    pub sampling: SamplingParams,
    pub cold: TokenScorer,
    /// Reads the output's `answer` from the chosen path (none: no answer).
    pub extract: Option<Extractor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    Greedy,
    Sample,
}

#[derive(Debug, Clone)]
pub enum Reward {
    /// A rollout's reward is the share of all rollouts so far whose extracted answer equals
    /// its own (0 without an answer).
    SelfConsistency,
    /// `(prompt, path + rollout) -> reward`.
    Callback(Scorer),
    /// A loaded verifier's score of the path and its rollout.
    Verifier(Arc<Verifier>),
}

#[derive(Debug, Clone)]
pub struct MctsParams {
    pub iterations: usize,
    pub expansions: usize,
    pub c_puct: f64,
    pub step_delimiter: String,
    pub max_depth: usize,
    pub reward: Reward,
    pub rollout: Rollout,
    /// Reads answers for the self-consistency reward and the output's `answer`.
    pub extract: Extractor,
    pub max_step_tokens: usize,
    pub sampling: SamplingParams,
    pub cold: TokenScorer,
}

#[derive(Debug, Clone)]
pub struct AdaptiveParams {
    /// Tokens to generate over all questions together, probes included.
    pub budget_tokens: usize,
    pub probe: usize,
    /// Samples every question gets at least (probes included), unanimous ones too.
    pub min_n: usize,
    pub max_n: usize,
    pub bins: usize,
    pub sampling: SamplingParams,
    pub extract: Extractor,
    pub cold: TokenScorer,
}

/// PRM beam search and DVTS (see `verifier_beam`).
#[derive(Debug, Clone)]
pub struct VerifierSearchParams {
    /// Samples per step over all beams (search-and-learn's N).
    pub n: usize,
    /// Samples per kept beam (M): beam search keeps `n / beam_width` beams per step.
    pub beam_width: usize,
    /// DVTS: `n / beam_width` independent subtrees, each keeping its best sample per step.
    pub subtrees: bool,
    pub verifier: Arc<Verifier>,
    pub step_delimiter: String,
    pub max_steps: usize,
    pub max_step_tokens: usize,
    pub sampling: SamplingParams,
    /// Reads the finished beams' answers for the weighted vote.
    pub extract: Extractor,
    pub cold: TokenScorer,
}

/// A test-time search strategy and its parameters.
#[derive(Debug, Clone)]
pub enum SearchSpec {
    Beam(BeamParams),
    BestOfN(BestOfNParams),
    SelfConsistency(SelfConsistencyParams),
    TreeOfThought(ToTParams),
    Mcts(MctsParams),
    Adaptive(AdaptiveParams),
    VerifierSearch(VerifierSearchParams),
}

fn at_least(name: &str, value: usize, min: usize) -> Result<()> {
    if value < min {
        return Err(Error::invalid(format!(
            "{name} must be at least {min}, got {value}"
        )));
    }
    Ok(())
}

fn check_sampling(sampling: &SamplingParams, cold: &TokenScorer) -> Result<()> {
    sampling.validate()?;
    check_token_scorer(cold)
}

/// CoLD as a search's token scorer: it scores the tokens, and the search's own sampling (its
/// temperature, top-k, top-p, min-p, repetition penalty and per-sample seeds) draws from the
/// scores in both rows of a pass. CoLD's own drawing fields would have no effect there, so a
/// value other than their default is refused rather than ignored.
pub(crate) fn check_token_scorer(cold: &TokenScorer) -> Result<()> {
    let Some(c) = cold else { return Ok(()) };
    c.validate()?;
    let ignored = [
        ("sample", c.sample, "the search's sampling draws the tokens"),
        (
            "temperature",
            c.temperature != 1.0,
            "set the search's sampling temperature instead",
        ),
        (
            "seed",
            c.seed != 0,
            "the search seeds each sample from its own sampling seed",
        ),
        (
            "paired",
            !c.paired,
            "a search always runs the base rows in the expert's pass",
        ),
    ];
    match ignored.iter().find(|(_, set, _)| *set) {
        Some((name, _, why)) => Err(Error::invalid(format!(
            "CoLD.{name} has no effect when CoLD scores the tokens of a search ({why}); leave it \
             at its default"
        ))),
        None => Ok(()),
    }
}

impl SearchSpec {
    pub fn name(&self) -> &'static str {
        match self {
            SearchSpec::Beam(_) => "beam search",
            SearchSpec::BestOfN(_) => "best-of-N",
            SearchSpec::SelfConsistency(_) => "self-consistency",
            SearchSpec::TreeOfThought(_) => "Tree-of-Thought",
            SearchSpec::Mcts(_) => "MCTS",
            SearchSpec::Adaptive(_) => "adaptive compute",
            SearchSpec::VerifierSearch(p) if p.subtrees => "DVTS",
            SearchSpec::VerifierSearch(_) => "verifier beam search",
        }
    }

    pub fn cold(&self) -> TokenScorer {
        match self {
            SearchSpec::Beam(p) => p.cold,
            SearchSpec::BestOfN(p) => p.cold,
            SearchSpec::SelfConsistency(p) => p.cold,
            SearchSpec::TreeOfThought(p) => p.cold,
            SearchSpec::Mcts(p) => p.cold,
            SearchSpec::Adaptive(p) => p.cold,
            SearchSpec::VerifierSearch(p) => p.cold,
        }
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        match self {
            SearchSpec::Beam(p) => p.validate(),
            SearchSpec::BestOfN(p) => {
                at_least("n", p.n, 1)?;
                check_sampling(&p.sampling, &p.cold)
            }
            SearchSpec::SelfConsistency(p) => {
                at_least("n", p.n, 1)?;
                at_least("round_size", p.round_size, 1)?;
                if p.verifier.is_some() && (p.weight.is_some() || p.vote != Vote::Weighted) {
                    return Err(Error::invalid(
                        "a verifier weighs a weighted vote: give vote='weighted' and no other \
                         weight",
                    ));
                }
                if let Some(c) = p.stop_when_confident {
                    if !(c > 0.5 && c <= 1.0) {
                        return Err(Error::invalid(format!(
                            "stop_when_confident must be in (0.5, 1], got {c}"
                        )));
                    }
                }
                check_sampling(&p.sampling, &p.cold)
            }
            SearchSpec::TreeOfThought(p) => {
                at_least("proposals", p.proposals, 1)?;
                at_least("breadth", p.breadth, 1)?;
                at_least("depth", p.depth, 1)?;
                at_least("max_step_tokens", p.max_step_tokens, 1)?;
                if p.step_delimiter.is_empty() {
                    return Err(Error::invalid("step_delimiter must not be empty"));
                }
                if let ToTEvaluator::SelfValue {
                    samples,
                    max_tokens,
                    ..
                } = &p.evaluator
                {
                    at_least("value_samples", *samples, 1)?;
                    at_least("value_max_tokens", *max_tokens, 1)?;
                }
                if !p.value_threshold.is_finite() {
                    return Err(Error::invalid(format!(
                        "value_threshold must be finite, got {}",
                        p.value_threshold
                    )));
                }
                check_sampling(&p.sampling, &p.cold)
            }
            SearchSpec::Mcts(p) => {
                at_least("iterations", p.iterations, 1)?;
                at_least("expansions", p.expansions, 1)?;
                at_least("max_depth", p.max_depth, 1)?;
                at_least("max_step_tokens", p.max_step_tokens, 1)?;
                if !(p.c_puct.is_finite() && p.c_puct >= 0.0) {
                    return Err(Error::invalid(format!(
                        "c_puct must be a finite number >= 0, got {}",
                        p.c_puct
                    )));
                }
                if p.step_delimiter.is_empty() {
                    return Err(Error::invalid("step_delimiter must not be empty"));
                }
                check_sampling(&p.sampling, &p.cold)
            }
            SearchSpec::VerifierSearch(p) => {
                at_least("beam_width", p.beam_width, 1)?;
                at_least("n", p.n, p.beam_width)?;
                if p.n % p.beam_width != 0 {
                    return Err(Error::invalid(format!(
                        "n ({}) must be a multiple of beam_width ({}): n / beam_width beams are \
                         kept",
                        p.n, p.beam_width
                    )));
                }
                at_least("max_steps", p.max_steps, 1)?;
                at_least("max_step_tokens", p.max_step_tokens, 1)?;
                if p.step_delimiter.is_empty() {
                    return Err(Error::invalid("step_delimiter must not be empty"));
                }
                check_sampling(&p.sampling, &p.cold)
            }
            SearchSpec::Adaptive(p) => {
                at_least("probe", p.probe, 1)?;
                at_least("bins", p.bins, 1)?;
                if p.max_n < p.probe.max(p.min_n) {
                    return Err(Error::invalid(format!(
                        "max_n ({}) must be at least probe ({}) and min_n ({})",
                        p.max_n, p.probe, p.min_n
                    )));
                }
                check_sampling(&p.sampling, &p.cold)
            }
        }
    }
}
