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
use crate::kernels::mla::{absorb_keys, Latent, ValueRows};
use crate::weights::mat::MatView;
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

        // Queries, through the low-rank bottleneck when the model has one; their two parts
        // kept apart, as f32 values (no-RoPE) and a tensor (RoPE, rotated).
        let (qn, q_pe) = {
            let q = if m.q_lora_rank.is_some() {
                let a = mats.matmul(Role::QA, h)?;
                let a = latent_norm(&a, small.req(Role::QANorm)?, m.norm_eps)?;
                mats.matmul(Role::QB, &a)?
            } else {
                Self::linear(small, mats, Role::Q, Role::QBias, h)?
            };
            let q = q.reshape((rows, nh, nope + rope))?;
            let qn = q.narrow(2, 0, nope)?.flatten_all()?.to_vec1::<f32>()?;
            let q_pe = q.narrow(2, nope, rope)?.contiguous()?.unsqueeze(0)?;
            (qn, self.rope_full(&q_pe, cos, sin)?) // [rows, nh, rope]
        };

        // The latent, normed, and the shared RoPE key: what the cache keeps.
        let latent = {
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
            Tensor::cat(&[&c, &k_pe], 1)? // [rows, rank + rope]
        };
        let mut cached = Vec::with_capacity(seqs.len());
        for (s, cache) in seqs.iter().zip(kv.iter_mut()) {
            let all = cache.append_latent(&latent.narrow(0, s.row, s.len)?.unsqueeze(0)?)?;
            cached.push((all.clone(), all, 0));
        }

        // kv_b_proj, gathered in its file's form: whole, or llama.cpp's split per head.
        let shape = Latent {
            heads: nh,
            nope,
            v_dim: m.v_head_dim,
            rank,
        };
        let vd = m.v_head_dim;
        let (mut keys, mut values) = (ValueRows::new(), ValueRows::new());
        if self.kv_b_split {
            mats.rows(Role::KB, &mut |start, w| keys.put(start, nh * rank, w))?;
            mats.rows(Role::VB, &mut |start, w| values.put(start, nh * vd, w))?;
        } else {
            let total = nh * (nope + vd);
            mats.rows(Role::KvB, &mut |start, w| keys.put(start, total, w))?;
        }
        // Head h's value rows: `[v, rank]`.
        let value_rows = |hh: usize| -> Result<MatView<'_>> {
            if self.kv_b_split {
                values.view(hh * vd, vd, rank)
            } else {
                keys.view(hh * (nope + vd) + nope, vd, rank)
            }
        };

        // Queries a chunk of rows at a time, so that the latent-space copies (heads × rank
        // per row, several times) stay small however long the prefill.
        let chunk = mla_chunk_rows(self.scores_bytes, nh, rank, rope).min(rows.max(1));
        let mut y = vec![0f32; rows * nh * vd];
        let shape_attn = Shape {
            heads: nh,
            kv_heads: 1,
            head_dim: rank + rope,
            v_dim: rank,
            scale: self.scale as f32,
            softcap: None,
            window: None,
        };
        let mut x = vec![0f32; chunk * nope];
        let mut q_lat = vec![0f32; chunk * nh * rank];
        for (s, c) in seqs.iter().zip(&cached) {
            let mut off = 0;
            while off < s.len {
                let n = chunk.min(s.len - off);
                let r0 = s.row + off;
                let qn_c = &qn[r0 * nh * nope..(r0 + n) * nh * nope];
                // W_UK folded into the queries.
                if self.kv_b_split {
                    // Each head's key part is stored transposed, `[rank, nope]`: a plain
                    // product per head.
                    for hh in 0..nh {
                        for i in 0..n {
                            let at = (i * nh + hh) * nope;
                            x[i * nope..(i + 1) * nope].copy_from_slice(&qn_c[at..at + nope]);
                        }
                        let w = keys.view(hh * rank, rank, nope)?;
                        matmul_into(&x[..n * nope], n, w, &mut q_lat, nh * rank, hh * rank)?;
                    }
                } else {
                    let w = keys.view(0, nh * (nope + vd), rank)?;
                    absorb_keys(shape, w, qn_c, n, &mut q_lat)?;
                }
                let q_lat_t =
                    Tensor::from_slice(&q_lat[..n * nh * rank], (n, nh, rank), h.device())?;
                let q_full = Tensor::cat(&[&q_lat_t, &q_pe.narrow(0, r0, n)?], 2)?.contiguous()?;
                let sub = SeqRows {
                    row: 0,
                    len: n,
                    pos: s.pos + off,
                };
                let out_lat =
                    self.attend_all(&q_full, &[sub], std::slice::from_ref(c), shape_attn, None)?;
                // Each head's latent output through its W_UV rows.
                let per_head = out_lat
                    .reshape((n, nh, rank))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?; // [nh, n, rank]
                let yc = &mut y[r0 * nh * vd..(r0 + n) * nh * vd];
                for hh in 0..nh {
                    matmul_into(
                        &per_head[hh * n * rank..(hh + 1) * n * rank],
                        n,
                        value_rows(hh)?,
                        yc,
                        nh * vd,
                        hh * vd,
                    )?;
                }
                off += n;
            }
        }
        Ok(Tensor::from_vec(y, (rows, nh * vd), h.device())?)
    }
}

/// Query rows latent attention takes at once: half the attention-score cap in latent-space
/// values per copy (8 MiB by default: 14 rows of DeepSeek-V3), at least one.
pub(crate) fn mla_chunk_rows(scores_bytes: u64, heads: usize, rank: usize, rope: usize) -> usize {
    ((scores_bytes / 2) as usize / (4 * heads * (rank + rope)).max(1)).max(1)
}

/// The bottleneck norms (`q_a_layernorm`, `kv_a_layernorm`), with [`MlaSpec::norm_eps`].
fn latent_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}
