//! Tiny random models, adapters and tokenizers written to temporary folders, shared by the
//! integration tests.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peftscale_core::logits::Rng;

pub const VOCAB: usize = 300;
pub const HIDDEN: usize = 32;
pub const INTER: usize = 48;
pub const LAYERS: usize = 2;

/// Uniform noise of standard deviation `std`, the same on every run (seeded).
pub fn noise(shape: &[usize], std: f32, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let half_width = std * 3f32.sqrt();
    let values: Vec<f32> = (0..n)
        .map(|_| (2.0 * rng.next_f32() - 1.0) * half_width)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The shape of a tiny llama: hidden size, query heads, KV heads.
#[derive(Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Dims {
    /// Width of the key and value projections.
    pub fn kv_dim(self) -> usize {
        self.hidden / self.heads * self.kv_heads
    }
}

pub const TINY: Dims = Dims {
    hidden: HIDDEN,
    heads: 4,
    kv_heads: 2,
};

pub fn write_tiny_llama(dir: &Path) {
    write_llama(dir, TINY)
}

pub fn write_llama(dir: &Path, dims: Dims) {
    let Dims {
        hidden,
        heads,
        kv_heads,
    } = dims;
    let kv_dim = dims.kv_dim();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut rng = Rng::new(0, 0);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let w = if shape.len() == 1 {
            Tensor::ones(shape, DType::F32, &dev).unwrap()
        } else {
            noise(shape, 0.2, &mut rng)
        };
        t.insert(name, w);
    };
    add("model.embed_tokens.weight".into(), &[VOCAB, hidden]);
    add("model.norm.weight".into(), &[hidden]);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[hidden]);
        add(format!("{p}.post_attention_layernorm.weight"), &[hidden]);
        add(format!("{p}.self_attn.q_proj.weight"), &[hidden, hidden]);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv_dim, hidden]);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv_dim, hidden]);
        add(format!("{p}.self_attn.o_proj.weight"), &[hidden, hidden]);
        add(format!("{p}.mlp.gate_proj.weight"), &[INTER, hidden]);
        add(format!("{p}.mlp.up_proj.weight"), &[INTER, hidden]);
        add(format!("{p}.mlp.down_proj.weight"), &[hidden, INTER]);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// A random rank-4 peft adapter on all seven projections of the tiny llama.
pub fn write_tiny_adapter(dir: &Path) {
    write_adapter(dir, TINY)
}

pub fn write_adapter(dir: &Path, dims: Dims) {
    let hidden = dims.hidden;
    let kv_dim = dims.kv_dim();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut rng = Rng::new(1, 0);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let shapes = [
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", kv_dim, hidden),
        ("self_attn.v_proj", kv_dim, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", INTER, hidden),
        ("mlp.up_proj", INTER, hidden),
        ("mlp.down_proj", hidden, INTER),
    ];
    for i in 0..LAYERS {
        for (module, out, inp) in shapes {
            let p = format!("base_model.model.model.layers.{i}.{module}");
            let a = noise(&[4, inp], 0.3, &mut rng);
            let b = noise(&[out, 4], 0.3, &mut rng);
            t.insert(format!("{p}.lora_A.weight"), a);
            t.insert(format!("{p}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

/// Special tokens of the tiny vocabulary, at its end.
pub const SPECIALS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// A ChatML template like SmolLM2's.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte-level alphabet: the printable character standing for each byte.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(next);
            next += 1;
        }
    }
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        by_byte[*b as usize] = char::from_u32(*c).unwrap();
    }
    by_byte
}

/// A byte-level BPE vocabulary of exactly `VOCAB` tokens: the 256 bytes, merges of common letter
/// pairs, then the special tokens. Returns the tokens and the merges ("a b").
pub fn tiny_vocab() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    let letters = "etaoinshrd";
    let mut merges = Vec::new();
    'outer: for a in letters.chars() {
        for b in letters.chars() {
            if tokens.len() + SPECIALS.len() == VOCAB {
                break 'outer;
            }
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
        }
    }
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    (tokens, merges)
}

/// `tokenizer.json`, `tokenizer_config.json` (with the ChatML template) for the tiny vocabulary.
pub fn write_tiny_tokenizer(dir: &Path) {
    let (tokens, merges) = tiny_vocab();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .map(|s| {
            serde_json::json!({"id": tokens.iter().position(|t| t == s).unwrap(), "content": s,
                "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let spec = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), spec.to_string()).unwrap();
    let config = serde_json::json!({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": CHATML
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// The tiny llama as a GGUF file: llama.cpp's metadata keys and tensor names, a byte-level BPE
/// vocabulary and the ChatML template, and tensors in several storage types (F32 norms, F16 and
/// Q8_0 matrices). `metadata` entries replace or extend the defaults (so a real model's tokenizer
/// can be put on the tiny weights); `vocab` is the embedding's row count.
pub fn tiny_gguf(
    metadata: Vec<(String, candle_core::quantized::gguf_file::Value)>,
    vocab: usize,
) -> Vec<u8> {
    use candle_core::quantized::gguf_file::Value as V;
    use candle_core::quantized::{GgmlDType, QTensor};
    let (tokens, merges) = tiny_vocab();
    let strings = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let mut types = vec![V::I32(1); tokens.len()];
    for t in types.iter_mut().skip(VOCAB - SPECIALS.len()) {
        *t = V::I32(3);
    }
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        (
            "llama.attention.head_count".into(),
            V::U32(TINY.heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            V::U32(TINY.kv_heads as u32),
        ),
        ("llama.embedding_length".into(), V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), V::U32(INTER as u32)),
        ("llama.block_count".into(), V::U32(LAYERS as u32)),
        ("llama.context_length".into(), V::U32(512)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), V::F32(10000.0)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        (
            "tokenizer.ggml.bos_token_id".into(),
            V::U32((VOCAB - 2) as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            V::U32((VOCAB - 1) as u32),
        ),
        ("tokenizer.chat_template".into(), V::String(CHATML.into())),
    ];
    for (k, v) in metadata {
        match meta.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => meta.push((k, v)),
        }
    }
    let mut rng = Rng::new(2, 0);
    let kv_dim = TINY.kv_dim();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType| {
        let w = if shape.len() == 1 {
            Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
        } else {
            noise(shape, 0.2, &mut rng)
        };
        tensors.push((name, QTensor::quantize(&w, dtype).unwrap()));
    };
    add(
        "token_embd.weight".into(),
        &[vocab, HIDDEN],
        GgmlDType::Q8_0,
    );
    add("output_norm.weight".into(), &[HIDDEN], GgmlDType::F32);
    for i in 0..LAYERS {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), &[HIDDEN], GgmlDType::F32);
        add(format!("{p}.ffn_norm.weight"), &[HIDDEN], GgmlDType::F32);
        add(
            format!("{p}.attn_q.weight"),
            &[HIDDEN, HIDDEN],
            GgmlDType::Q8_0,
        );
        add(
            format!("{p}.attn_k.weight"),
            &[kv_dim, HIDDEN],
            GgmlDType::F16,
        );
        add(
            format!("{p}.attn_v.weight"),
            &[kv_dim, HIDDEN],
            GgmlDType::F16,
        );
        add(
            format!("{p}.attn_output.weight"),
            &[HIDDEN, HIDDEN],
            GgmlDType::F32,
        );
        add(
            format!("{p}.ffn_gate.weight"),
            &[INTER, HIDDEN],
            GgmlDType::Q8_0,
        );
        add(
            format!("{p}.ffn_up.weight"),
            &[INTER, HIDDEN],
            GgmlDType::F16,
        );
        add(
            format!("{p}.ffn_down.weight"),
            &[HIDDEN, INTER],
            GgmlDType::F32,
        );
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}
