//! The tokenizer, built from `tokenizer.json` or rebuilt from GGUF metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Parses a `tokenizer.json` document. `tokenizers` unwraps some of its own parse errors
/// (malformed decoder sections panic inside its deserializer), so a panic is turned into the
/// same error as any other malformed file.
fn parse_tokenizer_json(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
        .map_err(|panic| {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("malformed tokenizer definition ({detail})")
        })?
        .map_err(|e| e.to_string())
}

/// Everything about text that a model file declares.
#[derive(Clone)]
pub struct TokenizerSource {
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<String>,
}

/// A token's `(start, end)` byte offsets in the text it was encoded from.
pub type Span = (usize, usize);

/// A byte-level BPE (or any `tokenizers`) tokenizer with the model's special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids it knows, added tokens included (counted once: `tokenizers` rebuilds its vocabulary
    /// map to count them).
    vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Prepend `bos_token_id` by hand (GGUF); Hugging Face folders let tokenizer.json's own
    /// post-processor decide, as transformers does.
    pub add_bos_token: bool,
    add_special_tokens: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Tokenizer {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, self.add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// [`Self::encode`], with each token's byte span in `text` (a prepended BOS spans nothing).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .inner
            .encode(text, self.add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        if let (true, Some(bos)) = (self.add_bos_token, self.bos_token_id) {
            ids.push(bos);
            offsets.push((0, 0));
        }
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        Ok((ids, offsets))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(format!(
                "token id {id} is outside the tokenizer's {n} tokens"
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Checks that every id the tokenizer can produce exists in the model.
    pub(crate) fn check_fits(&self, cfg: &ModelConfig, path: &Path) -> Result<()> {
        let n = self.vocab_size();
        if n > cfg.vocab_size {
            return Err(Error::load(
                path,
                format!(
                    "tokenizer has {n} tokens but the model's vocabulary has {}",
                    cfg.vocab_size
                ),
            ));
        }
        Ok(())
    }
}

fn gguf_strings(content: &gguf_file::Content, key: &str, path: &Path) -> Result<Vec<String>> {
    let arr = content
        .metadata
        .get(key)
        .ok_or_else(|| Error::load(path, format!("missing GGUF metadata {key}")))?
        .to_vec()
        .map_err(|e| Error::load(path, format!("GGUF metadata {key}: {e}")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| Error::load(path, format!("GGUF metadata {key}: {e}")))
        })
        .collect()
}

fn gguf_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

impl TokenizerSource {
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let kind = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned());
        let Some(kind) = kind else {
            return Ok(Self {
                tokenizer: None,
                chat_template,
            });
        };
        if kind != "gpt2" {
            return Err(Error::load(
                path,
                format!(
                    "GGUF tokenizer model {kind:?} is not supported yet (only byte-level BPE, \"gpt2\"); \
                     load a Hugging Face folder with tokenizer.json instead"
                ),
            ));
        }
        let tokens = gguf_strings(content, "tokenizer.ggml.tokens", path)?;
        let merges = gguf_strings(content, "tokenizer.ggml.merges", path)?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| Error::load(path, e))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(Error::load(path, format!("malformed BPE merge {m:?}"))),
            })
            .collect::<Result<_>>()?;
        // GGUF token type 3 marks control tokens, which the text splitter must keep whole.
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3)
            .map(|(i, (t, _))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner = parse_tokenizer_json(&spec.to_string()).map_err(|e| {
            Error::load(
                path,
                format!("cannot build tokenizer from GGUF metadata: {e}"),
            )
        })?;
        let bos_token_id = gguf_u32(content, "tokenizer.ggml.bos_token_id");
        let eos = gguf_u32(content, "tokenizer.ggml.eos_token_id");
        let add_bos_token = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            tokenizer: Some(Tokenizer {
                vocab_size: inner.get_vocab_size(true),
                inner,
                bos_token_id,
                eos_token_ids: eos.into_iter().collect(),
                add_bos_token,
                add_special_tokens: false,
                bos_token: name(bos_token_id),
                eos_token: name(eos),
            }),
            chat_template,
        })
    }

    pub fn from_hf_folder(dir: &Path, tokenizer_json: &Path) -> Result<Self> {
        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(s) => serde_json::from_str(&s)
                    .map(Some)
                    .map_err(|e| Error::load(&p, format!("invalid JSON: {e}"))),
                Err(_) => Ok(None),
            }
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let generation = read_json("generation_config.json")?.unwrap_or(Value::Null);
        let model_config = read_json("config.json")?.unwrap_or(Value::Null);
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        if !tokenizer_json.exists() {
            return Ok(Self {
                tokenizer: None,
                chat_template,
            });
        }
        let text = std::fs::read_to_string(tokenizer_json)
            .map_err(|e| Error::load(tokenizer_json, format!("cannot read tokenizer.json: {e}")))?;
        let inner = parse_tokenizer_json(&text)
            .map_err(|e| Error::load(tokenizer_json, format!("invalid tokenizer.json: {e}")))?;
        // A token can be named by a string or by {"content": ...} in tokenizer_config.json.
        let token_name = |key: &str| -> Option<String> {
            match config.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_name("bos_token");
        let eos_token = token_name("eos_token");
        let ids_from = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut eos_token_ids = ids_from(generation.get("eos_token_id"));
        if eos_token_ids.is_empty() {
            eos_token_ids = ids_from(model_config.get("eos_token_id"));
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| ids_from(model_config.get("bos_token_id")).first().copied());
        Ok(Self {
            tokenizer: Some(Tokenizer {
                vocab_size: inner.get_vocab_size(true),
                inner,
                bos_token_id,
                eos_token_ids,
                add_bos_token: false,
                add_special_tokens: true,
                bos_token,
                eos_token,
            }),
            chat_template,
        })
    }
}
