//! DeepSeek's multi-head latent attention (DeepSeek-V2, §2.1), in its absorbed form.
//!
//! Each token is compressed to a latent `c` of `kv_lora_rank` values plus one RoPE key `k_pe`
//! shared by all heads; the cache holds exactly these. A head's key is `[W_UK c, k_pe]` and
//! its value `W_UV c`, so
//!
//! ```text
//! q · k = (W_UKᵀ q_nope) · c + q_pe · k_pe        o = W_UV (Σ p c)
//! ```
//!
//! and attention runs in the latent space as multi-query attention over `[c, k_pe]`, whose
//! values are the first `kv_lora_rank` columns of its keys. No key or value is ever expanded.

use candle_core::Tensor;

use super::block::{Block, Matrices, SeqRows, Small};
use super::kv::LayerKv;
use crate::config::MlaSpec;
use crate::error::Result;
use crate::kernels::attention::Shape;
use crate::kernels::matmul::matmul_into;
use crate::kernels::mla::{absorb, Latent, ValueRows};
use crate::weights::schema::Role;

impl Block {
    /// Latent attention of the normed rows `h`: `[rows, heads · v_head_dim]`, before the
    /// output projection.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn latent_attention(
        &self,
        m: &MlaSpec,
        small: &Small,
        mats: &mut dyn Matrices,
        h: &Tensor,
        seqs: &[SeqRows],
        kv: &mut [&mut LayerKv],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let nh = self.num_heads;
        let (nope, rope, rank) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);

        // Queries, through the low-rank bottleneck when the model has one.
        let q = if m.q_lora_rank.is_some() {
            let a = mats.matmul(Role::QA, h)?;
            let a = latent_norm(&a, small.req(Role::QANorm)?, m.norm_eps)?;
            mats.matmul(Role::QB, &a)?
        } else {
            Self::linear(small, mats, Role::Q, Role::QBias, h)?
        };
        let q = q.reshape((rows, nh, nope + rope))?;
        let q_nope = q.narrow(2, 0, nope)?.contiguous()?;
        let q_pe = q.narrow(2, nope, rope)?.contiguous()?.unsqueeze(0)?;
        let q_pe = self.rope_full(&q_pe, cos, sin)?; // [rows, nh, rope]

        // The latent, normed, and the shared RoPE key: what the cache keeps.
        let kv_a = mats.matmul(Role::KvA, h)?;
        let c = latent_norm(
            &kv_a.narrow(1, 0, rank)?.contiguous()?,
            small.req(Role::KvANorm)?,
            m.norm_eps,
        )?;
        let k_pe = kv_a
            .narrow(1, rank, rope)?
            .contiguous()?
            .reshape((1, rows, 1, rope))?;
        let k_pe = self.rope_full(&k_pe, cos, sin)?.reshape((rows, rope))?;
        let latent = Tensor::cat(&[&c, &k_pe], 1)?; // [rows, rank + rope]

        // W_UK folded into the queries; W_UV's rows kept for after attention.
        let shape = Latent {
            heads: nh,
            nope,
            v_dim: m.v_head_dim,
            rank,
        };
        let qn = q_nope.flatten_all()?.to_vec1::<f32>()?;
        let mut q_lat = vec![0f32; rows * nh * rank];
        let mut values = ValueRows::new();
        if self.kv_b_split {
            // llama.cpp's split form: each head's key part is stored transposed, `[rank,
            // nope]`, so the absorption is a plain product per head.
            let mut kb = ValueRows::new();
            mats.rows(Role::KB, &mut |start, w| kb.put(start, nh * rank, w))?;
            let mut x = vec![0f32; rows * nope];
            for hh in 0..nh {
                for i in 0..rows {
                    let at = (i * nh + hh) * nope;
                    x[i * nope..(i + 1) * nope].copy_from_slice(&qn[at..at + nope]);
                }
                let w = kb.view(hh * rank, rank, nope)?;
                matmul_into(&x, rows, w, &mut q_lat, nh * rank, hh * rank)?;
            }
            let vrows = nh * m.v_head_dim;
            mats.rows(Role::VB, &mut |start, w| values.put(start, vrows, w))?;
        } else {
            mats.rows(Role::KvB, &mut |start, w| {
                absorb(shape, start, w, &qn, rows, &mut q_lat, &mut values)
            })?;
        }
        let q_lat = Tensor::from_vec(q_lat, (rows, nh, rank), h.device())?;
        let q_full = Tensor::cat(&[&q_lat, &q_pe], 2)?.contiguous()?; // [rows, nh, rank + rope]

        let mut cached = Vec::with_capacity(seqs.len());
        for (s, cache) in seqs.iter().zip(kv.iter_mut()) {
            let all = cache.append_latent(&latent.narrow(0, s.row, s.len)?.unsqueeze(0)?)?;
            cached.push((all.clone(), all, 0));
        }
        let out_lat = self.attend_all(
            &q_full,
            seqs,
            &cached,
            Shape {
                heads: nh,
                kv_heads: 1,
                head_dim: rank + rope,
                v_dim: rank,
                scale: self.scale as f32,
                softcap: None,
                window: None,
            },
        )?; // [rows, nh · rank]

        // Each head's latent output through its W_UV rows.
        let per_head = out_lat
            .reshape((rows, nh, rank))?
            .transpose(0, 1)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?; // [nh, rows, rank]
        let vd = m.v_head_dim;
        let mut y = vec![0f32; rows * nh * vd];
        for hh in 0..nh {
            matmul_into(
                &per_head[hh * rows * rank..(hh + 1) * rows * rank],
                rows,
                values.head(shape, hh)?,
                &mut y,
                nh * vd,
                hh * vd,
            )?;
        }
        Ok(Tensor::from_vec(y, (rows, nh * vd), h.device())?)
    }
}

/// The bottleneck norms (`q_a_layernorm`, `kv_a_layernorm`), with [`MlaSpec::norm_eps`].
fn latent_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}
