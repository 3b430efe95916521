//! peftscale-core: a decoding engine for llama-family models over candle.
//!
//! Load a model ([`Engine::load`]), then decode batches of prompts with a strategy
//! ([`Engine::generate`]) or step by step ([`Engine::start`], [`Generation::step`]).

pub mod config;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod kv;
pub mod logits;
pub mod lora;
pub mod model;
pub mod search;
pub mod text;

pub use engine::{Engine, GenerateOptions, Generation, Output, Stats};
pub use error::{Error, Result};
pub use kernels::device::DeviceSpec;
pub use logits::SamplingParams;
pub use model::WeightDType;
