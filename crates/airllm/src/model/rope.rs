//! Rotary position embeddings, with the frequency rescaling of Llama 3.1 and linear
//! interpolation. Frequencies are computed in f32 the way transformers does, so positions far into
//! the context still agree to the last bits.

use candle_core::{Device, Tensor};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;

pub struct Rope {
    inv_freq: Vec<f32>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor).
    scale: f32,
}

impl Rope {
    /// Frequencies for `dim` rotated dimensions of a head, for sequences of up to `context`
    /// tokens (LongRoPE picks its factor set by it, as llama.cpp does by its context size).
    /// `factors`, when given, divide each frequency (llama.cpp's `rope_freqs` tensor).
    pub fn new(cfg: &RopeConfig, dim: usize, factors: Option<&[f32]>, context: usize) -> Self {
        let half = dim / 2;
        let mut scale = 1.0;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        match &cfg.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
                ..
            } => {
                // As transformers: the band's edges in f64, the blend in f32.
                let d = dim as f64;
                let base = cfg.theta as f64;
                let orig = original_max_position_embeddings as f64;
                let edge = |rot: f64| {
                    d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut lo, mut hi) = (edge(beta_fast), edge(beta_slow));
                if truncate {
                    (lo, hi) = (lo.floor(), hi.ceil());
                }
                let (lo, hi) = (lo.max(0.0) as f32, hi.min(d - 1.0) as f32);
                let hi = if lo == hi { hi + 0.001 } else { hi };
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f32 - lo) / (hi - lo)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    let pos = cfg.theta.powf((2 * i) as f32 / dim as f32);
                    *f = 1.0 / (factor * pos) * (1.0 - keep) + 1.0 / pos * keep;
                }
                scale = attention_factor;
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let ext = if context > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                // As transformers: 1 / (ext · θ^(2i/d)), in f32. (A GGUF config has no
                // factors here: they come as `factors`, the file's tensors.)
                for (i, (f, e)) in inv_freq.iter_mut().zip(ext).enumerate() {
                    *f = 1.0 / (e * cfg.theta.powf((2 * i) as f32 / dim as f32));
                }
                scale = *attention_factor;
            }
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_ctx = original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        // Long wavelengths: interpolate fully.
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        // The band between: blend the scaled and unscaled frequency.
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        if let Some(f) = factors {
            for (x, d) in inv_freq.iter_mut().zip(f) {
                *x /= d;
            }
        }
        Rope { inv_freq, scale }
    }

    /// The rotation frequency of each pair of dimensions.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin tables `[positions.len(), head_dim / 2]` for the given absolute positions.
    pub fn cos_sin(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * self.scale);
                sin.push(a.sin() * self.scale);
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ))
    }
}
