//! The engine: a model opened for streaming under a budget, and the step-level API.
//!
//! [`Engine::step`] is one sweep over the layers for a set of sequences, each with its own KV
//! cache and position, carrying any number of new tokens per sequence. Generation, batching,
//! serving and speculative decoding are built on it: sequences can join or leave between
//! sweeps. Opening and sizes are [`crate::weights::model`]'s, the plan and its options
//! [`crate::stream::plan`]'s, and what is held where [`crate::stream::placement`]'s; this file
//! puts them together and runs the sweep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::device::DevMat;
use crate::error::{Error, Result};
use crate::model::block::LayerKind;
use crate::model::block::Small;
use crate::model::{Block, LayerKv, Rope, SeqRows};
use crate::stream::experts::ExpertAccess;
use crate::stream::lookahead::Lookahead;
use crate::stream::placement::{Placement, Placer};
use crate::stream::pool::Pool;
use crate::stream::reader::{ReadSpec, StreamedMats, Target};
use crate::stream::stage::Stager;
use crate::stream::{Charge, HeldLayer, Ledger, Plan, Prefetcher};
use crate::stream::{ExpertCache, ExpertStats};
use crate::weights::schema::{Kind, LayerSchema, Naming};
use crate::weights::WeightSource;

pub use crate::stream::plan::{resolve_budget, EngineOptions};
pub use crate::weights::model::{ModelInfo, ModelSizes};

/// Which rows of logits a step returns for each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last new token (what generation needs).
    Last,
    /// Every new token (for tests, perplexity and speculative verification).
    All,
    /// None: the step only fills KV caches (a prefill chunk before the prompt's end), so the
    /// output head is skipped.
    None,
}

/// One sequence's state between steps: its KV cache and how many tokens it holds.
pub struct Sequence {
    kv: Vec<LayerKv>,
    _charge: Charge,
    /// The recurrent states' charge to the host when the KV cache is on a device.
    _state_charge: Option<Charge>,
}

impl Sequence {
    /// Tokens already processed, which is also the position of the next token.
    pub fn len(&self) -> usize {
        self.kv.first().map_or(0, |k| k.pos())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes its KV cache holds (allocated for the whole context), over all layers.
    pub fn kv_bytes(&self) -> u64 {
        self.kv.iter().map(LayerKv::bytes).sum()
    }
    /// Drops cached tokens from `len` on, so a shared prefix can be reused. Returns the length
    /// kept, which is shorter when a sliding-window layer has already dropped keys the next
    /// token would need; the caller feeds the tokens from there again.
    pub fn truncate(&mut self, len: usize) -> usize {
        // Until every layer agrees: a layer that keeps less makes the others go back further
        // (and a linear layer that cannot go back to that point starts over).
        let mut keep = len;
        loop {
            let k = self
                .kv
                .iter_mut()
                .map(|kv| kv.truncate(keep))
                .min()
                .unwrap_or(0);
            if k == keep || self.kv.iter().all(|kv| kv.pos() == k) {
                return k;
            }
            keep = k;
        }
    }
}

/// Timings of one layer, summed over steps.
#[derive(Debug, Clone, Default)]
pub struct LayerTiming {
    pub streamed: bool,
    /// Time the reader spent reading this layer.
    pub read: Duration,
    /// Time compute waited for this layer to arrive.
    pub wait: Duration,
    pub compute: Duration,
}

/// Where a phase's time went, for `--profile`.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub steps: usize,
    pub layers: Vec<LayerTiming>,
    pub embed: Duration,
    /// Time the reader spent reading head slices.
    pub head_read: Duration,
    /// Time compute waited for head slices.
    pub head_wait: Duration,
    pub head_compute: Duration,
    pub wall: Duration,
    /// Weight bytes copied host→device.
    pub moved: u64,
    /// The expert cache's hits, misses and bytes read (MoE models).
    pub experts: ExpertStats,
}

impl Profile {
    fn new(n: usize) -> Self {
        Profile {
            layers: vec![LayerTiming::default(); n],
            ..Default::default()
        }
    }
    pub fn total_read(&self) -> Duration {
        self.layers.iter().map(|l| l.read).sum::<Duration>() + self.head_read
    }
    /// Time compute spent blocked on I/O: waiting for streamed layers and head slices.
    pub fn total_wait(&self) -> Duration {
        self.layers.iter().map(|l| l.wait).sum::<Duration>() + self.head_wait
    }
    pub fn total_compute(&self) -> Duration {
        self.layers.iter().map(|l| l.compute).sum::<Duration>() + self.head_compute + self.embed
    }
}

pub struct Engine {
    /// First, so it is dropped (and its copies in flight finished) before the host buffers
    /// they read from.
    stager: Option<Stager>,
    cfg: ModelConfig,
    dir: PathBuf,
    src: Arc<dyn WeightSource>,
    /// Each layer's tensors.
    schemas: Vec<LayerSchema>,
    device: Device,
    opts: EngineOptions,
    plan: Plan,
    ledger: Arc<Ledger>,
    block: Block,
    /// The global RoPE, and the local one where sliding-window layers use another base.
    ropes: Vec<Rope>,
    final_norm: Tensor,
    head_name: String,
    head: Option<DevMat>,
    head_tier: Placement,
    /// Layers held on the device (the first ones of `resident`).
    device_layers: usize,
    resident: Vec<Option<HeldLayer>>,
    /// Norms and biases of the streamed layers, kept on a GPU so none are copied per token.
    device_small: Vec<Option<Small>>,
    streamed: Vec<usize>,
    device_ledger: Option<Arc<Ledger>>,
    prefetch: Option<Prefetcher>,
    /// The experts of sparse layers, read as routing picks them.
    experts: Option<ExpertCache>,
    _held: Vec<Charge>,
    /// Rows a step may carry with each row's logits exactly as a one-row step gives them.
    exact_rows: usize,
    pub prefill_profile: Profile,
    pub decode_profile: Profile,
}

/// [`crate::kernels::matmul::exact_rows`] over the matrices of every layer (experts included)
/// and the head, in the forms they are held in. Only our CPU kernels promise it: on a GPU,
/// cuBLAS and candle's kernels may sum a row differently beside others, so there it only
/// bounds the rows a verifying sweep carries.
fn exact_rows(schemas: &[LayerSchema], src: &dyn WeightSource, head: &str) -> usize {
    let naming = src.naming();
    schemas
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.tensors.iter().filter(|t| !t.is_small()).map(move |t| {
                if t.kind == Kind::Expert && naming == Naming::Hf {
                    t.expert_name(naming, i, 0).0
                } else {
                    t.name(naming, i)
                }
            })
        })
        .chain(std::iter::once(head.to_string()))
        .filter_map(|name| src.form(&name).ok())
        .map(crate::kernels::matmul::exact_rows)
        .min()
        .unwrap_or(1)
}

impl Engine {
    pub fn open(dir: &Path, opts: EngineOptions) -> Result<Self> {
        Self::from_info(ModelInfo::open(dir)?, opts)
    }

    pub fn from_info(info: ModelInfo, opts: EngineOptions) -> Result<Self> {
        let plan = info.plan(&opts)?;
        let ModelInfo {
            dir,
            cfg,
            src,
            head_name,
            sizes: _,
        } = info;
        let device = opts.device.clone();
        let ledger = Ledger::new(plan.budget);
        let dplan = plan.device.clone();
        let device_ledger = dplan.as_ref().map(|d| Ledger::new(d.budget));
        // The link comes first: on a GPU it pins every large host buffer allocated after it.
        let stager = match &dplan {
            Some(d) if d.stages() => Some(Stager::new(
                crate::device::tier(&device).link(&device, d.slots, d.slot_bytes)?,
                d.slot_bytes,
            )),
            _ => None,
        };
        let device_layers = dplan.as_ref().map_or(0, |d| d.resident_layers);
        let head_tier = Placement::of_head(&plan);
        if !device.is_cpu() && dplan.is_none() {
            return Err(Error::Internal("a GPU engine without a device plan".into()));
        }
        if opts.keep_page_cache {
            src.io().keep_page_cache();
        } else {
            src.io()
                .set_drop_cache(plan.streams() || plan.expert_slots < plan.experts_total);
        }
        // The working set, fixed tensors and what the caller holds are charged for the
        // engine's life.
        let mut held =
            vec![ledger.charge(plan.work_bytes + plan.fixed_bytes + plan.reserved_bytes)];
        if let (Some(d), Some(dl)) = (&dplan, &device_ledger) {
            held.push(dl.charge(
                d.work_bytes
                    + d.fixed_bytes
                    + (d.slots + if d.stages() { d.extra_slots } else { 0 }) as u64 * d.slot_bytes,
            ));
        }
        let norm_offset = cfg.block.norm_offset;
        let mut final_norm = src.load(src.naming().final_norm(), &device)?;
        if norm_offset != 0.0 {
            final_norm = (final_norm + norm_offset as f64)?;
        }
        // llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors.
        let factors = match src.meta(Naming::GGUF_ROPE_FREQS) {
            Some(_) => Some(
                src.load(Naming::GGUF_ROPE_FREQS, &device)?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let dim = cfg.rotary_dim;
        let mut ropes = vec![Rope::new(&cfg.rope, dim, factors.as_deref(), opts.context)];
        if let Some(local) = &cfg.rope_local {
            ropes.push(Rope::new(local, dim, None, opts.context));
        }
        let schemas = LayerSchema::all(&cfg);
        let placed = Placer {
            src: src.as_ref(),
            schemas: &schemas,
            head_name: &head_name,
            norm_offset,
            plan: &plan,
            device: &device,
            staged: stager.is_some(),
            ledger: &ledger,
            device_ledger: device_ledger.as_ref(),
        }
        .load()?;
        held.extend(placed.held);
        let (head, resident, device_small) = (placed.head, placed.resident, placed.device_small);
        let held_layers = device_layers + plan.resident_layers;
        let streamed: Vec<usize> = (held_layers..cfg.num_layers).collect();
        let experts = if plan.experts_total > 0 {
            let charge = ledger.charge(plan.expert_slots as u64 * plan.expert_bytes);
            let mut cache = ExpertCache::new(
                src.clone(),
                schemas.clone(),
                plan.expert_slots,
                plan.expert_bytes,
                charge,
            )?;
            if let Some(path) = &opts.expert_trace {
                cache.trace_to(path)?;
            }
            if let (true, Some(m)) = (plan.lookahead_bytes > 0, &cfg.moe) {
                let look = Lookahead::new(src.as_ref(), &schemas, m.routing.clone(), m.top_k)?;
                cache.set_lookahead(look, ledger.charge(plan.lookahead_bytes));
            }
            if plan.expert_slots == plan.experts_total {
                let sparse: Vec<usize> = (0..cfg.num_layers)
                    .filter(|&l| schemas[l].is_sparse())
                    .collect();
                cache.preload(&sparse)?;
                cache.stats = Default::default();
                cache.wait = Duration::ZERO;
            }
            Some(cache)
        } else {
            None
        };
        let exact_rows = exact_rows(&schemas, src.as_ref(), &head_name);
        let mut engine = Engine {
            exact_rows,
            experts,
            stager,
            head_tier,
            device_layers,
            device_small,
            device_ledger,
            block: Block {
                scores_bytes: opts.attention_scores_bytes,
                ..Block::new(&cfg)
            },
            ropes,
            prefill_profile: Profile::new(cfg.num_layers),
            decode_profile: Profile::new(cfg.num_layers),
            cfg,
            dir,
            src,
            schemas,
            device,
            opts,
            plan,
            ledger,
            final_norm,
            head_name,
            head,
            resident,
            streamed,
            prefetch: None,
            _held: held,
        };
        engine.start_reader()?;
        Ok(engine)
    }

    /// (Re)starts the background reader at the first streamed layer, with a fresh pool of
    /// read buffers charged to the budget.
    fn start_reader(&mut self) -> Result<()> {
        // The link may still hold a read buffer of the old pool.
        if let Some(st) = self.stager.as_mut() {
            st.finish()?;
        }
        self.prefetch = None;
        if !self.plan.streams() {
            return Ok(());
        }
        let pool = Arc::new(Pool::new(
            self.plan.buffers,
            crate::weights::io::read_capacity(self.plan.slice_bytes as usize),
            self.ledger.charge(self.plan.inflight_bytes),
        ));
        let spec = ReadSpec {
            schemas: self.schemas.clone(),
            layers: self.streamed.clone(),
            head: (!self.plan.head_resident).then(|| (self.head_name.clone(), self.cfg.vocab_size)),
            slice_bytes: self.plan.slice_bytes,
            norm_offset: self.cfg.block.norm_offset,
            // On a GPU the streamed layers' norms are already there; the reader's CPU copies
            // only mark the layer's start.
            device: if self.device_small.iter().any(Option::is_some) {
                Device::Cpu
            } else {
                self.device.clone()
            },
        };
        self.prefetch = Some(Prefetcher::spawn(spec, self.src.clone(), pool)?);
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }
    /// The device's ledger, when a device tier is planned.
    pub fn device_ledger(&self) -> Option<&Arc<Ledger>> {
        self.device_ledger.as_ref()
    }
    /// Weight bytes copied host→device so far.
    pub fn bytes_moved(&self) -> u64 {
        self.stager.as_ref().map_or(0, Stager::moved)
    }
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }
    /// The expert cache's counts so far (MoE models).
    pub fn expert_stats(&self) -> Option<ExpertStats> {
        self.experts.as_ref().map(|c| c.stats)
    }
    /// The most rows a step may carry (over all its sequences) while every row's logits
    /// keep the bits a one-row step gives: below it each kernel computes rows one by one.
    /// Speculative verification stays within it so drafts never change greedy output.
    pub fn exact_rows(&self) -> usize {
        self.exact_rows
    }
    /// Bytes read from the checkpoint so far.
    pub fn bytes_read(&self) -> u64 {
        self.src.io().bytes_read()
    }
    /// The checkpoint's files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.src.files()
    }

    /// A new, empty sequence. Its KV cache for the full context (or window) is allocated and
    /// charged now.
    pub fn new_sequence(&self) -> Result<Sequence> {
        let c = &self.cfg;
        let o = &self.opts;
        // The KV cache lives with the compute: on the device when there is one.
        // Recurrent states stay in host memory; the KV cache lives with the compute (on the
        // device when there is one).
        let states = crate::stream::plan::state_bytes_per_seq(c, o);
        let (kv_ledger, state_charge) = match &self.device_ledger {
            Some(d) if states > 0 => {
                let charge = self.ledger.try_charge(states).ok_or_else(|| {
                    Error::NoRoom(format!(
                        "no room in the budget for another sequence's recurrent state of {}",
                        crate::util::fmt_bytes(states)
                    ))
                })?;
                (d, Some(charge))
            }
            Some(d) => (d, None),
            None => (&self.ledger, None),
        };
        let kv_bytes = crate::stream::plan::kv_bytes_per_seq(c, o)
            - if state_charge.is_some() { states } else { 0 };
        let charge = kv_ledger
            .try_charge(kv_bytes)
            .ok_or_else(|| {
                Error::NoRoom(format!(
                "no room in the budget for another sequence's KV cache of {} (planned for {} sequences of {} tokens; {} of {} held)",
                crate::util::fmt_bytes(crate::stream::plan::kv_bytes_per_seq(c, o)),
                o.max_batch, o.context,
                crate::util::fmt_bytes(self.ledger.held()),
                crate::util::fmt_bytes(self.ledger.budget())
            ))
            })?;
        let kv = c
            .layer_windows
            .iter()
            .enumerate()
            .map(|(layer, &w)| {
                if let Some(l) = c.linear.as_ref().filter(|_| c.is_linear(layer)) {
                    return LayerKv::recurrent(
                        crate::stream::plan::linear_shape(l),
                        o.context,
                        o.rollback_rows,
                    );
                }
                if let Some(m) = &c.mla {
                    return LayerKv::latent(o.context, m.cache_dim(), &self.device);
                }
                LayerKv::new(
                    c.num_kv_heads,
                    o.context,
                    w,
                    o.max_step_tokens,
                    c.head_dim,
                    &self.device,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Sequence {
            kv,
            _charge: charge,
            _state_charge: state_charge,
        })
    }

    /// One sweep over all layers for `batch`: each entry is a sequence and its new tokens.
    /// Returns each sequence's logits `[rows, vocab]`, rows per `which` (none at all for
    /// [`LogitsFor::None`]).
    ///
    /// On error the reader is restarted and the sequences in the batch must be discarded, since
    /// some layers may have cached their tokens and others not.
    pub fn step(
        &mut self,
        batch: &mut [(&mut Sequence, &[u32])],
        which: LogitsFor,
    ) -> Result<Vec<Tensor>> {
        let tails: Vec<usize> = batch
            .iter()
            .map(|(_, t)| match which {
                LogitsFor::Last => 1,
                LogitsFor::All => t.len(),
                LogitsFor::None => 0,
            })
            .collect();
        self.step_rows(batch, &tails)
    }

    /// [`Engine::step`] with the logits of the last `tails[i]` new tokens of sequence `i`
    /// (at most its new tokens): a sequence mid-prefill wants none, one that decodes its
    /// last, a speculative verification every draft position. Every sequence gets its
    /// `[tails[i], vocab]` rows, unless no rows are wanted at all: then the output head is
    /// skipped and the result is empty.
    pub fn step_rows(
        &mut self,
        batch: &mut [(&mut Sequence, &[u32])],
        tails: &[usize],
    ) -> Result<Vec<Tensor>> {
        let r = self.sweep(batch, tails);
        if r.is_err() {
            // The step's own error is the one to report; a failed restart shows at the next
            // step.
            if let Err(e) = self.start_reader() {
                tracing::warn!("restarting the reader failed: {e}");
            }
        }
        r
    }

    fn sweep(
        &mut self,
        batch: &mut [(&mut Sequence, &[u32])],
        tails: &[usize],
    ) -> Result<Vec<Tensor>> {
        let t0 = Instant::now();
        if tails.len() != batch.len() || batch.iter().zip(tails).any(|((_, t), &n)| n > t.len()) {
            return Err(Error::Internal(
                "rows of logits asked for that the step does not carry".into(),
            ));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        for (seq, toks) in batch.iter() {
            if toks.is_empty() {
                return Err(Error::Invalid(
                    "a sequence in the step has no new tokens".into(),
                ));
            }
            let pos = seq.len();
            seqs.push(SeqRows {
                row: ids.len(),
                len: toks.len(),
                pos,
            });
            ids.extend_from_slice(toks);
            positions.extend(pos..pos + toks.len());
        }
        let logit_rows: usize = tails.iter().sum();
        if ids.len() > self.opts.max_step_tokens || logit_rows > self.opts.max_logit_rows {
            return Err(Error::Invalid(format!(
                "a step of {} tokens with {logit_rows} rows of logits exceeds what the plan reserved ({} tokens, {} rows)",
                ids.len(),
                self.opts.max_step_tokens,
                self.opts.max_logit_rows
            )));
        }
        if let Some(p) = &self.prefetch {
            p.begin_step(logit_rows > 0);
        }
        // Prefill: chunks that want few of their rows, or too many for verification. A step
        // whose every row is scored and short is decode, speculative or not.
        let prefill = seqs.iter().zip(tails).any(|(s, &n)| {
            s.len > 1 && (n < s.len || s.len > crate::kernels::attention::ROW_EXACT)
        });
        let mut prof = std::mem::take(if prefill {
            &mut self.prefill_profile
        } else {
            &mut self.decode_profile
        });

        let moved0 = self.bytes_moved();
        let experts0 = self.expert_stats().unwrap_or_default();
        let result = (|| -> Result<Vec<Tensor>> {
            let t = Instant::now();
            let mut x = self
                .src
                .load_rows(self.src.naming().embed(), &ids, &self.device)?;
            if let Some(scale) = self.cfg.embed_scale {
                x = (x * scale)?;
            }
            let tables = self
                .ropes
                .iter()
                .map(|r| r.cos_sin(&positions, &self.device))
                .collect::<Result<Vec<_>>>()?;
            prof.embed += t.elapsed();
            for layer in 0..self.cfg.num_layers {
                let kind = LayerKind {
                    window: self.cfg.layer_windows[layer],
                    sparse: self.schemas[layer].is_sparse(),
                    linear: self.cfg.is_linear(layer),
                };
                let (cos, sin) = &tables[self.cfg.layer_rope(layer)];
                let mut kv: Vec<&mut LayerKv> =
                    batch.iter_mut().map(|(s, _)| &mut s.kv[layer]).collect();
                let timing = &mut prof.layers[layer];
                let experts = match (&mut self.experts, kind.sparse) {
                    (Some(cache), true) => Some(ExpertAccess { cache, layer }),
                    _ => None,
                };
                let expert_wait = experts.as_ref().map_or(Duration::ZERO, |a| a.cache.wait);
                let t = Instant::now();
                if let Some(w) = &self.resident[layer] {
                    let stager = self.stager.as_mut();
                    x = match stager {
                        Some(st) if layer >= self.device_layers => {
                            let mut mats = w.staged(st, experts);
                            self.block
                                .forward(&w.small, &mut mats, &x, &seqs, &mut kv, cos, sin, kind)?
                        }
                        st => {
                            let mut mats = w.held(experts, st);
                            self.block
                                .forward(&w.small, &mut mats, &x, &seqs, &mut kv, cos, sin, kind)?
                        }
                    };
                    timing.compute += t.elapsed();
                } else {
                    let reader = self
                        .prefetch
                        .as_ref()
                        .ok_or_else(|| Error::Reader("the reader is not running".into()))?;
                    let (read_small, read, wait) = reader.small(layer)?;
                    let small = self.device_small[layer].as_ref().unwrap_or(&read_small);
                    let mut mats = StreamedMats {
                        reader,
                        stager: self.stager.as_mut(),
                        schema: &self.schemas[layer],
                        layer,
                        experts,
                        read,
                        wait,
                    };
                    x = self
                        .block
                        .forward(small, &mut mats, &x, &seqs, &mut kv, cos, sin, kind)?;
                    timing.streamed = true;
                    timing.read += mats.read;
                    timing.wait += mats.wait;
                    timing.compute += t.elapsed().saturating_sub(mats.wait);
                }
                // Time spent waiting for experts being read is I/O wait, not compute.
                if let Some(c) = self.experts.as_ref().filter(|_| kind.sparse) {
                    let w = c.wait.saturating_sub(expert_wait);
                    timing.wait += w;
                    timing.compute = timing.compute.saturating_sub(w);
                }
            }
            // Only the rows whose logits are wanted go through the norm and the head.
            if logit_rows == 0 {
                return Ok(vec![]);
            }
            let h = if logit_rows == ids.len() {
                x.clone()
            } else {
                let rows: Vec<u32> = seqs
                    .iter()
                    .zip(tails)
                    .flat_map(|(s, &n)| (s.row + s.len - n..s.row + s.len).map(|r| r as u32))
                    .collect();
                x.index_select(&Tensor::new(rows, &self.device)?, 0)?
            };
            let h = crate::model::block::final_norm(&h, &self.final_norm, self.block.eps)?;
            let logits = self.head_forward(&h, &mut prof)?;
            // Logits go back to the host as f32 rows; on a GPU this also ends the step's work.
            let logits = logits.to_device(&Device::Cpu)?;
            let mut out = Vec::with_capacity(seqs.len());
            let mut row = 0;
            for &n in tails {
                out.push(logits.narrow(0, row, n)?);
                row += n;
            }
            Ok(out)
        })();
        // The step's copies are done (its logits were read back); the link returns the read
        // buffer it still holds, so the reader can use them all for the next step.
        let result = match (result, self.stager.as_mut()) {
            (Ok(r), Some(st)) => st.finish().map(|_| r),
            (r, _) => r,
        };
        prof.steps += 1;
        prof.wall += t0.elapsed();
        prof.moved += self.bytes_moved() - moved0;
        let e = self.expert_stats().unwrap_or_default().since(&experts0);
        prof.experts += e;
        *(if prefill {
            &mut self.prefill_profile
        } else {
            &mut self.decode_profile
        }) = prof;
        result
    }

    /// The output head: held whole, or in slices from the reader.
    fn head_forward(&mut self, h: &Tensor, prof: &mut Profile) -> Result<Tensor> {
        let t = Instant::now();
        let mut waited = Duration::ZERO;
        let logits = if let Some(w) = &self.head {
            match (w, self.stager.as_mut(), self.head_tier) {
                (DevMat::Host(m), Some(st), Placement::Host) => st.matmul_held(m.view(), h)?,
                _ => w.matmul(h)?,
            }
        } else {
            let reader = self
                .prefetch
                .as_ref()
                .ok_or_else(|| Error::Reader("the reader is not running".into()))?;
            let (l, read, wait) =
                reader.matmul(Target::Head, self.cfg.vocab_size, h, self.stager.as_mut())?;
            prof.head_read += read;
            prof.head_wait += wait;
            waited = wait;
            l
        };
        prof.head_compute += t.elapsed().saturating_sub(waited);
        Ok(match self.cfg.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}
