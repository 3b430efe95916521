//! Model loading: a GGUF file or a Hugging Face folder becomes a [`Model`] plus the metadata the
//! tokenizer and chat template are built from.

mod host_forward;
mod linear;
mod llama;
mod weights;

use std::path::{Path, PathBuf};

use candle_core::Device;

pub use crate::config::{ModelConfig, RopeLayout};
pub use linear::{Embedding, Linear};
pub use llama::{Entry, LogitsFor, Model, RowInput};
pub use weights::WeightDType;

use crate::error::{Error, Result};
use crate::text::TokenizerSource;
use weights::{GgufSource, SafetensorsSource};

/// A loaded model and where its tokenizer comes from.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TokenizerSource,
    /// Bytes of weights as stored in memory (quantized blocks count at their packed size).
    pub weight_bytes: usize,
}

pub fn load(path: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::load(path, "no such file or folder"));
    }
    if path.is_dir() {
        load_hf_folder(path, dtype, device)
    } else {
        load_gguf(path, dtype, device)
    }
}

fn load_gguf(path: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    let mut src = GgufSource::open(path, dtype, device)?;
    let cfg = ModelConfig::from_gguf(src.content(), path)?;
    let tokenizer = TokenizerSource::from_gguf(src.content(), path)?;
    let model = Model::load(cfg, &mut src, dtype.compute_dtype(), device)?;
    let weight_bytes = model.weight_bytes();
    Ok(LoadedModel {
        model,
        tokenizer,
        weight_bytes,
    })
}

fn load_hf_folder(dir: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let json = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::load(&config_path, format!("cannot read config.json: {e}")))?;
    let cfg = ModelConfig::from_hf_json(&json, &config_path)?;
    let tokenizer_json: PathBuf = dir.join("tokenizer.json");
    let tokenizer = TokenizerSource::from_hf_folder(dir, &tokenizer_json)?;
    let mut src = SafetensorsSource::open(dir, dtype, device)?;
    let model = Model::load(cfg, &mut src, dtype.compute_dtype(), device)?;
    let weight_bytes = model.weight_bytes();
    Ok(LoadedModel {
        model,
        tokenizer,
        weight_bytes,
    })
}
