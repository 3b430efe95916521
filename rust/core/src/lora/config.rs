//! `adapter_config.json` of a peft LoRA adapter: the fields the engine applies, and the checks
//! that refuse what it cannot apply exactly.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::Proj;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub enum TargetModules {
    /// peft's "all-linear": every linear layer but the output head.
    AllLinear,
    Names(Vec<String>),
    /// A regular expression peft full-matches against module names; the adapter's tensors then
    /// say which modules it adapts.
    Regex(String),
}

#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
    raw: serde_json::Map<String, Value>,
}

impl AdapterConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(path);
        let err = |reason: String| Error::adapter(dir, reason);
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read adapter_config.json: {e}")))?;
        let raw: serde_json::Map<String, Value> = serde_json::from_str(&text)
            .map_err(|e| err(format!("adapter_config.json is not a JSON object: {e}")))?;
        let peft_type = raw
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(err(format!(
                "peft_type is {peft_type}; only LORA adapters are supported"
            )));
        }
        let r = raw
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| err("`r` is missing or not a positive integer".into()))?
            as usize;
        let lora_alpha = match raw.get("lora_alpha") {
            None => 8.0, // peft's default
            Some(v) => v
                .as_f64()
                .ok_or_else(|| err("`lora_alpha` is not a number".into()))?,
        };
        let use_rslora = flag(&raw, "use_rslora").map_err(&err)?;
        let target_modules = match raw.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| err("`target_modules` holds a non-string".into()))
                    })
                    .collect::<Result<_>>()?,
            ),
            None | Some(Value::Null) => {
                return Err(err("`target_modules` is missing".into()));
            }
            Some(other) => {
                return Err(err(format!(
                    "`target_modules` has an unexpected value {other}"
                )))
            }
        };
        let rank_pattern = pattern_map(&raw, "rank_pattern", |v| {
            v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })
        .map_err(&err)?;
        let alpha_pattern = pattern_map(&raw, "alpha_pattern", Value::as_f64).map_err(&err)?;
        let layers_to_transform = match raw.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| err("`layers_to_transform` is not a layer index".into()))?
                as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| err("`layers_to_transform` holds a non-index".into()))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(err(format!(
                    "`layers_to_transform` has an unexpected value {other}"
                )))
            }
        };
        Ok(Self {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            base_model_name_or_path: raw
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        })
    }

    /// Refuses the features the engine cannot apply exactly.
    pub fn check_supported(&self, dir: &Path) -> Result<()> {
        let err = |reason: &str| Err(Error::adapter(dir, reason));
        let is_set = |key: &str| flag(&self.raw, key).map_err(|e| Error::adapter(dir, e));
        if is_set("use_dora")? {
            return err("DoRA (use_dora=true) is not supported; merge it with peft and load the merged model");
        }
        if let Some(v) = self.raw.get("modules_to_save") {
            if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) {
                return err(
                    "modules_to_save is set: the adapter replaces whole modules, which the engine \
                            does not support",
                );
            }
        }
        if let Some(bias) = self.raw.get("bias").and_then(Value::as_str) {
            if bias != "none" {
                return Err(Error::adapter(
                    dir,
                    format!("bias=\"{bias}\" trains biases, which the engine does not apply"),
                ));
            }
        }
        if is_set("lora_bias")? {
            return err("lora_bias=true is not supported");
        }
        if is_set("fan_in_fan_out")? {
            return err("fan_in_fan_out=true (GPT-2 style Conv1D weights) does not fit a llama-family model");
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if key.contains(|c: char| "*+?[](){}|^$\\".contains(c)) {
                return Err(Error::adapter(
                    dir,
                    format!(
                        "rank_pattern/alpha_pattern key `{key}` is a regular expression; only module \
                         names and dotted name suffixes are supported"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Module names `target_modules` lists (empty for "all-linear" and regular expressions).
    pub fn target_module_names(&self) -> Vec<String> {
        match &self.target_modules {
            TargetModules::Names(names) => names
                .iter()
                .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
                .collect(),
            TargetModules::AllLinear | TargetModules::Regex(_) => Vec::new(),
        }
    }

    /// Whether the config targets projection `proj` of layer `layer`.
    pub fn targets(&self, proj: Proj, layer: usize) -> bool {
        let module = match &self.target_modules {
            TargetModules::AllLinear | TargetModules::Regex(_) => true,
            TargetModules::Names(names) => names
                .iter()
                .any(|n| n.rsplit('.').next() == Some(proj.module_name())),
        };
        module
            && self
                .layers_to_transform
                .as_ref()
                .is_none_or(|ls| ls.contains(&layer))
    }

    /// The rank of module `module` (a full name such as `model.layers.0.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> usize {
        pattern_value(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }
}

fn flag(raw: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<bool, String> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("`{key}` should be true or false, not {other}")),
    }
}

fn pattern_map<T>(
    raw: &serde_json::Map<String, Value>,
    key: &str,
    parse: impl Fn(&Value) -> Option<T>,
) -> std::result::Result<BTreeMap<String, T>, String> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                parse(v)
                    .map(|v| (k.clone(), v))
                    .ok_or_else(|| format!("`{key}` gives `{k}` an invalid value {v}"))
            })
            .collect(),
        Some(other) => Err(format!("`{key}` should be an object, not {other}")),
    }
}

/// peft's rule: a pattern key applies to a module whose name is the key or ends with `.key`.
/// Should several keys match one module, peft takes the first in the file and this the first in
/// sorted order.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}
