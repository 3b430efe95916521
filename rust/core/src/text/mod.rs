//! Text in and out of the engine: the tokenizer, incremental decoding, stop strings and the chat
//! template.

mod chat;
mod stop;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use stop::StopMatcher;
pub use tokenizer::{Tokenizer, TokenizerSource};
