//! Projection and embedding layers whose weights are either quantized (GGML blocks) or dense.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use super::qmatmul::QuantMatrix;
use crate::error::Result;

/// A weight matrix `[out, in]`, applied as `x · Wᵀ (+ b)` to a `[rows, in]` input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
    bytes: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Blocks(QuantMatrix),
    Quantized(QMatMul),
    Dense(Tensor),
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let bytes = weight.elem_count() * weight.dtype().size_in_bytes();
        Ok(Self {
            bytes,
            weight: LinearWeight::Dense(weight),
            bias,
            out_features,
            in_features,
        })
    }

    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            bytes: weight.storage_size_in_bytes(),
            weight: match QuantMatrix::from_qtensor(&weight)? {
                Some(m) => LinearWeight::Blocks(m),
                None => LinearWeight::Quantized(QMatMul::from_arc(weight)?),
            },
            bias,
            out_features,
            in_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of the weight matrix as held in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Blocks(w) => w.matmul(x)?,
            LinearWeight::Quantized(w) => w.forward(x)?,
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    /// Rows of the table for `ids` (`[n]`), as `[n, hidden]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let rows = match self {
            Embedding::Quantized(t) => t.embedding(ids)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?,
        };
        Ok(rows.to_dtype(dtype)?)
    }

    /// The same table as an output projection (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Quantized(t) => Linear::quantized(t.clone(), None),
            Embedding::Dense(t) => Linear::dense(t.clone(), None),
        }
    }
}
