//! The per-sequence KV cache. It is allocated once at the sequence's full context so that its
//! bytes are known to the budget up front and appending never reallocates.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    pub fn new(kv_heads: usize, capacity: usize, head_dim: usize, device: &Device) -> Result<Self> {
        let shape = (kv_heads, capacity, head_dim);
        Ok(LayerKv {
            k: Tensor::zeros(shape, DType::F32, device)?,
            v: Tensor::zeros(shape, DType::F32, device)?,
            len: 0,
        })
    }

    /// Appends `[kv_heads, n, head_dim]` keys and values and returns views of everything cached.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let cap = self.k.dim(1)?;
        if self.len + n > cap {
            return Err(Error::Invalid(format!(
                "context full: {} tokens cached + {n} new exceeds the context size of {cap}",
                self.len
            )));
        }
        self.k.slice_set(&k.contiguous()?, 1, self.len)?;
        self.v.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok((
            self.k.narrow(1, 0, self.len)?,
            self.v.narrow(1, 0, self.len)?,
        ))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything from `len` on, keeping the allocation (for reusing a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
