//! The one decoder block. Every supported architecture is this block with different options
//! ([`crate::config::BlockSpec`]) and the tensors its [`LayerSchema`] lists: pre-norm attention
//! with GQA and RoPE, then a gated MLP.
//!
//! The batch is packed: the rows of `x` are the new tokens of all sequences back to back, so the
//! projections run as one matmul over the whole batch, and only attention is done per sequence,
//! against that sequence's own KV cache. The block does not know where its matrices live: it
//! asks a [`Matrices`] for each product, which multiplies a held matrix or the slices arriving
//! from the reader.

use candle_core::{DType, Device, Tensor};

use crate::config::{
    Activation, ClampedSwiglu, LinearSpec, MlaSpec, ModelConfig, Routing, Scoring,
};
use crate::error::{Error, Result};
use crate::model::kv::LayerKv;
use crate::weights::mat::MatView;
use crate::weights::schema::{Kind, LayerSchema, Role};
use crate::weights::WeightSource;

/// A layer's norms and biases, f32, read whole (they are small).
pub struct Small {
    items: Vec<(Role, Tensor)>,
}

impl Small {
    /// Reads layer `layer`'s small tensors; norms get `norm_offset` added (Gemma's 1 + w).
    pub fn load(
        schema: &LayerSchema,
        src: &dyn WeightSource,
        layer: usize,
        norm_offset: f32,
        device: &Device,
    ) -> Result<Self> {
        let naming = src.naming();
        let items = schema
            .small()
            .map(|t| {
                let v = src.load(&t.name(naming, layer), device)?;
                let v = if t.kind == Kind::Norm && norm_offset != 0.0 {
                    (v + norm_offset as f64)?
                } else {
                    v
                };
                Ok((t.role, v))
            })
            .collect::<Result<_>>()?;
        Ok(Small { items })
    }

    pub fn get(&self, role: Role) -> Option<&Tensor> {
        self.items.iter().find(|(r, _)| *r == role).map(|(_, t)| t)
    }

    pub(crate) fn req(&self, role: Role) -> Result<&Tensor> {
        self.get(role)
            .ok_or_else(|| Error::Internal(format!("the layer has no {role:?}")))
    }

    pub fn bytes(&self) -> u64 {
        self.items
            .iter()
            .map(|(_, t)| t.elem_count() as u64 * 4)
            .sum()
    }
}

/// Where the matrices of the layer being computed come from.
pub trait Matrices {
    /// `x Wᵀ` for the layer's matrix `role`, `x` `[rows, in]` f32.
    fn matmul(&mut self, role: Role, x: &Tensor) -> Result<Tensor>;

    /// Calls `f(start, rows)` over the layer's matrix `role` in the order of its rows: once
    /// with the whole matrix when it is held in host memory, slice by slice as they arrive
    /// when it is streamed. For the products that are not `x Wᵀ` (latent attention's
    /// absorbed `kv_b_proj`).
    fn rows(&mut self, role: Role, f: &mut dyn FnMut(usize, MatView) -> Result<()>) -> Result<()> {
        let _ = (role, f);
        Err(Error::Internal(format!(
            "these matrices cannot lend the rows of {role:?}"
        )))
    }

    /// Calls `f(e, mats)` for each expert `e` of `experts` (ascending, distinct) once its
    /// matrices are at hand, in whatever order they become so: cached experts first, then
    /// the others as they are read. `mats` multiplies that expert's matrices. `input` is the
    /// layer's MoE input, from which the next layer's experts may be guessed.
    fn experts(
        &mut self,
        experts: &[usize],
        input: &Tensor,
        f: &mut dyn FnMut(usize, &mut dyn Matrices) -> Result<()>,
    ) -> Result<()> {
        let _ = (experts, input, f);
        Err(Error::Internal(
            "this layer's matrices have no experts".into(),
        ))
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
    /// Dimensions of each head RoPE rotates (the first ones); the rest pass through.
    pub rotary_dim: usize,
    pub fused_qkv: bool,
    pub fused_gate_up: bool,
    /// Scores become cap·tanh(scores/cap) before the mask (Gemma 2).
    pub softcap: Option<f64>,
    /// Experts each token is routed to, and whether their weights are renormalized.
    pub top_k: usize,
    pub norm_topk: bool,
    pub routing: Routing,
    /// Latent attention (DeepSeek) in place of GQA, and whether its `kv_b_proj` comes split
    /// per head (`attn_k_b`, `attn_v_b`).
    pub mla: Option<MlaSpec>,
    pub kv_b_split: bool,
    /// Sparse layers have an always-on shared expert.
    pub has_shared: bool,
    /// The experts' gate is GPT-OSS's clamped SwiGLU, with biases on their projections.
    pub clamped: Option<ClampedSwiglu>,
    /// Gated DeltaNet, on the layers whose [`LayerKind::linear`] is set.
    pub linear: Option<LinearSpec>,
    /// Attention's output is scaled by the sigmoid of a gate `q_proj` also gives.
    pub attn_gate: bool,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, Copy)]
pub struct LayerKind {
    /// Sliding-window size, `None` for full attention.
    pub window: Option<usize>,
    /// The MLP is a mixture of experts.
    pub sparse: bool,
    /// Gated DeltaNet in place of attention.
    pub linear: bool,
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
            rotary_dim: cfg.rotary_dim,
            fused_qkv: cfg.block.fused_qkv,
            fused_gate_up: cfg.block.fused_gate_up,
            softcap: cfg.attn_logit_softcap,
            top_k: cfg.moe.as_ref().map_or(0, |m| m.top_k),
            norm_topk: cfg.moe.as_ref().is_some_and(|m| m.norm_topk),
            routing: cfg
                .moe
                .as_ref()
                .map_or_else(Routing::softmax, |m| m.routing.clone()),
            mla: cfg.mla.clone(),
            kv_b_split: cfg.block.kv_b_split,
            has_shared: cfg.moe.as_ref().is_some_and(|m| m.shared_size.is_some()),
            clamped: cfg.moe.as_ref().and_then(|m| m.clamped),
            linear: cfg.linear.clone(),
            attn_gate: cfg.block.attn_gate,
        }
    }

    /// The shape the CPU attention kernel runs for GQA.
    fn gqa_shape(&self, window: Option<usize>) -> crate::kernels::attention::Shape {
        crate::kernels::attention::Shape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            v_dim: self.head_dim,
            scale: self.scale as f32,
            softcap: self.softcap.map(|c| c as f32),
            window,
        }
    }

    /// `x Wᵀ (+ b)` for a projection and its optional bias.
    pub(crate) fn linear(
        small: &Small,
        mats: &mut dyn Matrices,
        w: Role,
        b: Role,
        x: &Tensor,
    ) -> Result<Tensor> {
        let y = mats.matmul(w, x)?;
        Ok(match small.get(b) {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub(crate) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, self.eps)?)
    }

    /// One layer over the packed batch `x` `[rows, hidden]`. `cos`/`sin` hold each row's
    /// rotary angles; `kv[i]` is sequence `i`'s cache for this layer.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        small: &Small,
        mats: &mut dyn Matrices,
        x: &Tensor,
        seqs: &[SeqRows],
        kv: &mut [&mut LayerKv],
        cos: &Tensor,
        sin: &Tensor,
        kind: LayerKind,
    ) -> Result<Tensor> {
        // Attention.
        let h = self.norm(x, small.req(Role::AttnNorm)?)?;
        let attn = match (&self.mla, &self.linear) {
            (_, Some(l)) if kind.linear => self.linear_attention(l, small, mats, &h, seqs, kv)?,
            (Some(m), _) => self.latent_attention(m, small, mats, &h, seqs, kv, cos, sin)?,
            _ => self.attention(small, mats, &h, seqs, kv, cos, sin, kind.window)?,
        };
        let mut a = Self::linear(small, mats, Role::O, Role::OBias, &attn)?;
        if let Some(n) = small.get(Role::PostAttnNorm) {
            a = self.norm(&a, n)?;
        }
        let x = (x + a)?;

        // MLP: dense, or a mixture of experts.
        let h = self.norm(&x, small.req(Role::MlpNorm)?)?;
        let mut m = if kind.sparse {
            self.moe(small, mats, &h)?
        } else {
            let bias = [Role::GateBias, Role::UpBias, Role::DownBias];
            let w = if self.fused_gate_up {
                [Role::GateUp, Role::GateUp, Role::Down]
            } else {
                [Role::Gate, Role::Up, Role::Down]
            };
            self.gated(small, mats, w, Some(bias), &h)?
        };
        if let Some(n) = small.get(Role::PostMlpNorm) {
            m = self.norm(&m, n)?;
        }
        Ok((x + m)?)
    }

    /// Grouped-query attention of the normed rows `h`: `[rows, heads · head_dim]`, before the
    /// output projection.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        small: &Small,
        mats: &mut dyn Matrices,
        h: &Tensor,
        seqs: &[SeqRows],
        kv: &mut [&mut LayerKv],
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let rows = h.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let h = h.clone();
        let mut gate = None;
        let (q, k, v) = if self.fused_qkv {
            let qkv = mats.matmul(Role::Qkv, &h)?;
            let part =
                |at: usize, n: usize| -> Result<Tensor> { Ok(qkv.narrow(1, at, n)?.contiguous()?) };
            (
                part(0, nh * hd)?,
                part(nh * hd, nkv * hd)?,
                part((nh + nkv) * hd, nkv * hd)?,
            )
        } else if self.attn_gate {
            // Each head's query rows, then its gate rows.
            let qg =
                Self::linear(small, mats, Role::Q, Role::QBias, &h)?.reshape((rows, nh, 2 * hd))?;
            gate = Some(qg.narrow(2, hd, hd)?.reshape((rows, nh * hd))?);
            (
                qg.narrow(2, 0, hd)?.contiguous()?,
                Self::linear(small, mats, Role::K, Role::KBias, &h)?,
                Self::linear(small, mats, Role::V, Role::VBias, &h)?,
            )
        } else {
            (
                Self::linear(small, mats, Role::Q, Role::QBias, &h)?,
                Self::linear(small, mats, Role::K, Role::KBias, &h)?,
                Self::linear(small, mats, Role::V, Role::VBias, &h)?,
            )
        };
        let mut q = q.reshape((1, rows, nh, hd))?;
        let mut k = k.reshape((1, rows, nkv, hd))?;
        let v = v.reshape((rows, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (small.get(Role::QNorm), small.get(Role::KNorm)) {
            q = self.norm(&q, qn)?;
            k = self.norm(&k, kn)?;
        }
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;

        let mut cached = Vec::with_capacity(seqs.len());
        for (s, cache) in seqs.iter().zip(kv.iter_mut()) {
            let ks = k.narrow(0, s.row, s.len)?.transpose(0, 1)?; // [nkv, n, hd]
            let vs = v.narrow(0, s.row, s.len)?.transpose(0, 1)?;
            cached.push(cache.append(&ks, &vs)?);
        }
        let out = self.attend_all(
            &q,
            seqs,
            &cached,
            self.gqa_shape(window),
            small.get(Role::Sinks),
        )?;
        Ok(match gate {
            Some(g) => (out * candle_nn::ops::sigmoid(&g)?)?,
            None => out,
        })
    }

    /// Attention of every sequence: on the CPU through the tiled kernel, elsewhere through
    /// tensor products. `q` `[rows, heads, head_dim]`; returns `[rows, heads · v_dim]`.
    /// `sinks` `[heads]`: a logit per head that joins each softmax's denominator.
    pub(crate) fn attend_all(
        &self,
        q: &Tensor,
        seqs: &[SeqRows],
        cached: &[(Tensor, Tensor, usize)],
        shape: crate::kernels::attention::Shape,
        sinks: Option<&Tensor>,
    ) -> Result<Tensor> {
        if q.device().is_cpu() {
            let sinks = sinks
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            return self.attend_cpu(q, seqs, cached, shape, sinks.as_deref());
        }
        let mut outs = Vec::with_capacity(seqs.len());
        for (s, (kall, vall, k0)) in seqs.iter().zip(cached) {
            let qs = q.narrow(0, s.row, s.len)?.transpose(0, 1)?.contiguous()?; // [nh, n, hd]
            outs.push(self.attend(&qs, kall, vall, *k0, s, shape, sinks)?);
        }
        Ok(Tensor::cat(&outs, 0)?) // [rows, nh*vd]
    }

    /// The gated MLP `down(act(gate(x)) · up(x))` over the matrices `[gate, up, down]`, with
    /// their biases where the layer has them.
    fn gated(
        &self,
        small: &Small,
        mats: &mut dyn Matrices,
        w: [Role; 3],
        b: Option<[Role; 3]>,
        x: &Tensor,
    ) -> Result<Tensor> {
        let lin = |mats: &mut dyn Matrices, i: usize, x: &Tensor| match b {
            Some(b) => Self::linear(small, mats, w[i], b[i], x),
            None => mats.matmul(w[i], x),
        };
        let act = |g: Tensor| -> Result<Tensor> {
            Ok(match self.act {
                Activation::Silu => g.silu()?,
                Activation::GeluTanh => g.gelu()?,
                Activation::GeluTanhF16 => gelu_f16_table(&g)?,
            })
        };
        let gu = if w[0] == Role::GateUp {
            // One product for both; the gate's rows come first.
            let y = mats.matmul(Role::GateUp, x)?;
            let n = y.dim(1)? / 2;
            (act(y.narrow(1, 0, n)?)? * y.narrow(1, n, n)?)?
        } else {
            let g = act(lin(mats, 0, x)?)?;
            (g * lin(mats, 1, x)?)?
        };
        lin(mats, 2, &gu)
    }

    /// A mixture of experts: the router's softmax picks `top_k` experts per row; each picked
    /// expert runs on its rows only, and the rows sum their experts' outputs weighted by the
    /// router (in expert order, as transformers does, whatever order the experts arrive in).
    /// Qwen2-MoE adds a shared expert scaled by a sigmoid gate.
    fn moe(&self, small: &Small, mats: &mut dyn Matrices, h: &Tensor) -> Result<Tensor> {
        let dev = h.device();
        let bias = match small.get(Role::RouterBias) {
            Some(b) => Some(b.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?),
            None if self.routing.correction_bias => {
                return Err(Error::Internal(
                    "the layer has no e_score_correction_bias".into(),
                ))
            }
            None => None,
        };
        let routes = route_logits(
            mats.matmul(Role::Router, h)?,
            small.get(Role::RouterLogitBias),
            bias.as_deref(),
            &self.routing,
            self.top_k,
            self.norm_topk,
        )?;
        let experts: Vec<usize> = routes.keys().copied().collect();
        let mut outs: Vec<(usize, Tensor, Tensor)> = Vec::with_capacity(experts.len());
        mats.experts(&experts, h, &mut |e, em| {
            let (rows, weights) = &routes[&e];
            let idx = Tensor::new(rows.as_slice(), dev)?;
            let y = self.expert(small, em, e, &h.index_select(&idx, 0)?)?;
            let w = Tensor::from_slice(weights, (weights.len(), 1), dev)?;
            outs.push((e, idx, y.broadcast_mul(&w)?));
            Ok(())
        })?;
        if outs.len() != experts.len() {
            return Err(Error::Internal(format!(
                "{} of {} routed experts ran",
                outs.len(),
                experts.len()
            )));
        }
        outs.sort_by_key(|(e, _, _)| *e);
        let mut out = h.zeros_like()?;
        for (_, idx, y) in &outs {
            out = out.index_add(idx, y, 0)?;
        }
        let shared = [Role::SharedGate, Role::SharedUp, Role::SharedDown];
        if let Some(sg) = small.get(Role::SharedExpertGate) {
            let s = self.gated(small, mats, shared, None, h)?;
            let g = h
                .matmul(&sg.reshape((h.dim(1)?, 1))?)?
                .apply(&candle_nn::Activation::Sigmoid)?;
            out = (out + s.broadcast_mul(&g)?)?;
        } else if self.has_shared {
            // DeepSeek's and GLM's shared experts are added as they are.
            out = (out + self.gated(small, mats, shared, None, h)?)?;
        }
        Ok(out)
    }

    /// Expert `e` on its rows `x`: the gated MLP, or GPT-OSS's clamped SwiGLU with each
    /// projection's bias (its row `e` of the layer's stacked biases), gate and up from one
    /// interleaved matrix (transformers' layout) or two (llama.cpp's).
    fn expert(&self, small: &Small, em: &mut dyn Matrices, e: usize, x: &Tensor) -> Result<Tensor> {
        let Some(c) = self.clamped else {
            let roles = [Role::ExpertGate, Role::ExpertUp, Role::ExpertDown];
            return self.gated(small, em, roles, None, x);
        };
        let add = |y: Tensor, bias: Role| -> Result<Tensor> {
            Ok(match small.get(bias) {
                Some(b) => y.broadcast_add(&b.get(e)?)?,
                None => y,
            })
        };
        let (g, u) = if small.get(Role::ExpertGateUpBias).is_some() {
            let y = add(em.matmul(Role::ExpertGateUp, x)?, Role::ExpertGateUpBias)?;
            let (rows, w) = y.dims2()?;
            let y = y.reshape((rows, w / 2, 2))?;
            (
                y.narrow(2, 0, 1)?.squeeze(2)?,
                y.narrow(2, 1, 1)?.squeeze(2)?,
            )
        } else {
            (
                add(em.matmul(Role::ExpertGate, x)?, Role::ExpertGateBias)?,
                add(em.matmul(Role::ExpertUp, x)?, Role::ExpertUpBias)?,
            )
        };
        let g = g.clamp(f32::NEG_INFINITY, c.limit)?;
        let u = u.clamp(-c.limit, c.limit)?;
        let glu = (&g * candle_nn::ops::sigmoid(&(&g * c.alpha as f64)?)?)?;
        let mid = ((u + 1.0)? * glu)?.contiguous()?;
        add(em.matmul(Role::ExpertDown, &mid)?, Role::ExpertDownBias)
    }

    /// RoPE on `[1, rows, heads, hd]`, returning `[rows, heads, hd]`. With a partial rotary
    /// dimension only the first `rotary_dim` of each head turn.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(3)?;
        if self.rotary_dim < hd {
            let r = self.rotary_dim;
            let turned = self.rope_full(&x.narrow(3, 0, r)?.contiguous()?, cos, sin)?;
            let kept = x.narrow(3, r, hd - r)?.squeeze(0)?;
            return Ok(Tensor::cat(&[&turned, &kept], 2)?.contiguous()?);
        }
        self.rope_full(x, cos, sin)
    }

    pub(crate) fn rope_full(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.rope_interleaved {
            // candle's interleaved kernel wants `[b, heads, rows, hd]`.
            let t = x.transpose(1, 2)?.contiguous()?;
            let r = candle_nn::rotary_emb::rope_i(&t, cos, sin)?;
            Ok(r.transpose(1, 2)?.squeeze(0)?)
        } else {
            Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?.squeeze(0)?)
        }
    }

    /// Attention of every sequence on the CPU ([`crate::kernels::attention`]): `q` `[rows, nh, hd]`,
    /// `cached[i]` sequence `i`'s keys and values after this step's append and the position
    /// of its first slot. Returns `[rows, nh * hd]`.
    fn attend_cpu(
        &self,
        q: &Tensor,
        seqs: &[SeqRows],
        cached: &[(Tensor, Tensor, usize)],
        shape: crate::kernels::attention::Shape,
        sinks: Option<&[f32]>,
    ) -> Result<Tensor> {
        let (nh, hd, vd) = (shape.heads, shape.head_dim, shape.v_dim);
        let rows = q.dim(0)?;
        let q = q.contiguous()?;
        let (qg, ql) = q.storage_and_layout();
        let guards: Vec<_> = cached
            .iter()
            .map(|(k, v, _)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        fn cpu<'a>(g: &'a candle_core::Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
            match g {
                candle_core::Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[l.start_offset()..]),
                _ => Err(Error::Internal("CPU attention on device tensors".into())),
            }
        }
        let mut parts = Vec::with_capacity(seqs.len());
        for ((s, (_, _, k0)), ((kg, kl), (vg, vl))) in seqs.iter().zip(cached).zip(&guards) {
            let st = kl.stride();
            if st[1] != hd || st[2] != 1 || vl.stride() != st {
                return Err(Error::Internal(
                    "the KV cache is not laid out as [heads, slots, head_dim]".into(),
                ));
            }
            parts.push(crate::kernels::attention::Seq {
                row: s.row,
                len: s.len,
                pos: s.pos,
                k: cpu(kg, kl)?,
                v: cpu(vg, vl)?,
                head_stride: st[0],
                total: kl.dims()[1],
                k0: *k0,
            });
        }
        let mut out = vec![0f32; rows * nh * vd];
        crate::kernels::attention::attend(
            shape,
            &cpu(&qg, ql)?[..rows * nh * hd],
            &parts,
            sinks,
            &mut out,
        );
        drop(parts);
        drop(guards);
        drop(qg);
        Ok(Tensor::from_vec(out, (rows, nh * vd), q.device())?)
    }

    /// Scaled dot-product attention of one sequence, `q` `[nh, n, hd]`. Query heads that share a
    /// KV head are stacked along the row axis so the cached keys are used without being repeated.
    /// Long prefills are split into query chunks so the score matrices stay under
    /// `scores_bytes`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        k0: usize,
        s: &SeqRows,
        shape: crate::kernels::attention::Shape,
        sinks: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (nh, n) = (shape.heads, s.len);
        let total = k.dim(1)?;
        // Soft-capping keeps two more copies of the scores alive (scaled down, then tanh).
        let cap = if self.softcap.is_some() {
            self.scores_bytes * 4 / 6
        } else {
            self.scores_bytes
        };
        let chunk = query_chunk(cap, nh, total).min(n);
        if chunk == n {
            return self.attend_rows(q, k, v, k0, s.pos, shape, sinks);
        }
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut i = 0;
        while i < n {
            let c = chunk.min(n - i);
            let qc = q.narrow(1, i, c)?.contiguous()?;
            outs.push(self.attend_rows(&qc, k, v, k0, s.pos + i, shape, sinks)?);
            i += c;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Attention for `n` query rows starting at absolute position `pos`, against the cached
    /// keys up to `pos + n`; key 0 is at absolute position `k0`. Returns `[n, nh * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        k0: usize,
        pos: usize,
        shape: crate::kernels::attention::Shape,
        sinks: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (nh, nkv, hd, vd) = (shape.heads, shape.kv_heads, shape.head_dim, shape.v_dim);
        let window = shape.window;
        let n = q.dim(1)?;
        let groups = nh / nkv;
        let total = pos + n - k0;
        let k = k.narrow(1, 0, total)?;
        let v = v.narrow(1, 0, total)?.narrow(2, 0, vd)?;
        let q = q.reshape((nkv, groups * n, hd))?;
        let mut scores = (q.matmul(&k.t()?)? * shape.scale as f64)?; // [nkv, groups*n, total]
        if let Some(c) = self.softcap {
            scores = ((scores / c)?.tanh()? * c)?;
        }
        let needs_mask = n > 1 || window.is_some_and(|w| total > w);
        let scores = if needs_mask {
            let mut m = vec![0f32; n * total];
            for i in 0..n {
                let p = pos + i;
                for (j, slot) in m[i * total..(i + 1) * total].iter_mut().enumerate() {
                    let j = j + k0;
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
        let p = match sinks {
            // Each head's sink joins the softmax as one more column, then is dropped.
            Some(z) => {
                let z = z
                    .reshape((nkv, groups, 1, 1))?
                    .broadcast_as((nkv, groups, n, 1))?
                    .reshape((nkv, groups * n, 1))?;
                let all = Tensor::cat(&[&scores, &z.to_dtype(scores.dtype())?], 2)?;
                candle_nn::ops::softmax_last_dim(&all)?
                    .narrow(2, 0, total)?
                    .contiguous()?
            }
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let o = p.matmul(&v.contiguous()?)?; // [nkv, groups*n, vd]
        Ok(o.reshape((nh, n, vd))?
            .transpose(0, 1)?
            .reshape((n, nh * vd))?)
    }
}

/// Each chosen expert's rows and their router weights, by expert.
pub type Routes = std::collections::BTreeMap<usize, (Vec<u32>, Vec<f32>)>;

/// Each expert's rows and weights from the router's logits `[rows, experts]`: `logit_bias`
/// added (GPT-OSS), scored as `routing` says, then picked by [`choose`] with the correction
/// `bias`.
pub fn route_logits(
    mut logits: Tensor,
    logit_bias: Option<&Tensor>,
    bias: Option<&[f32]>,
    routing: &Routing,
    top_k: usize,
    norm: bool,
) -> Result<Routes> {
    if let Some(b) = logit_bias {
        logits = logits.broadcast_add(b)?;
    }
    let scores = match routing.scoring {
        Scoring::Softmax => candle_nn::ops::softmax_last_dim(&logits)?,
        Scoring::Sigmoid => candle_nn::ops::sigmoid(&logits)?,
        Scoring::TopKSoftmax => logits,
    }
    .to_device(&Device::Cpu)?
    .to_vec2::<f32>()?;
    Ok(choose(&scores, bias, routing, top_k, norm))
}

/// Each expert's rows and router weights, from the router's probabilities `[rows][experts]`:
/// the `top_k` largest per row (the lower index first among equals), renormalized to sum to 1
/// when `norm`.
pub fn route(probs: &[Vec<f32>], top_k: usize, norm: bool) -> Routes {
    choose(probs, None, &Routing::softmax(), top_k, norm)
}

/// Each expert's rows and weights under `routing`, from the scores `[rows][experts]`
/// (softmax or sigmoid of the router's logits):
/// - the choice ranks `score + bias` (DeepSeek V3's correction bias), or the score;
/// - with groups, only the experts of the `top_groups` best groups may be chosen, a group
///   scored by its best choice score or the sum of its best two;
/// - the `top_k` best are chosen (the lower index first among equals);
/// - their weights are their scores without the bias, renormalized to sum to 1 when `norm`,
///   then multiplied by the routing's scale.
pub fn choose(
    scores: &[Vec<f32>],
    bias: Option<&[f32]>,
    routing: &Routing,
    top_k: usize,
    norm: bool,
) -> Routes {
    let mut routes = Routes::new();
    let best_first = |v: &[f32], a: usize, b: usize| v[b].total_cmp(&v[a]).then(a.cmp(&b));
    for (r, p) in scores.iter().enumerate() {
        let mut choice: Vec<f32> = match bias {
            Some(b) => p.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => p.clone(),
        };
        if let Some(g) = routing.groups {
            let per = p.len() / g.groups;
            let group_score: Vec<f32> = choice
                .chunks(per)
                .map(|c| {
                    let mut c = c.to_vec();
                    c.sort_by(|a, b| b.total_cmp(a));
                    if g.top2_sum {
                        c[0] + c[1]
                    } else {
                        c[0]
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..g.groups).collect();
            order.sort_by(|&a, &b| best_first(&group_score, a, b));
            for &dropped in &order[g.top_groups..] {
                choice[dropped * per..(dropped + 1) * per].fill(f32::NEG_INFINITY);
            }
        }
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| best_first(&choice, a, b));
        order.truncate(top_k);
        // Softmax over the chosen logits (GPT-OSS); the first chosen is the largest.
        let top = order.first().map_or(0.0, |&e| p[e]);
        let weight = |e: usize| match routing.scoring {
            Scoring::TopKSoftmax => (p[e] - top).exp(),
            _ => p[e],
        };
        let sum: f32 = order.iter().map(|&e| weight(e)).sum();
        let norm = norm || routing.scoring == Scoring::TopKSoftmax;
        for e in order {
            let w = if norm { weight(e) / sum } else { weight(e) } * routing.scale;
            let slot = routes.entry(e).or_default();
            slot.0.push(r as u32);
            slot.1.push(w);
        }
    }
    routes
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
/// mapped through an f16 table of GELU values. On the CPU the table is built once (from
/// candle's GELU, so the values are the ones the tensor path gives) and applied in one pass on
/// every thread; a prefill step of the default model spent 6% of its time in the eight tensor
/// passes this replaces.
fn gelu_f16_table(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        let table = match TABLE.get() {
            Some(t) => t,
            None => {
                let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
                let t = gelu_f16_tensor(
                    &Tensor::new(all.as_slice(), x.device())?.to_dtype(DType::F32)?,
                )?;
                TABLE.get_or_init(|| t.to_vec1::<f32>().unwrap_or_default())
            }
        };
        if table.len() == 1 << 16 {
            use rayon::prelude::*;
            let n = x.dim(x.rank() - 1)?;
            return crate::kernels::matmul::with_rows(x, n, |xs, _, y| {
                y.par_chunks_mut(4096)
                    .zip(xs.par_chunks(4096))
                    .for_each(|(y, xs)| {
                        for (y, &v) in y.iter_mut().zip(xs) {
                            *y = if v >= 10.0 {
                                v
                            } else if v <= -10.0 {
                                0.0
                            } else {
                                table[half::f16::from_f32(v).to_bits() as usize]
                            };
                        }
                    });
                Ok(())
            });
        }
    }
    gelu_f16_tensor(x)
}

/// [`gelu_f16_table`] as tensor operations (any device).
fn gelu_f16_tensor(x: &Tensor) -> Result<Tensor> {
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

#[cfg(test)]
mod gelu_tests {
    use super::*;

    #[test]
    fn the_cpu_table_gives_the_tensor_paths_values() {
        let v: Vec<f32> = (-1300..1305)
            .map(|i| i as f32 * 0.01 + 0.003)
            .chain([10.0, -10.0, 1e-6, 65504.0, -7e4])
            .collect();
        let x = Tensor::new(v.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((10, v.len() / 10))
            .unwrap();
        let a: Vec<f32> = gelu_f16_table(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = gelu_f16_tensor(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }
}
