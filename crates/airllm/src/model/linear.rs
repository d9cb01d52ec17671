//! Gated DeltaNet (Yang et al., "Gated Delta Networks", 2024), the linear attention of
//! Qwen3-Next and Qwen3.5. Per token:
//!
//! ```text
//! q, k, v = silu(conv1d(W_qkv x))          (a causal depthwise convolution over time)
//! β = σ(W_b x)    g = −e^A_log · softplus(W_a x + dt_bias)
//! S ← e^g S + k ⊗ β (v − e^g kᵀS)          o = qᵀS            (q, k L2-normalized)
//! out = W_o (rmsnorm(o) · w · silu(W_z x))
//! ```
//!
//! The recurrence itself is [`crate::kernels::delta`]'s; this file turns the layer's
//! projections into its inputs, one sequence at a time, and applies the gated norm.

use candle_core::{Device, Tensor};

use super::block::{Block, Matrices, SeqRows, Small};
use super::kv::LayerKv;
use crate::config::LinearSpec;
use crate::error::{Error, Result};
use crate::kernels::delta::{self, StepInput};
use crate::weights::schema::Role;

/// A small tensor's values on the host.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `x Wᵀ` for `role`, as host values `[rows, out]`.
fn project(mats: &mut dyn Matrices, role: Role, h: &Tensor) -> Result<Vec<f32>> {
    host(&mats.matmul(role, h)?)
}

/// transformers' softplus (β = 1, linear above 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl Block {
    /// Gated DeltaNet over the normed rows `h`: `[rows, value_heads · value_dim]`, before
    /// the output projection. `kv[i]` holds sequence `i`'s recurrent state.
    pub(crate) fn linear_attention(
        &self,
        l: &LinearSpec,
        small: &Small,
        mats: &mut dyn Matrices,
        h: &Tensor,
        seqs: &[SeqRows],
        kv: &mut [&mut LayerKv],
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let shape = crate::stream::plan::linear_shape(l);
        let (nv, dv) = (l.value_heads, l.value_dim);
        let c = shape.channels();
        let (qkv, z, b, a) = if l.fused {
            self.unfuse(
                l,
                project(mats, Role::LinQkvz, h)?,
                project(mats, Role::LinBa, h)?,
                rows,
            )
        } else {
            (
                project(mats, Role::LinQkv, h)?,
                project(mats, Role::LinZ, h)?,
                project(mats, Role::LinB, h)?,
                project(mats, Role::LinA, h)?,
            )
        };
        let conv = host(small.req(Role::LinConv)?)?;
        let a_log = host(small.req(Role::LinALog)?)?;
        let dt_bias = host(small.req(Role::LinDtBias)?)?;
        let norm = host(small.req(Role::LinNorm)?)?;
        if conv.len() != c * l.conv_kernel || a_log.len() != nv || dt_bias.len() != nv {
            return Err(Error::Internal(
                "a linear layer's small tensors disagree with its config".into(),
            ));
        }
        let beta: Vec<f32> = b.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
        let g: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, &x)| -a_log[i % nv].exp() * softplus(x + dt_bias[i % nv]))
            .collect();
        let mut out = vec![0f32; rows * nv * dv];
        for (s, cache) in seqs.iter().zip(kv.iter_mut()) {
            let state = cache.state_for(s.len)?;
            let (r0, r1) = (s.row, s.row + s.len);
            let inp = StepInput {
                qkv: &qkv[r0 * c..r1 * c],
                g: &g[r0 * nv..r1 * nv],
                beta: &beta[r0 * nv..r1 * nv],
            };
            delta::forward(
                &shape,
                state,
                &conv,
                &inp,
                s.len,
                &mut out[r0 * nv * dv..r1 * nv * dv],
            );
        }
        delta::gated_norm(&mut out, &z, &norm, self.eps);
        Ok(Tensor::from_vec(out, (rows, nv * dv), h.device())?)
    }

    /// Qwen3-Next's fused projections to Qwen3.5's layout: per key head, `in_proj_qkvz` has
    /// its q, its k, then its value heads' v and z; `in_proj_ba` its value heads' b, then a.
    /// Returns q|k|v over all heads, z, b and a, each `[rows, ·]`.
    fn unfuse(
        &self,
        l: &LinearSpec,
        qkvz: Vec<f32>,
        ba: Vec<f32>,
        rows: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (nk, nv, dk, dv) = (l.key_heads, l.value_heads, l.key_dim, l.value_dim);
        let grp = nv / nk;
        let per = 2 * dk + 2 * grp * dv;
        let (c, zw) = (2 * nk * dk + nv * dv, nv * dv);
        let mut qkv = vec![0f32; rows * c];
        let mut z = vec![0f32; rows * zw];
        let mut b = vec![0f32; rows * nv];
        let mut a = vec![0f32; rows * nv];
        for r in 0..rows {
            let src = &qkvz[r * nk * per..(r + 1) * nk * per];
            let dst = &mut qkv[r * c..(r + 1) * c];
            let zd = &mut z[r * zw..(r + 1) * zw];
            for (kh, head) in src.chunks_exact(per).enumerate() {
                dst[kh * dk..(kh + 1) * dk].copy_from_slice(&head[..dk]);
                dst[(nk + kh) * dk..(nk + kh + 1) * dk].copy_from_slice(&head[dk..2 * dk]);
                let v0 = 2 * nk * dk + kh * grp * dv;
                dst[v0..v0 + grp * dv].copy_from_slice(&head[2 * dk..2 * dk + grp * dv]);
                zd[kh * grp * dv..(kh + 1) * grp * dv].copy_from_slice(&head[2 * dk + grp * dv..]);
            }
            let src = &ba[r * 2 * nv..(r + 1) * 2 * nv];
            for (kh, head) in src.chunks_exact(2 * grp).enumerate() {
                b[r * nv + kh * grp..r * nv + (kh + 1) * grp].copy_from_slice(&head[..grp]);
                a[r * nv + kh * grp..r * nv + (kh + 1) * grp].copy_from_slice(&head[grp..]);
            }
        }
        (qkv, z, b, a)
    }
}
