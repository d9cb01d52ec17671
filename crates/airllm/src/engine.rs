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

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::kernels::matmul::ROW_TILE;
use crate::model::block::validate_layers;
use crate::model::block::LayerKind;
use crate::model::block::Small;
use crate::model::kv::kv_slots;
use crate::model::{Block, LayerKv, Rope, SeqRows};
use crate::stream::experts::ExpertAccess;
use crate::stream::pool::Pool;
use crate::stream::reader::{ReadSpec, StreamedMats, Target};
use crate::stream::stage::{DevMat, Link, SimLink, Stager};
use crate::stream::{
    Charge, DeviceInput, DevicePlan, HeldLayer, Ledger, Plan, PlanInput, Prefetcher,
};
use crate::stream::{ExpertCache, ExpertStats};
use crate::weights::io::read_capacity;
use crate::weights::schema::{Kind, LayerSchema, Naming, Role};
use crate::weights::{GgufSource, SafetensorsSource, WeightSource};

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
    /// Bytes the caller holds outside the engine (its tokenizer), counted against the budget.
    pub reserved_bytes: u64,
    /// Where the model computes. On a GPU, weights stay in device memory as far as
    /// `device_memory` allows, and the rest is copied over for every token.
    pub device: Device,
    /// The device's budget in bytes: device-resident weights, KV cache, activations and
    /// staging slots. `None` takes 90% of a GPU's free memory. On the CPU, `Some` simulates a
    /// device tier with memory of its own (for tests of the tiers without a GPU).
    pub device_memory: Option<u64>,
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
            reserved_bytes: 0,
            device: Device::Cpu,
            device_memory: None,
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
        self.kv.first().map_or(0, |k| k.pos())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops cached tokens from `len` on, so a shared prefix can be reused. Returns the length
    /// kept, which is shorter when a sliding-window layer has already dropped keys the next
    /// token would need; the caller feeds the tokens from there again.
    pub fn truncate(&mut self, len: usize) -> usize {
        let keep = self
            .kv
            .iter_mut()
            .map(|k| k.truncate(len))
            .min()
            .unwrap_or(0);
        self.kv.iter_mut().for_each(|k| {
            k.truncate(keep);
        });
        keep
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

/// Where a layer or the head is held while generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Device,
    Host,
    Disk,
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
    head_tier: Tier,
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

/// Sizes of a model's parts, from the checkpoint's tensor table and the layer schema.
#[derive(Debug, Clone)]
pub struct ModelSizes {
    pub params: u64,
    pub file_bytes: u64,
    pub layer_file_bytes: u64,
    /// The largest layer's bytes as held (the file's form, or f16 for `--f16`).
    pub layer_bytes: u64,
    /// One layer's norms and biases (f32).
    pub small_bytes: u64,
    /// Bytes a read buffer needs per row of the widest streamed matrix (head included).
    pub max_row_bytes: u64,
    pub head_file_bytes: u64,
    pub head_bytes: u64,
    pub dtypes: Vec<&'static str>,
    /// The largest expert as held in a cache slot (its read buffers), and on disk.
    pub expert_bytes: u64,
    pub expert_file_bytes: u64,
    /// Experts over all sparse layers.
    pub experts_total: usize,
}

impl ModelSizes {
    pub fn of(cfg: &ModelConfig, src: &dyn WeightSource, head_name: &str) -> Result<Self> {
        let mut s = ModelSizes {
            params: 0,
            file_bytes: 0,
            layer_file_bytes: 0,
            layer_bytes: 0,
            small_bytes: 0,
            max_row_bytes: 0,
            head_file_bytes: 0,
            head_bytes: 0,
            dtypes: vec![],
            expert_bytes: 0,
            expert_file_bytes: 0,
            experts_total: 0,
        };
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
        // The largest buffer each expert matrix (gate, up, down) needs over the layers.
        let mut role_bytes: Vec<u64> = vec![];
        for layer in 0..cfg.num_layers {
            let schema = LayerSchema::new(cfg, layer);
            let (mut held, mut file, mut small) = (0, 0, 0);
            for t in schema.tensors.iter().filter(|t| t.kind != Kind::Expert) {
                let m = add(&t.name(naming, layer), &mut s)?;
                file += m.file_bytes;
                if t.is_small() {
                    small += m.compute_bytes;
                    held += m.compute_bytes;
                } else {
                    held += m.buffer_bytes();
                    s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
                }
            }
            // Quantized files may mix types across layers; plan for the largest layer.
            s.layer_bytes = s.layer_bytes.max(held);
            s.layer_file_bytes = s.layer_file_bytes.max(file);
            s.small_bytes = s.small_bytes.max(small);
            // Experts: each is read whole into a cache slot, one buffer per matrix; a slot's
            // buffer for a role serves every layer, so it grows to that role's largest.
            let (mut file, mut n) = (0, 0);
            for (i, t) in schema.experts().enumerate() {
                n = t.experts;
                // transformers has a tensor per expert; GGUF one stack of them all.
                let (names, stacked): (Vec<String>, u64) = match naming {
                    Naming::Gguf => (vec![t.name(naming, layer)], t.experts as u64),
                    Naming::Hf => (
                        (0..t.experts)
                            .map(|e| t.expert_name(naming, layer, e).0)
                            .collect(),
                        1,
                    ),
                };
                let mut per_file = 0u64;
                for name in &names {
                    let m = add(name, &mut s)?;
                    let bytes = m.buffer_row_bytes() * t.shape[0] as u64;
                    if role_bytes.len() <= i {
                        role_bytes.resize(i + 1, 0);
                    }
                    role_bytes[i] = role_bytes[i].max(read_capacity(bytes as usize) as u64);
                    per_file = per_file.max(m.file_bytes / stacked.max(1));
                    // Staged to a device, an expert goes through the slots in row tiles.
                    s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
                }
                file += per_file;
            }
            s.expert_bytes = role_bytes.iter().sum();
            s.expert_file_bytes = s.expert_file_bytes.max(file);
            s.experts_total += n;
        }
        add(naming.embed(), &mut s)?;
        add(naming.final_norm(), &mut s)?;
        if head_name != naming.embed() {
            add(head_name, &mut s)?;
        }
        if let Some(m) = src.meta(head_name) {
            s.head_file_bytes = m.file_bytes;
            s.head_bytes = m.buffer_bytes();
            s.max_row_bytes = s.max_row_bytes.max(m.buffer_row_bytes());
        }
        Ok(s)
    }
}

/// The widest activation row: hidden, or an MLP's (dense, expert or shared expert).
fn widest(cfg: &ModelConfig) -> usize {
    let moe = cfg.moe.as_ref();
    cfg.hidden_size
        .max(cfg.intermediate_size)
        .max(moe.map_or(0, |m| m.expert_size.max(m.shared_size.unwrap_or(0))))
}

/// Bytes of activations for the largest step the options allow, generously counted, and the
/// matmul's scratch (a widened tile of rows per thread).
fn work_bytes(cfg: &ModelConfig, o: &EngineOptions) -> u64 {
    let rows = o.max_step_tokens as u64;
    let qkv = ((2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) as u64;
    let mut per_row = 6 * cfg.hidden_size as u64 + 2 * qkv + 3 * cfg.intermediate_size as u64;
    if let Some(m) = &cfg.moe {
        // Each row's top-k experts: its gathered input, their activations and weighted
        // outputs, kept until they are summed in expert order; the router's probabilities;
        // the shared expert's activations.
        per_row += (m.top_k * (2 * cfg.hidden_size + 3 * m.expert_size)
            + 2 * m.experts
            + 3 * m.shared_size.unwrap_or(0)) as u64;
    }
    let per_seq_new = rows.min(o.context as u64);
    let scores = (4 * cfg.num_heads as u64 * per_seq_new * o.context as u64)
        .min(o.attention_scores_bytes / 4);
    let logits = 2 * o.max_logit_rows as u64 * cfg.vocab_size as u64;
    let widest = widest(cfg) as u64;
    // Compacting a sliding window copies its keys and values once.
    let window_copy = cfg
        .layer_windows
        .iter()
        .flatten()
        .map(|&w| (2 * w * cfg.num_kv_heads * cfg.head_dim) as u64)
        .max()
        .unwrap_or(0);
    // Only our CPU kernels widen tiles into scratch; a GPU's products do not.
    let scratch = if o.device.is_cpu() && rows > crate::kernels::matmul::GEMV_MAX_ROWS as u64 {
        rayon::current_num_threads() as u64 * ROW_TILE as u64 * widest
    } else {
        0
    };
    4 * (rows * per_row + scores + logits + scratch + window_copy)
}

/// KV-cache bytes of one sequence: full layers hold the context, sliding ones their window.
fn kv_bytes_per_seq(cfg: &ModelConfig, o: &EngineOptions) -> u64 {
    cfg.layer_windows
        .iter()
        .map(|&w| {
            (2 * cfg.num_kv_heads * cfg.head_dim * kv_slots(o.context, w, o.max_step_tokens) * 4)
                as u64
        })
        .sum()
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
            let mut cfg = ModelConfig::from_gguf(&g.file)?;
            // LongRoPE's factor sets are tensors in GGUF.
            if let RopeScaling::LongRope {
                short_factor,
                long_factor,
                ..
            } = &mut cfg.rope.scaling
            {
                let load = |n: &str| -> Result<Vec<f32>> {
                    Ok(g.load(n, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
                };
                *long_factor = load("rope_factors_long.weight")?;
                *short_factor = load("rope_factors_short.weight")?;
            }
            (cfg, Arc::new(g))
        } else {
            let cfg = ModelConfig::from_file(&path.join("config.json"))?;
            let mut st = SafetensorsSource::open(path)?;
            st.f16 = f16;
            st.keep_f32 = (0..cfg.num_layers)
                .filter_map(|l| {
                    LayerSchema::new(&cfg, l)
                        .get(Role::Router)
                        .map(|t| t.name(Naming::Hf, l))
                })
                .collect();
            (cfg, Arc::new(st))
        };
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &cfg.rope.scaling
        {
            let half = cfg.rotary_dim / 2;
            if short_factor.len() != half || long_factor.len() != half {
                let (file, field) = if crate::weights::is_gguf(path) {
                    (path.to_path_buf(), "rope_factors_short/long.weight")
                } else {
                    (
                        path.join("config.json"),
                        "rope_scaling.short_factor/long_factor",
                    )
                };
                return Err(Error::config(
                    &file,
                    field,
                    format!(
                        "{} short and {} long factors; the {half} rotated pairs need {half} each",
                        short_factor.len(),
                        long_factor.len()
                    ),
                ));
            }
        }
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
        let inp = self.plan_input(opts);
        let Some(dev_budget) = device_budget(opts)? else {
            return Plan::new(&inp, budget);
        };
        let c = &self.cfg;
        let dev = DevicePlan::new(
            &DeviceInput {
                num_layers: c.num_layers,
                layer_bytes: self.sizes.layer_bytes,
                head_bytes: self.sizes.head_bytes,
                min_slot_bytes: inp.min_slice_bytes,
                kv_bytes: inp.kv_bytes,
                // On a GPU, a half-precision product holds its input split in two, scaled,
                // and widened: up to four f32 copies of the widest activation.
                work_bytes: inp.work_bytes
                    + if opts.device.is_cpu() {
                        0
                    } else {
                        16 * opts.max_step_tokens as u64 * widest(c) as u64
                    },
                experts: self.sizes.experts_total > 0,
                extra_slots: usize::from(
                    !opts.device.is_cpu()
                        && self
                            .sizes
                            .dtypes
                            .iter()
                            .any(|d| !matches!(*d, "F32" | "F16" | "BF16")),
                ),
                // Streamed layers' norms and biases are kept on a GPU.
                fixed_bytes: inp.fixed_bytes
                    + if opts.device.is_cpu() {
                        0
                    } else {
                        c.num_layers as u64 * self.sizes.small_bytes
                    },
            },
            dev_budget,
        )?;
        // Experts stay in host memory (the expert cache) and are copied over when they run:
        // top-k per sparse layer for each token.
        let mut dev = dev;
        dev.bytes_moved_per_token += inp.experts_per_token as u64 * self.sizes.expert_file_bytes;
        // The host holds what the device does not, and only the embedding rows and logits
        // of the working set.
        let host_work = 4
            * (opts.max_step_tokens as u64 * c.hidden_size as u64
                + 2 * opts.max_logit_rows as u64 * c.vocab_size as u64);
        let host_inp = PlanInput {
            num_layers: c.num_layers - dev.resident_layers,
            head_bytes: if dev.head_resident { 0 } else { inp.head_bytes },
            head_file_bytes: if dev.head_resident {
                0
            } else {
                inp.head_file_bytes
            },
            kv_bytes: 0,
            work_bytes: host_work,
            fixed_bytes: 0,
            ..inp
        };
        let mut plan = Plan::new(&host_inp, budget)?;
        // A slice read from disk must fit a staging slot.
        if dev.stages() {
            plan.slice_bytes = plan.slice_bytes.min(dev.slot_bytes);
        }
        plan.device = Some(dev);
        Ok(plan)
    }

    fn plan_input(&self, opts: &EngineOptions) -> PlanInput {
        let c = &self.cfg;
        let half = c.head_dim / 2;
        PlanInput {
            num_layers: c.num_layers,
            layer_bytes: self.sizes.layer_bytes,
            layer_file_bytes: self.sizes.layer_file_bytes,
            small_bytes: self.sizes.small_bytes,
            head_bytes: self.sizes.head_bytes,
            head_file_bytes: self.sizes.head_file_bytes,
            min_slice_bytes: ROW_TILE as u64 * self.sizes.max_row_bytes,
            kv_bytes: kv_bytes_per_seq(c, opts) * opts.max_batch as u64,
            work_bytes: work_bytes(c, opts),
            // The final norm and two rope tables.
            fixed_bytes: (c.hidden_size * 4 + 4 * opts.max_step_tokens * half * 4) as u64,
            reserved_bytes: opts.reserved_bytes,
            expert_bytes: self.sizes.expert_bytes,
            expert_file_bytes: self.sizes.expert_file_bytes,
            experts_total: self.sizes.experts_total,
            experts_per_token: c
                .moe
                .as_ref()
                .map_or(0, |m| m.top_k * m.sparse.iter().filter(|&&s| s).count()),
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

/// The device budget, when computing on a device with memory of its own (or simulating one).
fn device_budget(opts: &EngineOptions) -> Result<Option<u64>> {
    if opts.device.is_cpu() {
        return Ok(opts.device_memory);
    }
    match opts.device_memory {
        Some(b) => Ok(Some(b)),
        None => device_free_memory(&opts.device).map(|f| Some(f / 10 * 9)),
    }
}

/// Free memory on a GPU.
#[cfg(feature = "cuda")]
fn device_free_memory(device: &Device) -> Result<u64> {
    crate::stream::cuda::free_memory(device)
}

#[cfg(not(feature = "cuda"))]
fn device_free_memory(_device: &Device) -> Result<u64> {
    Err(Error::Invalid(
        "this build has no GPU support; build with the `cuda` feature (scripts/build_cuda.sh)"
            .into(),
    ))
}

/// The link to the compute device: a GPU's, or the simulated one.
fn make_link(device: &Device, slots: usize, slot_bytes: u64) -> Result<Box<dyn Link>> {
    if device.is_cpu() {
        return Ok(Box::new(SimLink::new(slots, slot_bytes)));
    }
    #[cfg(feature = "cuda")]
    {
        Ok(Box::new(crate::stream::cuda::CudaLink::new(
            device, slots, slot_bytes,
        )?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        device_free_memory(device).map(|_| unreachable!("fails without the cuda feature"))
    }
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

/// The default budget: 90% of what the kernel says is available.
pub fn resolve_budget(max_memory: Option<u64>) -> Result<u64> {
    match max_memory {
        Some(b) => Ok(b),
        None => crate::util::available_memory()
            .map(|a| a / 10 * 9)
            .ok_or_else(|| {
                Error::Invalid(
                    "cannot read available memory; set a memory budget (max_memory)".into(),
                )
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
            sizes: _,
        } = info;
        let device = opts.device.clone();
        let ledger = Ledger::new(plan.budget);
        let dplan = plan.device.clone();
        let device_ledger = dplan.as_ref().map(|d| Ledger::new(d.budget));
        // The link comes first: on a GPU it pins every large host buffer allocated after it.
        let stager = match &dplan {
            Some(d) if d.stages() => Some(Stager::new(
                make_link(&device, d.slots, d.slot_bytes)?,
                d.slot_bytes,
            )),
            _ => None,
        };
        let device_layers = dplan.as_ref().map_or(0, |d| d.resident_layers);
        let head_tier = match &dplan {
            Some(d) if d.head_resident => Tier::Device,
            _ if plan.head_resident => Tier::Host,
            _ => Tier::Disk,
        };
        if !device.is_cpu() && dplan.is_none() {
            return Err(Error::Invalid(
                "internal error: a GPU engine without a device plan".into(),
            ));
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
        // Matrices of the host tier stay on the CPU when a device computes.
        let host = Device::Cpu;
        // A GPU's resident matrices are read in chunks through one buffer: the room of the
        // read buffers, which are not allocated yet.
        let chunk = if plan.slice_bytes > 0 {
            plan.slice_bytes
        } else {
            32 << 20
        };
        let mut scratch = crate::weights::mat::AlignedBuf::default();
        let naming = src.naming();
        let norm_offset = cfg.block.norm_offset;
        let mut final_norm = src.load(naming.final_norm(), &device)?;
        if norm_offset != 0.0 {
            final_norm = (final_norm + norm_offset as f64)?;
        }
        let head = match head_tier {
            Tier::Device => {
                let (d, dl) = (dplan.as_ref(), device_ledger.as_ref());
                if let (Some(d), Some(dl)) = (d, dl) {
                    held.push(dl.charge(d.head_bytes));
                }
                Some(DevMat::load(
                    src.as_ref(),
                    &head_name,
                    &device,
                    chunk,
                    &mut scratch,
                )?)
            }
            Tier::Host => {
                held.push(ledger.charge(plan.head_bytes));
                let on = if stager.is_some() { &host } else { &device };
                Some(DevMat::load(
                    src.as_ref(),
                    &head_name,
                    on,
                    chunk,
                    &mut scratch,
                )?)
            }
            Tier::Disk => None,
        };
        // llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors.
        let factors = match src.meta("rope_freqs.weight") {
            Some(_) => Some(src.load("rope_freqs.weight", &device)?.to_vec1::<f32>()?),
            None => None,
        };
        let dim = cfg.rotary_dim;
        let mut ropes = vec![Rope::new(&cfg.rope, dim, factors.as_deref(), opts.context)];
        if let Some(local) = &cfg.rope_local {
            ropes.push(Rope::new(local, dim, None, opts.context));
        }
        let schemas = LayerSchema::all(&cfg);
        let mut resident = Vec::with_capacity(cfg.num_layers);
        let mut device_small = Vec::with_capacity(cfg.num_layers);
        let held_layers = device_layers + plan.resident_layers;
        for (i, schema) in schemas.iter().enumerate() {
            let on_device = i < device_layers;
            device_small.push(if i >= held_layers && !device.is_cpu() {
                Some(Small::load(schema, src.as_ref(), i, norm_offset, &device)?)
            } else {
                None
            });
            if i < held_layers {
                held.push(match (&device_ledger, on_device) {
                    (Some(dl), true) => dl.charge(plan.layer_bytes),
                    _ => ledger.charge(plan.layer_bytes),
                });
                let mat_device = if on_device || stager.is_none() {
                    &device
                } else {
                    &host
                };
                let l = HeldLayer::load(
                    schema,
                    src.as_ref(),
                    i,
                    norm_offset,
                    &device,
                    mat_device,
                    chunk,
                    &mut scratch,
                )?;
                // The plan reserves the largest layer; a layer larger than that would make
                // the ledger fiction.
                if l.bytes() > plan.layer_bytes {
                    return Err(Error::Reader(format!(
                        "layer {i} holds {} bytes but the plan reserved {}",
                        l.bytes(),
                        plan.layer_bytes
                    )));
                }
                resident.push(Some(l));
            } else {
                resident.push(None);
            }
        }
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
        let charge = self
            .device_ledger
            .as_ref()
            .unwrap_or(&self.ledger)
            .try_charge(kv_bytes_per_seq(c, o))
            .ok_or_else(|| {
                Error::Invalid(format!(
                "no room in the budget for another sequence's KV cache of {} (planned for {} sequences of {} tokens; {} of {} held)",
                crate::util::fmt_bytes(kv_bytes_per_seq(c, o)),
                o.max_batch, o.context,
                crate::util::fmt_bytes(self.ledger.held()),
                crate::util::fmt_bytes(self.ledger.budget())
            ))
            })?;
        let kv = c
            .layer_windows
            .iter()
            .map(|&w| {
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
            return Err(Error::Invalid(
                "internal error: rows of logits asked for that the step does not carry".into(),
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
        prof.experts.hits += e.hits;
        prof.experts.misses += e.misses;
        prof.experts.bytes_read += e.bytes_read;
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
                (DevMat::Host(m), Some(st), Tier::Host) => st.matmul_held(m.view(), h)?,
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
