//! The one decoder block. Every supported architecture is this block with different options
//! ([`BlockSpec`]): pre-norm attention with GQA and RoPE, then a gated SiLU MLP.
//!
//! The batch is packed: the rows of `x` are the new tokens of all sequences back to back, so the
//! projections run as one matmul over the whole batch, and only attention is done per sequence,
//! against that sequence's own KV cache.

use candle_core::{DType, Device, Tensor};

use crate::config::{Activation, ModelConfig};
use crate::error::{Error, Result};
use crate::model::kv::LayerKv;
use crate::weights::{Role, Weight, WeightSource};

/// A projection `y = x Wᵀ + b`, weights `[out, in]`, dense or quantized.
pub struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
    fn bytes(&self) -> u64 {
        self.w.bytes() + self.b.as_ref().map_or(0, tensor_bytes)
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// The weights of one decoder layer, in compute form.
pub struct LayerWeights {
    pub index: usize,
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    mlp_norm: Tensor,
    post_mlp_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Roles that are norm weights (so Gemma's +1 offset applies to them).
fn is_norm(role: Role) -> bool {
    matches!(
        role,
        Role::AttnNorm
            | Role::MlpNorm
            | Role::QNorm
            | Role::KNorm
            | Role::PostAttnNorm
            | Role::PostMlpNorm
    )
}

/// The tensors a layer needs and the shape the config implies for each.
pub fn layer_tensors(cfg: &ModelConfig) -> Vec<(Role, Vec<usize>)> {
    let (h, hd, nh, nkv, im) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
    );
    let mut t = vec![
        (Role::AttnNorm, vec![h]),
        (Role::Q, vec![nh * hd, h]),
        (Role::K, vec![nkv * hd, h]),
        (Role::V, vec![nkv * hd, h]),
        (Role::O, vec![h, nh * hd]),
        (Role::MlpNorm, vec![h]),
        (Role::Gate, vec![im, h]),
        (Role::Up, vec![im, h]),
        (Role::Down, vec![h, im]),
    ];
    let b = &cfg.block;
    if b.qkv_bias {
        t.extend([
            (Role::QBias, vec![nh * hd]),
            (Role::KBias, vec![nkv * hd]),
            (Role::VBias, vec![nkv * hd]),
        ]);
    }
    if b.o_bias {
        t.push((Role::OBias, vec![h]));
    }
    if b.mlp_bias {
        t.extend([
            (Role::GateBias, vec![im]),
            (Role::UpBias, vec![im]),
            (Role::DownBias, vec![h]),
        ]);
    }
    if b.qk_norm {
        t.extend([(Role::QNorm, vec![hd]), (Role::KNorm, vec![hd])]);
    }
    if b.sandwich_norms {
        t.extend([(Role::PostAttnNorm, vec![h]), (Role::PostMlpNorm, vec![h])]);
    }
    t
}

/// Checks that every tensor of every layer is present with the shape the config implies, so a
/// bad checkpoint fails at open rather than midway through a generation.
pub fn validate_layers(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<()> {
    let spec = layer_tensors(cfg);
    let naming = src.naming();
    for layer in 0..cfg.num_layers {
        for (role, shape) in &spec {
            let name = naming.layer(layer, *role, cfg.block.sandwich_norms);
            let meta = src
                .meta(&name)
                .ok_or_else(|| Error::tensor(src.path(), &name, "missing from the checkpoint"))?;
            if &meta.shape != shape {
                return Err(Error::tensor(
                    src.path(),
                    &name,
                    format!(
                        "shape {:?} disagrees with the config, which implies {shape:?}",
                        meta.shape
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl LayerWeights {
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        index: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = &cfg.block;
        let naming = src.naming();
        let name = |role| naming.layer(index, role, b.sandwich_norms);
        let get = |role: Role| -> Result<Tensor> {
            let t = src.load(&name(role), device)?;
            Ok(if is_norm(role) && b.norm_offset != 0.0 {
                (t + b.norm_offset as f64)?
            } else {
                t
            })
        };
        let opt = |on: bool, role| if on { get(role).map(Some) } else { Ok(None) };
        let lin = |w, bias: Option<Tensor>| -> Result<Linear> {
            Ok(Linear {
                w: src.load_weight(&name(w), device)?,
                b: bias,
            })
        };
        Ok(LayerWeights {
            index,
            attn_norm: get(Role::AttnNorm)?,
            q: lin(Role::Q, opt(b.qkv_bias, Role::QBias)?)?,
            k: lin(Role::K, opt(b.qkv_bias, Role::KBias)?)?,
            v: lin(Role::V, opt(b.qkv_bias, Role::VBias)?)?,
            o: lin(Role::O, opt(b.o_bias, Role::OBias)?)?,
            q_norm: opt(b.qk_norm, Role::QNorm)?,
            k_norm: opt(b.qk_norm, Role::KNorm)?,
            post_attn_norm: opt(b.sandwich_norms, Role::PostAttnNorm)?,
            mlp_norm: get(Role::MlpNorm)?,
            post_mlp_norm: opt(b.sandwich_norms, Role::PostMlpNorm)?,
            gate: lin(Role::Gate, opt(b.mlp_bias, Role::GateBias)?)?,
            up: lin(Role::Up, opt(b.mlp_bias, Role::UpBias)?)?,
            down: lin(Role::Down, opt(b.mlp_bias, Role::DownBias)?)?,
        })
    }

    /// Bytes held in compute form.
    pub fn bytes(&self) -> u64 {
        let norms = [
            Some(&self.attn_norm),
            Some(&self.mlp_norm),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
            self.post_attn_norm.as_ref(),
            self.post_mlp_norm.as_ref(),
        ];
        norms.into_iter().flatten().map(tensor_bytes).sum::<u64>()
            + [
                &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
            ]
            .iter()
            .map(|l| l.bytes())
            .sum::<u64>()
    }
}

/// Where one sequence's new tokens sit in the packed batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqRows {
    /// First row in the packed batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Absolute position of the first new token (tokens already cached).
    pub pos: usize,
}

/// Static shape facts the block needs on every call.
pub struct Block {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub scale: f64,
    /// Cap on attention-score bytes per query chunk.
    pub scores_bytes: u64,
    pub act: Activation,
    pub rope_interleaved: bool,
}

impl Block {
    pub fn new(cfg: &ModelConfig) -> Self {
        Block {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            scale: cfg.attn_scale,
            scores_bytes: ATTN_SCORES_BYTES,
            act: cfg.block.act,
            rope_interleaved: cfg.block.rope_interleaved,
        }
    }

    /// One layer over the packed batch `x` `[rows, hidden]`. `cos`/`sin` hold each row's
    /// rotary angles; `kv[i]` is sequence `i`'s cache for this layer.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        w: &LayerWeights,
        x: &Tensor,
        seqs: &[SeqRows],
        kv: &mut [&mut LayerKv],
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // Attention.
        let h = candle_nn::ops::rms_norm(x, &w.attn_norm, self.eps)?;
        let mut q = w.q.forward(&h)?.reshape((1, rows, nh, hd))?;
        let mut k = w.k.forward(&h)?.reshape((1, rows, nkv, hd))?;
        let v = w.v.forward(&h)?.reshape((rows, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            q = candle_nn::ops::rms_norm(&q, qn, self.eps)?;
            k = candle_nn::ops::rms_norm(&k, kn, self.eps)?;
        }
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;

        let mut outs = Vec::with_capacity(seqs.len());
        for (s, cache) in seqs.iter().zip(kv.iter_mut()) {
            let qs = q.narrow(0, s.row, s.len)?.transpose(0, 1)?.contiguous()?; // [nh, n, hd]
            let ks = k.narrow(0, s.row, s.len)?.transpose(0, 1)?; // [nkv, n, hd]
            let vs = v.narrow(0, s.row, s.len)?.transpose(0, 1)?;
            let (kall, vall) = cache.append(&ks, &vs)?;
            outs.push(self.attend(&qs, &kall, &vall, s, window)?);
        }
        let attn = Tensor::cat(&outs, 0)?; // [rows, nh*hd]
        let mut a = w.o.forward(&attn)?;
        if let Some(n) = &w.post_attn_norm {
            a = candle_nn::ops::rms_norm(&a, n, self.eps)?;
        }
        let x = (x + a)?;

        // MLP.
        let h = candle_nn::ops::rms_norm(&x, &w.mlp_norm, self.eps)?;
        let g = w.gate.forward(&h)?;
        let g = match self.act {
            Activation::Silu => g.silu()?,
            Activation::GeluTanh => g.gelu()?,
            Activation::GeluTanhF16 => gelu_f16_table(&g)?,
        };
        let mut m = w.down.forward(&(g * w.up.forward(&h)?)?)?;
        if let Some(n) = &w.post_mlp_norm {
            m = candle_nn::ops::rms_norm(&m, n, self.eps)?;
        }
        Ok((x + m)?)
    }

    /// RoPE on `[1, rows, heads, hd]`, returning `[rows, heads, hd]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.rope_interleaved {
            // candle's interleaved kernel wants `[b, heads, rows, hd]`.
            let t = x.transpose(1, 2)?.contiguous()?;
            let r = candle_nn::rotary_emb::rope_i(&t, cos, sin)?;
            Ok(r.transpose(1, 2)?.squeeze(0)?)
        } else {
            Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?.squeeze(0)?)
        }
    }

    /// Scaled dot-product attention of one sequence, `q` `[nh, n, hd]`. Query heads that share a
    /// KV head are stacked along the row axis so the cached keys are used without being repeated.
    /// Long prefills are split into query chunks so the score matrices stay under
    /// `scores_bytes`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        s: &SeqRows,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (nh, n) = (self.num_heads, s.len);
        let total = k.dim(1)?;
        let chunk = query_chunk(self.scores_bytes, nh, total).min(n);
        if chunk == n {
            return self.attend_rows(q, k, v, s.pos, window);
        }
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut i = 0;
        while i < n {
            let c = chunk.min(n - i);
            let qc = q.narrow(1, i, c)?.contiguous()?;
            outs.push(self.attend_rows(&qc, k, v, s.pos + i, window)?);
            i += c;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Attention for `n` query rows starting at absolute position `pos`, against the first
    /// `pos + n` cached keys. Returns `[n, nh * hd]`.
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = q.dim(1)?;
        let groups = nh / nkv;
        let total = pos + n;
        let k = k.narrow(1, 0, total)?;
        let v = v.narrow(1, 0, total)?;
        let q = q.reshape((nkv, groups * n, hd))?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?; // [nkv, groups*n, total]
        let needs_mask = n > 1 || window.is_some_and(|w| total > w);
        let scores = if needs_mask {
            let mut m = vec![0f32; n * total];
            for i in 0..n {
                let p = pos + i;
                for (j, slot) in m[i * total..(i + 1) * total].iter_mut().enumerate() {
                    let visible = j <= p && window.is_none_or(|w| p - j < w);
                    if !visible {
                        *slot = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(m, (n, total), q.device())?;
            scores
                .reshape((nkv, groups, n, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, groups * n, total))?
        } else {
            scores
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let o = p.matmul(&v)?; // [nkv, groups*n, hd]
        Ok(o.reshape((nh, n, hd))?
            .transpose(0, 1)?
            .reshape((n, nh * hd))?)
    }
}

/// Default for the most bytes of attention scores (and their masked and softmaxed copies) one
/// query chunk may hold.
pub const ATTN_SCORES_BYTES: u64 = 16 << 20;

/// Query rows per attention chunk for `nh` heads over `total` keys. Four copies of the scores
/// can be alive at once (scaled, masked, softmaxed, and the mask's broadcast), so the cap covers
/// four. One row is the floor, so a single row over a huge context can pass the cap.
pub fn query_chunk(scores_bytes: u64, nh: usize, total: usize) -> usize {
    ((scores_bytes / (4 * 4 * (nh * total).max(1) as u64)) as usize).max(1)
}

/// llama.cpp's CPU GELU: exact pass-through at and beyond ±10, otherwise the f16-rounded input
/// mapped through an f16 table of GELU values.
fn gelu_f16_table(x: &Tensor) -> Result<Tensor> {
    let f16 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?) };
    let table = f16(&f16(x)?.gelu()?)?;
    let high = x.ge(10f32)?;
    let low = x.le(-10f32)?;
    let y = high.where_cond(x, &table)?;
    Ok(low.where_cond(&x.zeros_like()?, &y)?)
}

/// The final RMSNorm, applied before the output head.
pub fn final_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps)?)
}

/// Bytes of a tensor of `n` f32 elements.
pub fn f32_bytes(n: usize) -> u64 {
    (n * DType::F32.size_in_bytes()) as u64
}
