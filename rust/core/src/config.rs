//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{Error, Result};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints, and Qwen2 in GGUF.
    Halves,
    /// Pairs `(2i, 2i + 1)`: llama.cpp permutes Llama q/k weights into this layout when writing GGUF.
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts biases on the q/k/v projections.
    pub attention_bias: bool,
}

impl ModelConfig {
    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let fail = |reason: String| Err(Error::load(path, reason));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return fail(format!(
                "config has zero heads/layers (heads={}, kv_heads={}, layers={})",
                self.num_heads, self.num_kv_heads, self.num_layers
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "num_attention_heads={} is not a multiple of num_key_value_heads={}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!(
                "head_dim={} must be even and positive",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return fail("config has a zero vocab, hidden or intermediate size".into());
        }
        if self.max_position_embeddings == 0 {
            return fail("config has a zero context length".into());
        }
        // Far above any llama-family model; they keep size arithmetic exact and stop a corrupt
        // header from reserving memory for billions of layers or positions before any tensor
        // is read.
        let limits = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            ("context length", self.max_position_embeddings, 1 << 20),
        ];
        if let Some((name, value, limit)) = limits.iter().find(|(_, v, l)| v > l) {
            return fail(format!(
                "config has {name} = {value}, more than the engine supports ({limit})"
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return fail(format!(
                "config has rms_norm_eps = {} and rope_theta = {}: both must be finite, rope_theta positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        Ok(())
    }

    /// Parameters of the transformer, excluding the input embedding (used for the FLOPs account).
    pub fn matmul_parameters(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size;
        self.num_layers * per_layer + h * self.vocab_size
    }

    pub(crate) fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch = meta_string(content, "general.architecture", path)?;
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::load(
                path,
                format!("unsupported architecture {arch:?} (supported: llama, qwen2, mistral)"),
            ));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| meta_usize(content, &key(k), path);
        let num_heads = u("attention.head_count")?;
        let hidden_size = u("embedding_length")?;
        let num_kv_heads = match content.metadata.get(&key("attention.head_count_kv")) {
            Some(_) => u("attention.head_count_kv")?,
            None => num_heads,
        };
        let head_dim = match content.metadata.get(&key("attention.key_length")) {
            Some(_) => u("attention.key_length")?,
            None => hidden_size / num_heads.max(1),
        };
        let vocab_size = match content.metadata.get(&key("vocab_size")) {
            Some(_) => u("vocab_size")?,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| Error::load(path, "missing tensor token_embd.weight"))?,
        };
        let rope_theta = match content.metadata.get(&key("rope.freq_base")) {
            Some(v) => v.to_f32().map_err(|e| Error::load(path, e))? as f64,
            None => 10_000.0,
        };
        let rms_norm_eps = content
            .metadata
            .get(&key("attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| {
                Error::load(
                    path,
                    format!(
                        "missing metadata {}",
                        key("attention.layer_norm_rms_epsilon")
                    ),
                )
            })?
            .to_f32()
            .map_err(|e| Error::load(path, e))? as f64;
        let cfg = ModelConfig {
            rope_layout: if arch == "qwen2" {
                RopeLayout::Halves
            } else {
                RopeLayout::Interleaved
            },
            attention_bias: arch == "qwen2",
            architecture: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub(crate) fn from_hf_json(json: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(json).map_err(|e| {
            Error::load(
                path,
                format!("config.json is not a valid model config: {e}"),
            )
        })?;
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or(raw.model_type.clone())
            .unwrap_or_default();
        let family = match arch.as_str() {
            "LlamaForCausalLM" | "llama" => "llama",
            "MistralForCausalLM" | "mistral" => "mistral",
            "Qwen2ForCausalLM" | "qwen2" => "qwen2",
            other => {
                return Err(Error::load(
                    path,
                    format!(
                        "unsupported architecture {other:?} (supported: LlamaForCausalLM, \
                         MistralForCausalLM, Qwen2ForCausalLM)"
                    ),
                ))
            }
        };
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(Error::load(
                path,
                format!("rope_scaling {scaling} is not supported yet"),
            ));
        }
        // transformers >= 5 writes RoPE settings as `rope_parameters`; older files use
        // `rope_theta` (and `rope_scaling`, refused above).
        let rope = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
        if let Some(kind) = rope
            .and_then(|r| r.get("rope_type"))
            .and_then(|t| t.as_str())
        {
            if kind != "default" {
                return Err(Error::load(
                    path,
                    format!("rope_type {kind:?} is not supported yet (only \"default\" RoPE)"),
                ));
            }
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10_000.0);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let cfg = ModelConfig {
            architecture: family.to_string(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_layout: RopeLayout::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: family == "qwen2" || raw.attention_bias.unwrap_or(false),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

pub(crate) fn meta_string(content: &gguf_file::Content, key: &str, path: &Path) -> Result<String> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::load(path, format!("missing GGUF metadata {key}")))?
        .to_string()
        .cloned()
        .map_err(|e| Error::load(path, format!("GGUF metadata {key}: {e}")))
}

fn meta_usize(content: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| Error::load(path, format!("missing GGUF metadata {key}")))?;
    let n = match v {
        gguf_file::Value::U64(_) | gguf_file::Value::I64(_) => v.to_u64(),
        _ => v.to_u32().map(u64::from),
    }
    .map_err(|e| Error::load(path, format!("GGUF metadata {key}: {e}")))?;
    usize::try_from(n).map_err(|e| Error::load(path, format!("GGUF metadata {key}: {e}")))
}
