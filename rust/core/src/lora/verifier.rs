//! Verifiers: process or outcome reward models trained by `peftscale train` (methods `prm` and
//! `orm`) as a peft LoRA adapter on the policy's base model plus a value head.
//!
//! A verifier folder holds the adapter, `value_head.safetensors` (`weight` `[1, hidden]`,
//! `bias` `[1]`, f32) and `verifier.json` (`kind`, `step_tag`, `aggregation`, `hidden_size`).
//! The head reads the final normed hidden state (what the LM head reads) at the token that ends
//! each step's tag; its output is the logit of the probability that the step is good. In the
//! engine a verifier row is an ordinary adapter row of the batched forward pass whose output is
//! the head's score instead of vocabulary logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::LoraAdapter;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

pub const HEAD_FILE: &str = "value_head.safetensors";
pub const CONFIG_FILE: &str = "verifier.json";

/// `Linear(hidden, 1)` over the final normed hidden state.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueHead {
    pub weight: Vec<f32>,
    pub bias: f32,
}

impl ValueHead {
    /// The head's output (a logit) for one normed hidden state.
    pub fn score(&self, hidden: &[f32]) -> f32 {
        // Summed in f64: the order of an f32 sum would make the score depend on the kernel.
        let dot: f64 = self
            .weight
            .iter()
            .zip(hidden)
            .map(|(&w, &h)| w as f64 * h as f64)
            .sum();
        (dot + self.bias as f64) as f32
    }
}

/// How a solution's step scores become one score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// The weakest step (a chain is as good as its worst link).
    Min,
    /// The product of the step probabilities.
    Prod,
    /// The last step's score.
    Last,
}

impl Aggregation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "min" => Ok(Self::Min),
            "prod" => Ok(Self::Prod),
            "last" => Ok(Self::Last),
            other => Err(Error::invalid(format!(
                "aggregation must be 'min', 'prod' or 'last', got '{other}'"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Min => "min",
            Self::Prod => "prod",
            Self::Last => "last",
        }
    }

    /// One score from step probabilities; `None` when there are none.
    pub fn apply(self, probs: &[f64]) -> Option<f64> {
        let last = *probs.last()?;
        Some(match self {
            Self::Min => probs.iter().copied().fold(f64::INFINITY, f64::min),
            Self::Prod => probs.iter().product(),
            Self::Last => last,
        })
    }
}

/// The probability a head's logit stands for.
pub fn sigmoid(logit: f32) -> f64 {
    1.0 / (1.0 + (-(logit as f64)).exp())
}

/// A loaded verifier: its adapter (the rows' LoRA updates), its head and how it reads steps.
#[derive(Debug)]
pub struct Verifier {
    pub name: String,
    pub adapter: Arc<LoraAdapter>,
    pub head: Arc<ValueHead>,
    /// `"prm"` (a score after every step) or `"orm"` (one after the whole reply).
    pub kind: String,
    /// The text after every step; the head reads the token that ends it.
    pub step_tag: String,
    pub aggregation: Aggregation,
    pub path: PathBuf,
}

#[derive(serde::Deserialize)]
struct Meta {
    kind: String,
    step_tag: String,
    aggregation: String,
    hidden_size: usize,
}

impl Verifier {
    /// Loads the verifier folder `dir` for a model with `cfg`.
    pub fn load(dir: &Path, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let err = |reason: String| Error::adapter(dir, reason);
        let meta_path = dir.join(CONFIG_FILE);
        let head_path = dir.join(HEAD_FILE);
        for (path, what) in [(&meta_path, CONFIG_FILE), (&head_path, HEAD_FILE)] {
            if dir.is_dir() && !path.is_file() {
                return Err(err(format!(
                    "not a verifier folder: {what} is missing (a verifier is a peft adapter plus \
                     {HEAD_FILE} and {CONFIG_FILE}, as `peftscale train` writes for methods prm \
                     and orm)"
                )));
            }
        }
        let adapter = LoraAdapter::load(dir, name, cfg)?;
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| err(format!("cannot read {CONFIG_FILE}: {e}")))?;
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| err(format!("{CONFIG_FILE} is not a verifier config: {e}")))?;
        if meta.kind != "prm" && meta.kind != "orm" {
            return Err(err(format!(
                "{CONFIG_FILE}: kind must be 'prm' or 'orm', got '{}'",
                meta.kind
            )));
        }
        if meta.step_tag.is_empty() {
            return Err(err(format!("{CONFIG_FILE}: step_tag is empty")));
        }
        let aggregation = Aggregation::parse(&meta.aggregation)
            .map_err(|e| err(format!("{CONFIG_FILE}: {e}")))?;
        let h = cfg.hidden_size;
        if meta.hidden_size != h {
            return Err(err(format!(
                "the value head reads {} values, this model's hidden size is {h}: the verifier \
                 was trained on another base model",
                meta.hidden_size
            )));
        }
        let head = read_head(&head_path, h).map_err(err)?;
        Ok(Self {
            name: name.to_string(),
            adapter: Arc::new(adapter),
            head: Arc::new(head),
            kind: meta.kind,
            step_tag: meta.step_tag,
            aggregation,
            path: dir.to_path_buf(),
        })
    }
}

fn read_head(path: &Path, hidden: usize) -> std::result::Result<ValueHead, String> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("cannot read {HEAD_FILE}: {e}"))?;
    let shape = |key: &str| tensors.get(key).map(|t| t.dims().to_vec());
    let (weight, bias) = match (tensors.get("weight"), tensors.get("bias")) {
        (Some(w), Some(b)) if w.dims() == [1, hidden] && b.dims() == [1] => (w, b),
        _ => {
            return Err(format!(
                "{HEAD_FILE}: expected weight [1, {hidden}] and bias [1] for this base model, got \
                 weight {:?} and bias {:?}",
                shape("weight"),
                shape("bias")
            ))
        }
    };
    let f32s = |t: &candle_core::Tensor| -> std::result::Result<Vec<f32>, String> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("{HEAD_FILE}: {e}"))
    };
    let weight = f32s(weight)?;
    let bias = f32s(bias)?[0];
    if !weight.iter().all(|w| w.is_finite()) || !bias.is_finite() {
        return Err(format!(
            "{HEAD_FILE}: the head holds NaN or infinite values"
        ));
    }
    Ok(ValueHead { weight, bias })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregations_are_their_closed_forms() {
        let p = [0.9, 0.4, 0.7];
        assert_eq!(Aggregation::Min.apply(&p), Some(0.4));
        assert!((Aggregation::Prod.apply(&p).unwrap() - 0.9 * 0.4 * 0.7).abs() < 1e-15);
        assert_eq!(Aggregation::Last.apply(&p), Some(0.7));
        assert_eq!(Aggregation::Min.apply(&[]), None);
        assert!(Aggregation::parse("mean").is_err());
    }

    #[test]
    fn the_head_is_a_dot_product_plus_bias() {
        let head = ValueHead {
            weight: vec![0.5, -2.0, 1.0],
            bias: 0.25,
        };
        assert_eq!(head.score(&[2.0, 1.0, 3.0]), 0.5 * 2.0 - 2.0 + 3.0 + 0.25);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-15);
    }
}
