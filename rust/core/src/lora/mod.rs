//! peft LoRA adapters, loaded once and applied unmerged: `y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`.
//!
//! An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`A`: `[r, in]`, `B`:
//! `[out, r]`). The scale is `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, where `r` and
//! `alpha` may be overridden per module by `rank_pattern` / `alpha_pattern`. What this engine
//! cannot apply exactly (DoRA, `modules_to_save`, embedding or head adapters, trained biases) is
//! refused with an error naming it, never loaded approximately.

mod config;
pub mod verifier;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, DeviceLocation, Tensor};

use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::kernels::cpu::host_f32;
pub use config::AdapterConfig;
pub use verifier::{Aggregation, ValueHead, Verifier};

/// The seven projections of a llama-family layer an adapter can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name peft and transformers use.
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    pub fn from_module_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.module_name() == name)
    }

    /// `(out_features, in_features)` of this projection in a model with `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Proj::Q => (q, h),
            Proj::K | Proj::V => (kv, h),
            Proj::O => (h, q),
            Proj::Gate | Proj::Up => (cfg.intermediate_size, h),
            Proj::Down => (h, cfg.intermediate_size),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The low-rank update of one projection, as f32 on the host.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    /// `B` transposed, `[rank, out]` row-major: the up-projection adds `rank` scaled rows of it.
    pub bt: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

impl LoraPair {
    pub fn in_features(&self) -> usize {
        self.a.len() / self.rank
    }

    pub fn out_features(&self) -> usize {
        self.b.len() / self.rank
    }

    /// Parameters of `A` and `B` together.
    pub fn params(&self) -> usize {
        self.a.len() + self.b.len()
    }
}

/// One projection's update as tensors on the model's device, as peft stores it.
#[derive(Debug, Clone)]
pub struct DevicePair {
    /// `A`, `[rank, in]`.
    pub a: Tensor,
    /// `B`, `[out, rank]`.
    pub b: Tensor,
    pub scale: f64,
    /// The scale as an f32 tensor `[1]` on the device (the CUDA kernel reads it there).
    pub scales: Tensor,
}

/// An adapter's updates as tensors on one device, in one dtype (the tensor forward pass's form).
#[derive(Debug)]
pub struct DeviceLora {
    layers: Vec<[Option<DevicePair>; 7]>,
}

impl DeviceLora {
    pub fn pair(&self, layer: usize, proj: Proj) -> Option<&DevicePair> {
        self.layers.get(layer)?[proj.index()].as_ref()
    }
}

/// A loaded adapter: per layer, an optional update for each of the seven projections.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub path: PathBuf,
    pub config: AdapterConfig,
    layers: Vec<[Option<LoraPair>; 7]>,
    /// The tensor form per (device, dtype), made on first use and kept while the adapter lives.
    on_devices: Mutex<Vec<(DeviceLocation, DType, Arc<DeviceLora>)>>,
}

impl LoraAdapter {
    /// Loads the adapter folder `dir` for a model with `cfg`, checking every tensor against the
    /// model's shapes and the config.
    pub fn load(dir: &Path, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let err = |reason: String| Error::adapter(dir, reason);
        if !dir.is_dir() {
            return Err(err(
                "not a folder (expected a peft adapter folder with adapter_config.json)".into(),
            ));
        }
        let config = AdapterConfig::read(&dir.join("adapter_config.json"))?;
        config.check_supported(dir)?;
        for module in config.target_module_names() {
            if module == "embed_tokens" || module == "lm_head" {
                return Err(err(format!(
                    "target_modules includes `{module}`: adapters on the embedding or the output head \
                     are not supported (only q/k/v/o/gate/up/down projections)"
                )));
            }
            if Proj::from_module_name(&module).is_none() {
                return Err(err(format!(
                    "target_modules names `{module}`, which a llama-family model does not have \
                     (it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                )));
            }
        }
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (adapter_model.bin is a pickle; save with safe_serialization=True)"
            } else {
                ""
            };
            return Err(err(format!("adapter_model.safetensors is missing{hint}")));
        }
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| err(format!("cannot read adapter_model.safetensors: {e}")))?;

        let mut halves: HashMap<(usize, Proj), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, tensor) in tensors {
            let (layer, proj, half) = parse_key(&key).map_err(&err)?;
            if layer >= cfg.num_layers {
                return Err(err(format!(
                    "tensor {key} is for layer {layer}, but the model has {} layers",
                    cfg.num_layers
                )));
            }
            if !config.targets(proj, layer) {
                return Err(err(format!(
                    "tensor {key} is for {}.{} of layer {layer}, which adapter_config.json does not \
                     target (target_modules / layers_to_transform)",
                    proj.parent(),
                    proj.module_name()
                )));
            }
            let entry = halves.entry((layer, proj)).or_default();
            match half {
                Half::A => entry.0 = Some(tensor),
                Half::B => entry.1 = Some(tensor),
            }
        }
        if halves.is_empty() {
            return Err(err("adapter_model.safetensors holds no LoRA tensors".into()));
        }

        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..cfg.num_layers).map(|_| Default::default()).collect();
        for ((layer, proj), (a, b)) in halves {
            let module = format!(
                "model.layers.{layer}.{}.{}",
                proj.parent(),
                proj.module_name()
            );
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!("{module} has only one of lora_A / lora_B")));
            };
            let (out_f, in_f) = proj.shape(cfg);
            let (rank, a_in) = a
                .dims2()
                .map_err(|e| err(format!("{module}.lora_A: {e}")))?;
            let (b_out, b_rank) = b
                .dims2()
                .map_err(|e| err(format!("{module}.lora_B: {e}")))?;
            if a_in != in_f || b_out != out_f || b_rank != rank || rank == 0 {
                return Err(err(format!(
                    "{module}: lora_A is [{rank}, {a_in}] and lora_B is [{b_out}, {b_rank}], but this \
                     model's {} is [{out_f}, {in_f}] (an adapter trained for a different base model?)",
                    proj.module_name()
                )));
            }
            let expected_rank = config.rank_for(&module);
            if expected_rank != rank {
                return Err(err(format!(
                    "{module} has rank {rank} but adapter_config.json gives it rank {expected_rank} \
                     (r / rank_pattern)"
                )));
            }
            let alpha = config.alpha_for(&module);
            let scale = if config.use_rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            let mut b = host_f32(&b)?;
            // A GGUF llama stores q/k rows in the interleaved RoPE order (llama.cpp permutes them
            // at conversion); peft's B rows follow the Hugging Face order, so permute them alike.
            if cfg.rope_layout == RopeLayout::Interleaved {
                match proj {
                    Proj::Q => b = interleave_heads(&b, cfg.num_heads, cfg.head_dim, rank),
                    Proj::K => b = interleave_heads(&b, cfg.num_kv_heads, cfg.head_dim, rank),
                    _ => {}
                }
            }
            let out = b.len() / rank;
            let mut bt = vec![0f32; b.len()];
            for (r, row) in b.chunks_exact(rank).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    bt[k * out + r] = v;
                }
            }
            let pair = LoraPair {
                a: host_f32(&a)?,
                b,
                bt,
                rank,
                scale: scale as f32,
            };
            if !pair.a.iter().chain(&pair.b).all(|v| v.is_finite()) {
                return Err(err(format!("{module} holds NaN or infinite weights")));
            }
            layers[layer][proj.index()] = Some(pair);
        }
        Ok(Self {
            name: name.to_string(),
            path: dir.to_path_buf(),
            config,
            layers,
            on_devices: Mutex::new(Vec::new()),
        })
    }

    /// The updates as `dtype` tensors on `device`, copied there once per (device, dtype).
    pub fn on_device(&self, device: &Device, dtype: DType) -> Result<Arc<DeviceLora>> {
        let location = device.location();
        let mut cache = self
            .on_devices
            .lock()
            .map_err(|_| Error::invalid("the adapter's device cache was poisoned by a panic"))?;
        if let Some((_, _, lora)) = cache
            .iter()
            .find(|(loc, dt, _)| *loc == location && *dt == dtype)
        {
            return Ok(lora.clone());
        }
        let tensor = |data: &[f32], rows: usize, cols: usize| -> Result<Tensor> {
            let t = Tensor::from_slice(data, (rows, cols), &Device::Cpu)?;
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for pairs in &self.layers {
            let mut out: [Option<DevicePair>; 7] = Default::default();
            for (slot, pair) in out.iter_mut().zip(pairs) {
                if let Some(p) = pair {
                    *slot = Some(DevicePair {
                        a: tensor(&p.a, p.rank, p.in_features())?,
                        b: tensor(&p.b, p.out_features(), p.rank)?,
                        scale: f64::from(p.scale),
                        scales: Tensor::new(&[p.scale], device)?,
                    });
                }
            }
            layers.push(out);
        }
        let lora = Arc::new(DeviceLora { layers });
        cache.push((location, dtype, lora.clone()));
        Ok(lora)
    }

    /// The update of projection `proj` in layer `layer`, if the adapter has one.
    pub fn pair(&self, layer: usize, proj: Proj) -> Option<&LoraPair> {
        self.layers.get(layer)?[proj.index()].as_ref()
    }

    /// How many of the bottom layers compute exactly what they compute with `other` (the base
    /// model when `None`): the same updates, bit for bit, on the same projections. Rows of the
    /// two share those layers' hidden states, keys and values.
    pub fn shared_layers(&self, other: Option<&LoraAdapter>) -> usize {
        let same = |a: &Option<LoraPair>, b: Option<&LoraPair>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.rank == b.rank && a.scale == b.scale && a.a == b.a && a.b == b.b
            }
            _ => false,
        };
        self.layers
            .iter()
            .enumerate()
            .take_while(|(li, pairs)| {
                pairs
                    .iter()
                    .enumerate()
                    .all(|(p, pair)| same(pair, other.and_then(|o| o.layers.get(*li)?[p].as_ref())))
            })
            .count()
    }

    /// Parameters of all `A` and `B` matrices.
    pub fn params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(LoraPair::params)
            .sum()
    }
}

/// The indices of `adapters` grouped by adapter (compared by identity; `None`, the base model,
/// forms a group too), groups in order of first appearance.
pub(crate) fn group_by_adapter<'a>(
    adapters: impl IntoIterator<Item = Option<&'a LoraAdapter>>,
) -> Vec<(Option<&'a LoraAdapter>, Vec<usize>)> {
    let id = |a: Option<&LoraAdapter>| a.map(|a| a as *const LoraAdapter);
    let mut groups: Vec<(Option<&LoraAdapter>, Vec<usize>)> = Vec::new();
    for (i, adapter) in adapters.into_iter().enumerate() {
        match groups.iter_mut().find(|(a, _)| id(*a) == id(adapter)) {
            Some((_, members)) => members.push(i),
            None => groups.push((adapter, vec![i])),
        }
    }
    groups
}

/// Reorders the rows of `[heads * head_dim, cols]` from the half-split RoPE order to the
/// interleaved one: within each head, row `i` goes to `2i` and row `i + head_dim/2` to `2i + 1`.
fn interleave_heads(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..head_dim {
            let dst = h * head_dim + if i < half { 2 * i } else { 2 * (i - half) + 1 };
            let src = h * head_dim + i;
            out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
        }
    }
    out
}

enum Half {
    A,
    B,
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.{adapter}].weight`.
fn parse_key(key: &str) -> std::result::Result<(usize, Proj, Half), String> {
    let unsupported = |what: &str| {
        Err(format!(
            "tensor {key}: {what} is not supported by the engine"
        ))
    };
    if key.contains("lora_magnitude_vector") {
        return unsupported("DoRA (lora_magnitude_vector)");
    }
    if key.contains("lora_embedding_") || key.contains("embed_tokens") {
        return unsupported("an adapter on the token embedding");
    }
    if key.contains("lm_head") {
        return unsupported("an adapter on lm_head");
    }
    if key.ends_with(".bias") {
        return unsupported("a trained bias");
    }
    let parts: Vec<&str> = key.split('.').collect();
    let Some(li) = parts.iter().position(|p| *p == "layers") else {
        return Err(format!(
            "tensor {key} is not a LoRA weight of a decoder layer"
        ));
    };
    let layer = parts
        .get(li + 1)
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| format!("tensor {key}: no layer number after `layers`"))?;
    let proj = parts
        .get(li + 3)
        .and_then(|s| Proj::from_module_name(s))
        .ok_or_else(|| format!("tensor {key} does not adapt a q/k/v/o/gate/up/down projection"))?;
    let half = match parts.get(li + 4) {
        Some(&"lora_A") => Half::A,
        Some(&"lora_B") => Half::B,
        _ => return Err(format!("tensor {key} is neither lora_A nor lora_B")),
    };
    if parts.last() != Some(&"weight") {
        return Err(format!("tensor {key} is not a weight"));
    }
    Ok((layer, proj, half))
}
