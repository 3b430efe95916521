//! Where the model's tensors come from: a GGUF file or a Hugging Face safetensors folder.
//!
//! The model asks for tensors by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`);
//! the GGUF source translates them to llama.cpp's names (`blk.0.attn_q.weight`). Every tensor is
//! checked against the shape the config implies, so a mismatched file fails at load time.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::linear::{Embedding, Linear};
use crate::error::{Error, Result};

/// The dtype the user asked weights to be held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    /// Keep GGUF weights quantized as stored; dense checkpoints become f32 (the fast CPU dtype).
    Auto,
    F32,
    F16,
    BF16,
}

impl WeightDType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(Error::invalid(format!(
                "dtype must be one of \"auto\", \"f32\", \"f16\", \"bf16\", got {other:?}"
            ))),
        }
    }

    /// A key/value cache dtype by name: `"auto"` (the model's choice) gives `None`.
    pub fn parse_kv(s: &str) -> Result<Option<DType>> {
        match s {
            "auto" => Ok(None),
            "f32" | "float32" => Ok(Some(DType::F32)),
            "f16" | "float16" => Ok(Some(DType::F16)),
            "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
            other => Err(Error::invalid(format!(
                "kv_dtype must be one of \"auto\", \"f32\", \"f16\", \"bf16\", got {other:?}"
            ))),
        }
    }

    /// The dtype of activations and dense weights.
    pub fn compute_dtype(self) -> DType {
        match self {
            Self::Auto | Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

pub(crate) trait TensorSource {
    fn path(&self) -> &Path;
    fn contains(&self, hf_name: &str) -> bool;
    /// A weight matrix `[out, in]` with an optional bias `[out]`.
    fn linear(&mut self, hf_name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear>;
    /// A dense vector (norm weights).
    fn vector(&mut self, hf_name: &str, len: usize) -> Result<Tensor>;
    fn embedding(&mut self, hf_name: &str, vocab: usize, hidden: usize) -> Result<Embedding>;
}

fn shape_error(path: &Path, name: &str, expected: &[usize], found: &[usize]) -> Error {
    Error::load(
        path,
        format!("tensor {name} has shape {found:?}, but the config implies {expected:?}"),
    )
}

/// Tensors of a GGUF file, read on demand.
pub(crate) struct GgufSource {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
    dtype: WeightDType,
    device: Device,
}

impl GgufSource {
    pub fn open(path: &Path, dtype: WeightDType, device: &Device) -> Result<Self> {
        let mut file =
            File::open(path).map_err(|e| Error::load(path, format!("cannot open file: {e}")))?;
        let mut magic = [0u8; 4];
        file.read_exact(&mut magic)
            .map_err(|_| Error::load(path, "file is shorter than a GGUF header"))?;
        if &magic != b"GGUF" {
            return Err(Error::load(
                path,
                format!("not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::load(path, e))?;
        // The header holds one small read per string (hundreds of thousands for a vocabulary).
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| Error::load(path, header_error(&e)))?;
        let file = reader.into_inner();
        let file_len = file.metadata().map_err(|e| Error::load(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .filter(|&n| n as u64 <= file_len.saturating_mul(8))
                .ok_or_else(|| {
                    Error::load(
                        path,
                        format!("tensor {name} has shape {dims:?}, larger than the file can hold"),
                    )
                })?;
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::load(
                    path,
                    format!("tensor {name}: {elems} elements is not a multiple of the {:?} block size {block}", info.ggml_dtype),
                ));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::load(
                        path,
                        format!(
                        "file is truncated or its offsets are wrong: tensor {name} at offset {} \
                             with {bytes} bytes does not fit in the file's {file_len} bytes",
                        info.offset
                    ),
                    ))
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            dtype,
            device: device.clone(),
        })
    }

    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    fn gguf_name(hf_name: &str) -> String {
        let name = hf_name.strip_prefix("model.").unwrap_or(hf_name);
        let name = match name {
            "embed_tokens.weight" => return "token_embd.weight".into(),
            "norm.weight" => return "output_norm.weight".into(),
            "lm_head.weight" => return "output.weight".into(),
            other => other,
        };
        let name = name.replacen("layers.", "blk.", 1);
        [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]
        .iter()
        .fold(name, |n, (hf, gg)| n.replace(hf, gg))
    }

    fn qtensor(&mut self, hf_name: &str, expected: &[usize]) -> Result<QTensor> {
        let name = Self::gguf_name(hf_name);
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name}")))?;
        if info.shape.dims() != expected {
            return Err(shape_error(&self.path, &name, expected, info.shape.dims()));
        }
        self.content
            .tensor(&mut self.file, &name, &self.device)
            .map_err(|e| Error::load(&self.path, format!("cannot read tensor {name}: {e}")))
    }

    fn dense(&self, t: &QTensor) -> Result<Tensor> {
        let dtype = self.dtype.compute_dtype();
        Ok(t.dequantize(&self.device)?.to_dtype(dtype)?)
    }

    /// A matrix as the model will hold it: F16/BF16 stay half precision under `auto` (the host
    /// pass widens them in registers), anything else in the compute dtype.
    fn dense_matrix(&self, t: &QTensor) -> Result<Tensor> {
        match (self.dtype, t.dtype()) {
            (WeightDType::Auto, GgmlDType::F16) => Ok(t.dequantize_f16(&self.device)?),
            (WeightDType::Auto, GgmlDType::BF16) => {
                Ok(t.dequantize(&self.device)?.to_dtype(DType::BF16)?)
            }
            _ => self.dense(t),
        }
    }

    fn keep_quantized(&self, t: &QTensor) -> bool {
        self.dtype == WeightDType::Auto
            && !matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.content
            .tensor_infos
            .contains_key(&Self::gguf_name(hf_name))
    }

    fn linear(&mut self, hf_name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.qtensor(hf_name, &[out, inp])?;
        let b = if bias {
            let bname = hf_name.replace(".weight", ".bias");
            Some(self.vector(&bname, out)?)
        } else {
            None
        };
        if self.keep_quantized(&w) {
            Linear::quantized(Arc::new(w), b)
        } else {
            Linear::dense_for(self.dense_matrix(&w)?, b, self.dtype.compute_dtype())
        }
    }

    fn vector(&mut self, hf_name: &str, len: usize) -> Result<Tensor> {
        let t = self.qtensor(hf_name, &[len])?;
        Ok(t.dequantize(&self.device)?
            .to_dtype(self.dtype.compute_dtype())?)
    }

    fn embedding(&mut self, hf_name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        let t = self.qtensor(hf_name, &[vocab, hidden])?;
        if self.keep_quantized(&t) {
            Ok(Embedding::Quantized(Arc::new(t)))
        } else {
            Ok(Embedding::Dense(self.dense_matrix(&t)?))
        }
    }
}

/// Tensors of a Hugging Face folder (`config.json` + one or more `*.safetensors`).
pub(crate) struct SafetensorsSource {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    /// `dtype="auto"`: F16/BF16 matrices stay half precision.
    keep_half: bool,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, dtype: WeightDType, device: &Device) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::load(dir, format!("cannot list folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::load(dir, "folder has no *.safetensors files"));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            let loaded = candle_core::safetensors::load(f, device)
                .map_err(|e| Error::load(f, format!("malformed safetensors file: {e}")))?;
            tensors.extend(loaded);
        }
        Ok(Self {
            path: dir.to_path_buf(),
            tensors,
            dtype: dtype.compute_dtype(),
            keep_half: dtype == WeightDType::Auto,
        })
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.take_as(name, expected, false)
    }

    /// A matrix: as [`Self::take`], but F16/BF16 stay half precision under `auto`.
    fn take_matrix(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.take_as(name, expected, self.keep_half)
    }

    fn take_as(&self, name: &str, expected: &[usize], keep_half: bool) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name}")))?;
        if t.dims() != expected {
            return Err(shape_error(&self.path, name, expected, t.dims()));
        }
        if keep_half && matches!(t.dtype(), DType::F16 | DType::BF16) {
            return Ok(t.clone());
        }
        Ok(t.to_dtype(self.dtype)?)
    }
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }

    fn linear(&mut self, hf_name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.take_matrix(hf_name, &[out, inp])?;
        let b = if bias {
            Some(self.take(&hf_name.replace(".weight", ".bias"), &[out])?)
        } else {
            None
        };
        Linear::dense_for(w, b, self.dtype)
    }

    fn vector(&mut self, hf_name: &str, len: usize) -> Result<Tensor> {
        self.take(hf_name, &[len])
    }

    fn embedding(&mut self, hf_name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        Ok(Embedding::Dense(
            self.take_matrix(hf_name, &[vocab, hidden])?,
        ))
    }
}

/// Why candle refused a GGUF header, in words. A tensor type it has no blocks for (the i-quants,
/// the ternary types, MXFP4) is named as unsupported rather than as a malformed file; candle's
/// backtrace (captured when `RUST_BACKTRACE` is set) stays out of the message.
fn header_error(e: &candle_core::Error) -> String {
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => inner.as_ref(),
        e => e,
    };
    let text = e.to_string();
    let code = text
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|c| c.trim().parse::<u32>().ok());
    match code {
        Some(code) => format!(
            "tensor type {} (GGML type {code}) is not supported; requantize the file with \
             llama-quantize to Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1 or F16",
            ggml_type_name(code)
        ),
        None => format!("malformed GGUF header: {text}"),
    }
}

/// GGML's name for the tensor types candle does not read.
fn ggml_type_name(code: u32) -> &'static str {
    match code {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}
