//! The per-sequence KV cache of one layer. It is allocated once, so its bytes are known to the
//! budget up front and appending never reallocates.
//!
//! A sliding-window layer keeps only what its window can still see: room for `window - 1` old
//! tokens plus one step's new tokens. When a step would overflow it, the oldest tokens are
//! dropped, so its size no longer grows with the context.
//!
//! A Gated DeltaNet layer keeps no keys or values at all: its cache is a fixed-size recurrent
//! state ([`crate::kernels::delta::State`]), whatever the context.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::delta;

pub struct LayerKv {
    k: Tensor,
    /// `None` for a latent cache (MLA), whose values are the first columns of its keys.
    v: Option<Tensor>,
    /// Absolute position of the token in slot 0.
    start: usize,
    /// Slots in use.
    len: usize,
    /// Tokens the sequence may hold in all.
    context: usize,
    window: Option<usize>,
    /// A linear layer's recurrent state, in place of keys and values.
    linear: Option<Box<(delta::Shape, delta::State)>>,
}

/// Slots a layer's cache needs for `context` tokens and steps of up to `max_step` tokens.
pub fn kv_slots(context: usize, window: Option<usize>, max_step: usize) -> usize {
    match window {
        Some(w) => context.min(w.saturating_sub(1) + max_step.max(1)),
        None => context,
    }
}

/// A contiguous copy of `t` in storage of its own, which `slice_set` needs for a source cut
/// from the tensor it writes into. (A narrow of a one-head cache is already contiguous and
/// would share the storage; `contiguous` then returns it as it is.)
fn detached(t: &Tensor) -> Result<Tensor> {
    Ok(if t.is_contiguous() {
        t.copy()?
    } else {
        t.contiguous()?
    })
}

impl LayerKv {
    pub fn new(
        kv_heads: usize,
        context: usize,
        window: Option<usize>,
        max_step: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let shape = (kv_heads, kv_slots(context, window, max_step), head_dim);
        Ok(LayerKv {
            k: Tensor::zeros(shape, DType::F32, device)?,
            v: Some(Tensor::zeros(shape, DType::F32, device)?),
            start: 0,
            len: 0,
            context,
            window,
            linear: None,
        })
    }

    /// A linear layer's cache: its recurrent state and convolution window, in host memory
    /// (the recurrence runs on the CPU).
    pub fn recurrent(shape: delta::Shape, context: usize, rollback_rows: usize) -> Result<Self> {
        Ok(LayerKv {
            k: Tensor::zeros((1, 0, 1), DType::F32, &Device::Cpu)?,
            v: None,
            start: 0,
            len: 0,
            context,
            window: None,
            linear: Some(Box::new((shape, delta::State::new(&shape, rollback_rows)))),
        })
    }

    /// The recurrent state of a linear layer, checked against the context size for `n` new
    /// tokens.
    pub fn state_for(&mut self, n: usize) -> Result<&mut delta::State> {
        let context = self.context;
        let Some(l) = self.linear.as_mut() else {
            return Err(Error::Internal(
                "a linear layer's step on a KV cache".into(),
            ));
        };
        if l.1.pos + n > context {
            return Err(Error::Invalid(format!(
                "context full: {} tokens cached + {n} new exceeds the context size of {context}",
                l.1.pos
            )));
        }
        Ok(&mut l.1)
    }

    /// A latent cache (DeepSeek's MLA): one `[1, context, dim]` tensor of each token's
    /// normalized latent and RoPE key, from which attention reads both keys and values.
    pub fn latent(context: usize, dim: usize, device: &Device) -> Result<Self> {
        Ok(LayerKv {
            k: Tensor::zeros((1, context, dim), DType::F32, device)?,
            v: None,
            start: 0,
            len: 0,
            context,
            window: None,
            linear: None,
        })
    }

    /// Appends `[1, n, dim]` latents to a latent cache and returns a view of everything cached.
    pub fn append_latent(&mut self, c: &Tensor) -> Result<Tensor> {
        if self.v.is_some() {
            return Err(Error::Internal("a latent appended to a KV cache".into()));
        }
        let n = c.dim(1)?;
        if self.pos() + n > self.context {
            return Err(Error::Invalid(format!(
                "context full: {} tokens cached + {n} new exceeds the context size of {}",
                self.pos(),
                self.context
            )));
        }
        self.k.slice_set(&c.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok(self.k.narrow(1, 0, self.len)?)
    }

    /// Appends `[kv_heads, n, head_dim]` keys and values and returns views of everything cached
    /// and the absolute position of its first token.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, usize)> {
        let Some(vc) = self.v.as_ref() else {
            return Err(Error::Internal(
                "keys and values appended to a latent cache".into(),
            ));
        };
        let vc = vc.clone();
        let n = k.dim(1)?;
        let cap = self.k.dim(1)?;
        if self.pos() + n > self.context {
            return Err(Error::Invalid(format!(
                "context full: {} tokens cached + {n} new exceeds the context size of {}",
                self.pos(),
                self.context
            )));
        }
        if self.len + n > cap {
            // Only a sliding layer can get here: keep the last window - 1 tokens.
            let keep = self.window.map_or(self.len, |w| (w - 1).min(self.len));
            let drop = self.len - keep;
            if keep + n > cap {
                return Err(Error::Invalid(format!(
                    "a step of {n} tokens is more than the KV cache was sized for ({cap} slots)"
                )));
            }
            if keep > 0 {
                let k = detached(&self.k.narrow(1, drop, keep)?)?;
                let v = detached(&vc.narrow(1, drop, keep)?)?;
                self.k.slice_set(&k, 1, 0)?;
                vc.slice_set(&v, 1, 0)?;
            }
            self.start += drop;
            self.len = keep;
        }
        self.k.slice_set(&k.contiguous()?, 1, self.len)?;
        vc.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok((
            self.k.narrow(1, 0, self.len)?,
            vc.narrow(1, 0, self.len)?,
            self.start,
        ))
    }

    /// Tokens processed, which is also the position of the next token.
    pub fn pos(&self) -> usize {
        match &self.linear {
            Some(l) => l.1.pos,
            None => self.start + self.len,
        }
    }

    /// Forgets everything from `len` on, keeping the allocation (for reusing a shared prefix),
    /// and returns the length kept: less than `len` when a sliding layer has already dropped
    /// keys that a token at `len` would see.
    /// A linear layer can only go back within its last short step (see
    /// [`delta::State::truncate`]); otherwise it starts over from 0.
    pub fn truncate(&mut self, len: usize) -> usize {
        if let Some(l) = self.linear.as_mut() {
            let (shape, state) = &mut **l;
            return state.truncate(shape, len);
        }
        let need_from = self.window.map_or(0, |w| len.saturating_sub(w - 1));
        if self.start > need_from {
            self.start = 0;
            self.len = 0;
        } else {
            self.len = self.len.min(len - self.start);
        }
        self.pos()
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> u64 {
        if let Some(l) = &self.linear {
            return l.1.bytes();
        }
        let v = self.v.as_ref().map_or(0, |v| v.elem_count());
        ((self.k.elem_count() + v) * 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(heads: usize, n: usize, v: f32) -> Tensor {
        Tensor::full(v, (heads, n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_sliding_layer_keeps_its_window_in_fixed_memory() {
        // One head (where a cut of the cache is contiguous) and two (where it is not).
        for heads in [1, 2] {
            // Window 4, steps of up to 2 tokens: 5 slots, whatever the context.
            let mut kv = LayerKv::new(heads, 100, Some(4), 2, 2, &Device::Cpu).unwrap();
            assert_eq!(kv.bytes(), (heads * 2 * 5 * 2 * 4) as u64);
            for i in 0..10 {
                let (k, _, k0) = kv
                    .append(&tok(heads, 1, i as f32), &tok(heads, 1, 0.0))
                    .unwrap();
                // The three previous tokens and this one are always there.
                assert!(i < 3 || k0 <= i - 3, "step {i}: first key at {k0}");
                let keys: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
                let one: Vec<f32> = (k0..=i).flat_map(|p| [p as f32; 2]).collect();
                assert_eq!(keys, one.repeat(heads), "{heads} heads, step {i}");
            }
            assert_eq!(kv.pos(), 10);
            // Keys before 10 - 3 are gone, so a prefix shorter than that cannot be kept.
            assert_eq!(kv.truncate(9), 9);
            assert_eq!(kv.truncate(5), 0);
        }
        let mut full = LayerKv::new(1, 8, None, 2, 2, &Device::Cpu).unwrap();
        full.append(&tok(1, 2, 1.0), &tok(1, 2, 1.0)).unwrap();
        assert_eq!(full.truncate(1), 1);
        assert!(full.append(&tok(1, 8, 1.0), &tok(1, 8, 1.0)).is_err());
    }
}
