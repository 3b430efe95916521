//! The error type of the engine. Every failure a user can cause maps to one readable variant.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file or folder could not be read or does not describe a supported model.
    #[error("cannot load model from {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },

    /// A LoRA adapter folder could not be read, does not fit the model, or uses a feature the
    /// engine does not apply.
    #[error("cannot load adapter from {path}: {reason}")]
    AdapterLoad { path: PathBuf, reason: String },

    /// A parameter is outside its allowed range or an input is empty.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The requested device is missing from this build or this machine.
    #[error("device `{device}` is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    /// The prompt (plus the tokens to generate) does not fit in the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens does not fit the model's context of {context} tokens \
         (at least one position must remain for a new token)"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        context: usize,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// The model produced NaN or infinite logits, so no token can be chosen honestly.
    #[error(
        "non-finite logits at generation step {step} of row {row}: the model produced NaN/inf"
    )]
    NonFiniteLogits { row: usize, step: usize },

    /// A user callback (scorer, extractor, evaluator, reward) failed or returned a bad value.
    /// The Python bindings re-raise the callback's own exception in place of this one.
    #[error("{what} callback failed: {message}")]
    Callback { what: String, message: String },

    /// An internal tensor operation failed; this is a bug or an unsupported configuration.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn load(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::ModelLoad {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn adapter(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::AdapterLoad {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::InvalidArgument(msg.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
