//! The engine: a model opened for streaming under a budget, and the step-level API.
//!
//! [`Engine::step`] is one sweep over the layers for a set of sequences, each with its own KV
//! cache and position, carrying any number of new tokens per sequence. Generation, batching and
//! (later) serving and speculative decoding are built on it: sequences can join or leave
//! between sweeps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::block::{layer_tensors, validate_layers};
use crate::model::{Block, LayerKv, LayerWeights, Rope, SeqRows};
use crate::stream::reader::load_layer;
use crate::stream::{Charge, Ledger, Plan, PlanInput, Prefetcher};
use crate::weights::names::Naming;
use crate::weights::safetensors::STAGING_ELEMS;
use crate::weights::{GgufSource, SafetensorsSource, Weight, WeightSource};

/// How the engine is sized. The plan reserves memory for `max_batch` sequences of `context`
/// tokens and steps of up to `max_step_tokens` new tokens.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The budget in bytes; `None` takes 90% of the machine's available memory.
    pub max_memory: Option<u64>,
    /// Tokens each sequence can hold (prompt plus generated).
    pub context: usize,
    pub max_batch: usize,
    /// Most new tokens in one step, over all sequences (the prefill of the whole batch).
    pub max_step_tokens: usize,
    /// Most rows of logits one step returns.
    pub max_logit_rows: usize,
    /// Cap on attention-score bytes; long prefills are split into query chunks to stay under it.
    pub attention_scores_bytes: u64,
    /// Keep streamed weights in the page cache. By default, when anything is streamed, pages
    /// are dropped after each read so the cache does not grow past the budget.
    pub keep_page_cache: bool,
    pub device: Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_memory: None,
            context: 2048,
            max_batch: 1,
            max_step_tokens: 2048,
            max_logit_rows: 1,
            attention_scores_bytes: crate::model::block::ATTN_SCORES_BYTES,
            keep_page_cache: false,
            device: Device::Cpu,
        }
    }
}

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
}

impl Sequence {
    /// Tokens already processed, which is also the position of the next token.
    pub fn len(&self) -> usize {
        self.kv.first().map_or(0, |k| k.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops cached tokens from `len` on, so a shared prefix can be reused.
    pub fn truncate(&mut self, len: usize) {
        self.kv.iter_mut().for_each(|k| k.truncate(len));
    }
}

/// Timings of one layer, summed over steps.
#[derive(Debug, Clone, Default)]
pub struct LayerTiming {
    pub streamed: bool,
    /// Time the reader spent reading and converting this layer.
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
    pub head_read: Duration,
    pub head_compute: Duration,
    pub wall: Duration,
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
    /// Time compute spent blocked on I/O: waiting for streamed layers, and reading head
    /// chunks, which happens on the compute thread.
    pub fn total_wait(&self) -> Duration {
        self.layers.iter().map(|l| l.wait).sum::<Duration>() + self.head_read
    }
    pub fn total_compute(&self) -> Duration {
        self.layers.iter().map(|l| l.compute).sum::<Duration>() + self.head_compute + self.embed
    }
}

pub struct Engine {
    cfg: ModelConfig,
    dir: PathBuf,
    src: Arc<dyn WeightSource>,
    device: Device,
    opts: EngineOptions,
    plan: Plan,
    ledger: Arc<Ledger>,
    block: Block,
    /// The global RoPE, and the local one where sliding-window layers use another base.
    ropes: Vec<Rope>,
    final_norm: Tensor,
    head_name: String,
    head: Option<Weight>,
    resident: Vec<Option<LayerWeights>>,
    streamed: Vec<usize>,
    layer_bytes: u64,
    prefetch: Option<Prefetcher>,
    _held: Vec<Charge>,
    pub prefill_profile: Profile,
    pub decode_profile: Profile,
}

/// Sizes of a model's parts, from the checkpoint's tensor table.
#[derive(Debug, Clone)]
pub struct ModelSizes {
    pub params: u64,
    pub file_bytes: u64,
    pub layer_file_bytes: u64,
    /// One layer's bytes in compute form (f32, or quantized blocks).
    pub layer_bytes: u64,
    /// Transient bytes a reading thread holds while converting one tensor: the 16-bit staging
    /// buffer for safetensors, or a tensor's raw blocks for GGUF.
    pub staging_bytes: u64,
    pub head_file_bytes: u64,
    pub head_bytes: u64,
    pub dtypes: Vec<&'static str>,
}

impl ModelSizes {
    pub fn of(cfg: &ModelConfig, src: &dyn WeightSource, head_name: &str) -> Result<Self> {
        let mut s = ModelSizes {
            params: 0,
            file_bytes: 0,
            layer_file_bytes: 0,
            layer_bytes: 0,
            staging_bytes: 0,
            head_file_bytes: 0,
            head_bytes: 0,
            dtypes: vec![],
        };
        let gguf = src.naming() == Naming::Gguf;
        let add = |name: &str, s: &mut ModelSizes| -> Result<crate::weights::TensorMeta> {
            let m = src
                .meta(name)
                .ok_or_else(|| Error::tensor(src.path(), name, "missing from the checkpoint"))?;
            s.params += m.numel() as u64;
            s.file_bytes += m.file_bytes;
            if !s.dtypes.contains(&m.dtype) {
                s.dtypes.push(m.dtype);
            }
            Ok(m)
        };
        let naming = src.naming();
        let mut sizes_per_layer = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let (mut compute, mut file) = (0, 0);
            for (role, _) in layer_tensors(cfg) {
                let m = add(&naming.layer(layer, role, cfg.block.sandwich_norms), &mut s)?;
                compute += m.compute_bytes;
                file += m.file_bytes;
                let staging = if gguf {
                    m.file_bytes
                } else {
                    // The 16-bit staging buffer, or the aligned O_DIRECT buffer, per thread.
                    let es = m.file_bytes / m.numel().max(1) as u64;
                    m.file_bytes.min(es * STAGING_ELEMS as u64)
                        + 2 * crate::weights::io::DIRECT_ALIGN as u64
                };
                s.staging_bytes = s.staging_bytes.max(staging);
            }
            sizes_per_layer.push((compute, file));
        }
        // Quantized files may mix types across layers; plan for the largest layer.
        s.layer_bytes = sizes_per_layer.iter().map(|x| x.0).max().unwrap_or(0);
        s.layer_file_bytes = sizes_per_layer.iter().map(|x| x.1).max().unwrap_or(0);
        add(naming.embed(), &mut s)?;
        add(naming.final_norm(), &mut s)?;
        if head_name != naming.embed() {
            add(head_name, &mut s)?;
        }
        if let Some(m) = src.meta(head_name) {
            s.head_file_bytes = m.file_bytes;
            s.head_bytes = m.compute_bytes;
        }
        Ok(s)
    }
}

/// Bytes of activations for the largest step the options allow, generously counted.
fn work_bytes(cfg: &ModelConfig, o: &EngineOptions) -> u64 {
    let rows = o.max_step_tokens as u64;
    let qkv = ((2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) as u64;
    let per_row = 6 * cfg.hidden_size as u64 + 2 * qkv + 3 * cfg.intermediate_size as u64;
    let per_seq_new = rows.min(o.context as u64);
    let scores = (4 * cfg.num_heads as u64 * per_seq_new * o.context as u64)
        .min(o.attention_scores_bytes / 4);
    let logits = 2 * o.max_logit_rows as u64 * cfg.vocab_size as u64;
    4 * (rows * per_row + scores + logits)
}

/// Opens the config, checkpoint and sizes of a model, shared by the engine and `inspect`.
pub struct ModelInfo {
    /// The model folder or GGUF file.
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub src: Arc<dyn WeightSource>,
    pub head_name: String,
    pub sizes: ModelSizes,
}

impl ModelInfo {
    /// Opens a Hugging Face folder or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    /// Like [`ModelInfo::open`]; `dequantize` widens a GGUF file's quantized matrices to f32
    /// at load (see [`GgufSource::dequantize`]).
    pub fn open_with(path: &Path, dequantize: bool) -> Result<Self> {
        Self::open_opts(path, dequantize, false)
    }

    /// Like [`ModelInfo::open_with`]; `f16` holds a Hugging Face checkpoint's matrices as f16
    /// (see [`SafetensorsSource::f16`]). GGUF files keep their own types.
    pub fn open_opts(path: &Path, dequantize: bool, f16: bool) -> Result<Self> {
        let (cfg, src): (ModelConfig, Arc<dyn WeightSource>) = if crate::weights::is_gguf(path) {
            let mut g = GgufSource::open(path)?;
            g.dequantize = dequantize;
            // The vocabulary arrays are only for the tokenizer, which reads them separately;
            // the engine would otherwise hold them (~30 MB for a 262k vocabulary) for its life.
            let vocab = g
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|t| t.len() as u64);
            g.file
                .metadata
                .retain(|k, v| !(k.starts_with("tokenizer.ggml.") && v.as_array().is_some()));
            if let Some(n) = vocab {
                g.file.metadata.insert(
                    "tokenizer.ggml.tokens.count".into(),
                    crate::weights::gguf::Value::U(n),
                );
            }
            (ModelConfig::from_gguf(&g.file)?, Arc::new(g))
        } else {
            let cfg = ModelConfig::from_file(&path.join("config.json"))?;
            let mut st = SafetensorsSource::open(path)?;
            st.f16 = f16;
            (cfg, Arc::new(st))
        };
        validate_layers(&cfg, src.as_ref())?;
        let naming = src.naming();
        let check = |name: &str, shape: &[usize]| -> Result<()> {
            let m = src
                .meta(name)
                .ok_or_else(|| Error::tensor(path, name, "missing from the checkpoint"))?;
            if m.shape != shape {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "shape {:?} disagrees with the config, which implies {shape:?}",
                        m.shape
                    ),
                ));
            }
            Ok(())
        };
        check(naming.embed(), &[cfg.vocab_size, cfg.hidden_size])?;
        check(naming.final_norm(), &[cfg.hidden_size])?;
        let head_name = if cfg.tie_word_embeddings {
            naming.embed().to_string()
        } else {
            check(naming.head(), &[cfg.vocab_size, cfg.hidden_size])?;
            naming.head().to_string()
        };
        let sizes = ModelSizes::of(&cfg, src.as_ref(), &head_name)?;
        Ok(ModelInfo {
            dir: path.to_path_buf(),
            cfg,
            src,
            head_name,
            sizes,
        })
    }

    /// The plan a budget would give, without loading anything.
    pub fn plan(&self, opts: &EngineOptions) -> Result<Plan> {
        validate_options(opts)?;
        let budget = resolve_budget(opts.max_memory)?;
        Plan::new(&self.plan_input(opts), budget)
    }

    fn plan_input(&self, opts: &EngineOptions) -> PlanInput {
        let c = &self.cfg;
        let kv_per_seq = (2 * c.num_layers * c.num_kv_heads * c.head_dim * opts.context * 4) as u64;
        let half = c.head_dim / 2;
        let vocab = c.vocab_size.max(1) as u64;
        PlanInput {
            num_layers: c.num_layers,
            layer_bytes: self.sizes.layer_bytes,
            layer_file_bytes: self.sizes.layer_file_bytes,
            vocab: c.vocab_size,
            head_bytes: self.sizes.head_bytes,
            // A chunk's rows are held in compute form and, while read, as file bytes.
            head_row_bytes: (self.sizes.head_bytes + self.sizes.head_file_bytes).div_ceil(vocab),
            head_file_bytes: self.sizes.head_file_bytes,
            kv_bytes: kv_per_seq * opts.max_batch as u64,
            work_bytes: work_bytes(c, opts),
            // The final norm, two rope tables, and the staging buffers of the threads that read
            // (the I/O pool, the reader and the compute thread).
            fixed_bytes: (c.hidden_size * 4 + 4 * opts.max_step_tokens * half * 4) as u64
                + (crate::weights::io::pool_threads() as u64 + 2) * self.sizes.staging_bytes,
        }
    }
}

fn validate_options(o: &EngineOptions) -> Result<()> {
    // The upper bound is far beyond any model's context; it keeps the plan's byte arithmetic
    // from overflowing.
    const MAX: usize = 1 << 24;
    for (name, v) in [
        ("context size", o.context),
        ("batch", o.max_batch),
        ("tokens per step", o.max_step_tokens),
        ("logit rows", o.max_logit_rows),
    ] {
        if v == 0 || v > MAX {
            return Err(Error::Invalid(format!(
                "{name} {v} is out of range (1 to {MAX})"
            )));
        }
    }
    Ok(())
}

/// The default budget: 90% of what the kernel says is available.
pub fn resolve_budget(max_memory: Option<u64>) -> Result<u64> {
    match max_memory {
        Some(b) => Ok(b),
        None => crate::util::available_memory()
            .map(|a| a / 10 * 9)
            .ok_or_else(|| {
                Error::Invalid("cannot read available memory; pass --max-memory".into())
            }),
    }
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
            sizes,
        } = info;
        let device = opts.device.clone();
        let ledger = Ledger::new(plan.budget);
        let streaming = plan.streamed_layers > 0 || !plan.head_resident;
        src.io().set_drop_cache(streaming && !opts.keep_page_cache);
        let layer_bytes = sizes.layer_bytes;
        // The working set and fixed tensors are held for the engine's life.
        let mut held = vec![ledger.charge(plan.work_bytes + plan.fixed_bytes)];
        let naming = src.naming();
        let mut final_norm = src.load(naming.final_norm(), &device)?;
        if cfg.block.norm_offset != 0.0 {
            final_norm = (final_norm + cfg.block.norm_offset as f64)?;
        }
        let head = if plan.head_resident {
            held.push(ledger.charge(sizes.head_bytes));
            Some(src.load_weight(&head_name, &device)?)
        } else {
            None
        };
        // llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors.
        let factors = match src.meta("rope_freqs.weight") {
            Some(_) => Some(src.load("rope_freqs.weight", &device)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut ropes = vec![Rope::new(&cfg.rope, cfg.head_dim, factors.as_deref())];
        if let Some(local) = &cfg.rope_local {
            ropes.push(Rope::new(local, cfg.head_dim, None));
        }
        let mut resident = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            if i < plan.resident_layers {
                let (w, charge, _) =
                    load_layer(&cfg, src.as_ref(), &ledger, layer_bytes, i, &device)?;
                held.push(charge);
                resident.push(Some(w));
            } else {
                resident.push(None);
            }
        }
        let streamed: Vec<usize> = (plan.resident_layers..cfg.num_layers).collect();
        let mut engine = Engine {
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
            device,
            opts,
            plan,
            ledger,
            final_norm,
            head_name,
            head,
            resident,
            streamed,
            layer_bytes,
            prefetch: None,
            _held: held,
        };
        engine.start_reader();
        Ok(engine)
    }

    /// (Re)starts the background reader at the first streamed layer.
    fn start_reader(&mut self) {
        self.prefetch = None;
        if !self.streamed.is_empty() {
            self.prefetch = Some(Prefetcher::spawn(
                self.cfg.clone(),
                self.src.clone(),
                self.streamed.clone(),
                self.ledger.clone(),
                self.layer_bytes,
                self.device.clone(),
            ));
        }
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
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }
    /// Bytes read from the checkpoint so far.
    pub fn bytes_read(&self) -> u64 {
        self.src.io().bytes_read()
    }
    /// The checkpoint's files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.src.files()
    }

    /// A new, empty sequence. Its KV cache for the full context is allocated and charged now.
    pub fn new_sequence(&self) -> Result<Sequence> {
        let c = &self.cfg;
        let bytes = (2 * c.num_layers * c.num_kv_heads * c.head_dim * self.opts.context * 4) as u64;
        let charge = self.ledger.try_charge(bytes).ok_or_else(|| {
            Error::Invalid(format!(
                "no room in the budget for another sequence's KV cache (planned for {} sequences of {} tokens)",
                self.opts.max_batch, self.opts.context
            ))
        })?;
        let kv = (0..c.num_layers)
            .map(|_| LayerKv::new(c.num_kv_heads, self.opts.context, c.head_dim, &self.device))
            .collect::<Result<_>>()?;
        Ok(Sequence {
            kv,
            _charge: charge,
        })
    }

    /// One sweep over all layers for `batch`: each entry is a sequence and its new tokens.
    /// Returns each sequence's logits `[rows, vocab]`, rows per `which`.
    ///
    /// On error the reader is restarted and the sequences in the batch must be discarded, since
    /// some layers may have cached their tokens and others not.
    pub fn step(
        &mut self,
        batch: &mut [(&mut Sequence, &[u32])],
        which: LogitsFor,
    ) -> Result<Vec<Tensor>> {
        let r = self.sweep(batch, which);
        if r.is_err() {
            self.start_reader();
        }
        r
    }

    fn sweep(
        &mut self,
        batch: &mut [(&mut Sequence, &[u32])],
        which: LogitsFor,
    ) -> Result<Vec<Tensor>> {
        let t0 = Instant::now();
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
        let logit_rows = match which {
            LogitsFor::Last => batch.len(),
            LogitsFor::All => ids.len(),
            LogitsFor::None => 0,
        };
        if ids.len() > self.opts.max_step_tokens || logit_rows > self.opts.max_logit_rows {
            return Err(Error::Invalid(format!(
                "a step of {} tokens with {logit_rows} rows of logits exceeds what the plan reserved ({} tokens, {} rows)",
                ids.len(),
                self.opts.max_step_tokens,
                self.opts.max_logit_rows
            )));
        }
        let prefill = seqs.iter().any(|s| s.len > 1);
        let mut prof = std::mem::take(if prefill {
            &mut self.prefill_profile
        } else {
            &mut self.decode_profile
        });

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
                let window = self.cfg.layer_windows[layer];
                let (cos, sin) = &tables[self.cfg.layer_rope(layer)];
                let mut kv: Vec<&mut LayerKv> =
                    batch.iter_mut().map(|(s, _)| &mut s.kv[layer]).collect();
                let timing = &mut prof.layers[layer];
                if let Some(w) = &self.resident[layer] {
                    let t = Instant::now();
                    x = self
                        .block
                        .forward(w, &x, &seqs, &mut kv, cos, sin, window)?;
                    timing.compute += t.elapsed();
                } else {
                    let t = Instant::now();
                    let loaded = self
                        .prefetch
                        .as_ref()
                        .expect("streamed layers have a reader")
                        .next(layer)?;
                    timing.wait += t.elapsed();
                    timing.read += loaded.read_time;
                    timing.streamed = true;
                    let t = Instant::now();
                    x = self.block.forward(
                        &loaded.weights,
                        &x,
                        &seqs,
                        &mut kv,
                        cos,
                        sin,
                        window,
                    )?;
                    timing.compute += t.elapsed();
                    drop(loaded);
                }
            }
            // Only the rows whose logits are wanted go through the norm and the head.
            let h = match which {
                LogitsFor::None => return Ok(vec![]),
                LogitsFor::All => x.clone(),
                LogitsFor::Last => {
                    let rows: Vec<u32> = seqs.iter().map(|s| (s.row + s.len - 1) as u32).collect();
                    x.index_select(&Tensor::new(rows, &self.device)?, 0)?
                }
            };
            let h = crate::model::block::final_norm(&h, &self.final_norm, self.block.eps)?;
            let logits = self.head_forward(&h, &mut prof)?;
            let mut out = Vec::with_capacity(seqs.len());
            let mut row = 0;
            for s in &seqs {
                let n = if which == LogitsFor::All { s.len } else { 1 };
                out.push(logits.narrow(0, row, n)?);
                row += n;
            }
            Ok(out)
        })();
        prof.steps += 1;
        prof.wall += t0.elapsed();
        *(if prefill {
            &mut self.prefill_profile
        } else {
            &mut self.decode_profile
        }) = prof;
        result
    }

    /// The output head, whole when resident, else in vocabulary chunks read from disk.
    fn head_forward(&self, h: &Tensor, prof: &mut Profile) -> Result<Tensor> {
        let logits = if let Some(w) = &self.head {
            let t = Instant::now();
            let l = w.forward(h)?;
            prof.head_compute += t.elapsed();
            l
        } else {
            let vocab = self.cfg.vocab_size;
            let chunk = self.plan.head_chunk_rows;
            let mut parts = Vec::with_capacity(vocab.div_ceil(chunk));
            let mut start = 0;
            while start < vocab {
                let n = chunk.min(vocab - start);
                let t = Instant::now();
                let _charge = self.ledger.charge(
                    self.plan.head_chunk_bytes / self.plan.head_chunk_rows.max(1) as u64 * n as u64,
                );
                let w = self
                    .src
                    .load_row_range(&self.head_name, start, n, &self.device)?;
                prof.head_read += t.elapsed();
                let t = Instant::now();
                parts.push(w.forward(h)?);
                prof.head_compute += t.elapsed();
                start += n;
            }
            Tensor::cat(&parts, 1)?
        };
        Ok(match self.cfg.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}
