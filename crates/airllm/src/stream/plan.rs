//! The memory plan: from the budget and the model's sizes, the slice size and number of read
//! buffers for streaming, how many layers stay resident, and whether the output head does.
//!
//! The unit of streaming is a slice of one matrix (whole gemm tiles of rows), so the minimum
//! budget is two slice buffers plus the KV cache and working set, whatever the size of a layer.
//!
//! With a compute device (a GPU) there are three tiers: [`DevicePlan`] keeps the first layers
//! (then the head) in device memory as far as its budget allows, after the KV cache, the
//! activations and the staging slots that the rest passes through. The host [`Plan`] then covers
//! the layers left: held in (pinned) host memory as far as the host budget allows, the rest read
//! from disk for every token.

use std::fmt;

use candle_core::Device;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::matmul::ROW_TILE;
use crate::model::kv::kv_slots;
use crate::util::fmt_bytes;
use crate::weights::io::read_capacity;
use crate::weights::model::ModelInfo;

/// Sizes the plan is made from. All "bytes" are in held form unless named `file`.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub num_layers: usize,
    /// The largest layer.
    pub layer_bytes: u64,
    pub layer_file_bytes: u64,
    /// One layer's norms and biases (they travel with the slices).
    pub small_bytes: u64,
    pub head_bytes: u64,
    pub head_file_bytes: u64,
    /// Bytes a read buffer needs for one whole gemm tile of rows of the widest matrix.
    pub min_slice_bytes: u64,
    /// KV caches of all sequences at full context.
    pub kv_bytes: u64,
    /// Activations, logits and matmul scratch for the largest step.
    pub work_bytes: u64,
    /// Always-resident small tensors (final norm, rope tables).
    pub fixed_bytes: u64,
    /// Memory the caller holds outside the engine (the tokenizer), counted against the budget.
    pub reserved_bytes: u64,
    /// Mixture of experts: one expert as held in a cache slot, and on disk; experts over all
    /// sparse layers; experts a token uses over all sparse layers (top-k per layer).
    pub expert_bytes: u64,
    pub expert_file_bytes: u64,
    pub experts_total: usize,
    pub experts_per_token: usize,
    /// Copies of the sparse layers' routers for expert look-ahead (0 when it is not wanted).
    pub router_bytes: u64,
}

/// Expert-cache slots at the least: one expert computing while the next is read.
pub const MIN_EXPERT_SLOTS: usize = 2;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub budget: u64,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    pub head_resident: bool,
    /// Most bytes one slice of a streamed matrix holds.
    pub slice_bytes: u64,
    /// Read buffers: those being filled by the reader's lanes, one being multiplied, the rest
    /// read ahead.
    pub buffers: usize,
    pub layer_bytes: u64,
    pub head_bytes: u64,
    /// Read buffers and the small tensors in flight.
    pub inflight_bytes: u64,
    pub kv_bytes: u64,
    pub work_bytes: u64,
    pub fixed_bytes: u64,
    pub reserved_bytes: u64,
    /// The smallest budget that can run this model at this batch and context.
    pub minimum: u64,
    pub bytes_read_per_token: u64,
    /// Slots of the expert cache (all the experts when the model fits), each `expert_bytes`.
    pub expert_slots: usize,
    pub expert_bytes: u64,
    pub experts_total: usize,
    /// Expert bytes read per token at batch 1 with a cold cache (every used expert read).
    pub expert_read_per_token: u64,
    /// Bytes of the routers' copies that expert look-ahead guesses with; 0 when it is off
    /// (not wanted, nothing to guess for, or no room once the working slots are in).
    pub lookahead_bytes: u64,
    /// The device tier, when computing on a device with memory of its own.
    pub device: Option<DevicePlan>,
}

/// Sizes the device plan is made from, in the form held on the device.
#[derive(Debug, Clone)]
pub struct DeviceInput {
    pub num_layers: usize,
    pub layer_bytes: u64,
    pub head_bytes: u64,
    /// The smallest staging slot: one slice of the widest matrix, as the host side sends it.
    pub min_slot_bytes: u64,
    pub kv_bytes: u64,
    pub work_bytes: u64,
    pub fixed_bytes: u64,
    /// Transient slot-sized allocations beside the slots (a GPU's quantized slices get a
    /// device copy of their own).
    pub extra_slots: usize,
    /// The model has experts, which stay in the host's expert cache and pass through the
    /// staging slots, so there are slots even when everything else fits.
    pub experts: bool,
}

/// The device tier: what stays in device memory, and the slots the other tiers' slices are
/// copied into while the previous slice is computed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DevicePlan {
    pub budget: u64,
    pub resident_layers: usize,
    pub head_resident: bool,
    pub slot_bytes: u64,
    pub slots: usize,
    pub layer_bytes: u64,
    pub head_bytes: u64,
    pub kv_bytes: u64,
    pub work_bytes: u64,
    pub fixed_bytes: u64,
    pub extra_slots: usize,
    pub minimum: u64,
    /// Weight bytes copied host→device for each token.
    pub bytes_moved_per_token: u64,
}

/// Staging slots: two for double buffering, two more so a slow copy or compute is absorbed.
pub const SLOTS: usize = 4;
/// Copies of this size run at the link's full speed; larger only delays the first compute.
const SLOT_TARGET: u64 = 64 << 20;

impl DevicePlan {
    pub fn new(inp: &DeviceInput, budget: u64) -> Result<DevicePlan> {
        let base = inp.kv_bytes + inp.work_bytes + inp.fixed_bytes;
        let min_slot = inp.min_slot_bytes.max(1);
        let staged_experts = if inp.experts {
            (2 + inp.extra_slots) as u64 * min_slot
        } else {
            0
        };
        let all = inp.num_layers as u64 * inp.layer_bytes + inp.head_bytes + base + staged_experts;
        let minimum = (base + (2 + inp.extra_slots) as u64 * min_slot).min(all);
        let mut plan = DevicePlan {
            budget,
            resident_layers: inp.num_layers,
            head_resident: true,
            slot_bytes: 0,
            slots: 0,
            layer_bytes: inp.layer_bytes,
            head_bytes: inp.head_bytes,
            kv_bytes: inp.kv_bytes,
            work_bytes: inp.work_bytes,
            fixed_bytes: inp.fixed_bytes,
            extra_slots: inp.extra_slots,
            minimum,
            bytes_moved_per_token: 0,
        };
        if all <= budget && !inp.experts {
            return Ok(plan);
        }
        if budget < minimum {
            return Err(Error::BudgetTooSmall {
                budget,
                minimum,
                device: true,
                detail: format!(
                    "2 staging slots {} + KV cache {} + working set {}",
                    fmt_bytes(2 * min_slot),
                    fmt_bytes(inp.kv_bytes),
                    fmt_bytes(inp.work_bytes + inp.fixed_bytes)
                ),
            });
        }
        let spare = budget - base;
        let mut slots = SLOTS;
        let mut slot = (spare / 16).clamp(min_slot, min_slot.max(SLOT_TARGET));
        while (slots + inp.extra_slots) as u64 * slot > spare {
            if slots > 2 {
                slots -= 1;
            } else {
                slot = min_slot;
            }
        }
        let mut left = spare - (slots + inp.extra_slots) as u64 * slot;
        let resident = ((left / inp.layer_bytes.max(1)) as usize).min(inp.num_layers);
        left -= resident as u64 * inp.layer_bytes;
        plan.resident_layers = resident;
        plan.head_resident = left >= inp.head_bytes;
        plan.slot_bytes = slot;
        plan.slots = slots;
        plan.bytes_moved_per_token = (inp.num_layers - resident) as u64 * inp.layer_bytes
            + if plan.head_resident {
                0
            } else {
                inp.head_bytes
            };
        Ok(plan)
    }

    /// Whether anything is copied to the device while generating.
    pub fn stages(&self) -> bool {
        self.slots > 0
    }

    /// Bytes the device plan holds at most.
    pub fn total_bytes(&self) -> u64 {
        self.resident_layers as u64 * self.layer_bytes
            + if self.head_resident {
                self.head_bytes
            } else {
                0
            }
            + (self.slots + if self.slots > 0 { self.extra_slots } else { 0 }) as u64
                * self.slot_bytes
            + self.kv_bytes
            + self.work_bytes
            + self.fixed_bytes
    }
}

/// Read-ahead is worth having up to about this many bytes in flight; beyond, budget is better
/// spent keeping layers resident.
const STREAM_TARGET: u64 = 256 << 20;
/// Slices larger than this gain nothing (requests are 4 MiB each anyway) and lengthen the
/// pipeline's start.
const SLICE_TARGET: u64 = 32 << 20;

impl Plan {
    pub fn new(inp: &PlanInput, budget: u64) -> Result<Plan> {
        let base = inp.kv_bytes + inp.work_bytes + inp.fixed_bytes + inp.reserved_bytes;
        let all_experts = inp.experts_total as u64 * inp.expert_bytes;
        let min_experts = MIN_EXPERT_SLOTS.min(inp.experts_total) as u64 * inp.expert_bytes;
        let all_resident =
            inp.num_layers as u64 * inp.layer_bytes + inp.head_bytes + base + all_experts;
        // Each buffer's read may bring a layer's norms and biases along; two more sets are held
        // by compute and by a lane between buffers.
        let buf = |slice: u64| read_capacity(slice as usize) as u64 + inp.small_bytes;
        let min_slice = inp.min_slice_bytes.max(1);
        let min_stream = 2 * buf(min_slice) + 2 * inp.small_bytes;
        let minimum = (base + min_stream + min_experts).min(all_resident);
        let mut plan = Plan {
            budget,
            resident_layers: inp.num_layers,
            streamed_layers: 0,
            head_resident: true,
            slice_bytes: 0,
            buffers: 0,
            layer_bytes: inp.layer_bytes,
            head_bytes: inp.head_bytes,
            inflight_bytes: 0,
            kv_bytes: inp.kv_bytes,
            work_bytes: inp.work_bytes,
            fixed_bytes: inp.fixed_bytes,
            reserved_bytes: inp.reserved_bytes,
            minimum,
            bytes_read_per_token: 0,
            expert_slots: inp.experts_total,
            expert_bytes: inp.expert_bytes,
            experts_total: inp.experts_total,
            expert_read_per_token: 0,
            lookahead_bytes: 0,
            device: None,
        };
        if all_resident <= budget {
            return Ok(plan);
        }
        if budget < minimum {
            return Err(Error::BudgetTooSmall {
                budget,
                minimum,
                device: false,
                detail: format!(
                    "2 slice buffers {}{} + KV cache {} + working set {}{}",
                    fmt_bytes(min_stream),
                    if min_experts > 0 {
                        format!(
                            " + {MIN_EXPERT_SLOTS} expert slots {}",
                            fmt_bytes(min_experts)
                        )
                    } else {
                        String::new()
                    },
                    fmt_bytes(inp.kv_bytes),
                    fmt_bytes(inp.work_bytes + inp.fixed_bytes),
                    if inp.reserved_bytes > 0 {
                        format!(
                            " + tokenizer (and any draft model) {}",
                            fmt_bytes(inp.reserved_bytes)
                        )
                    } else {
                        String::new()
                    }
                ),
            });
        }
        // A quarter of what is spare goes to read buffers, up to STREAM_TARGET; slices are
        // about a quarter of that, so several are read ahead.
        // The expert cache's two working slots come off the top; what is left after layers and
        // head grows the cache.
        let spare = budget - base - min_experts;
        let stream = (spare / 4).clamp(min_stream, min_stream.max(STREAM_TARGET));
        let mut slice = (stream / 4).clamp(min_slice, min_slice.max(SLICE_TARGET));
        if 2 * buf(slice) + 2 * inp.small_bytes > stream {
            slice = min_slice;
        }
        let buffers = (((stream - 2 * inp.small_bytes) / buf(slice)) as usize).max(2);
        let inflight = buffers as u64 * buf(slice) + 2 * inp.small_bytes;
        // Then layers, from the first: each resident byte saves one byte read per token, and
        // the first layers are the ones prefetch cannot hide at the start of a sweep.
        let mut left = spare.saturating_sub(inflight);
        let resident = ((left / inp.layer_bytes.max(1)) as usize).min(inp.num_layers);
        left -= resident as u64 * inp.layer_bytes;
        let head_resident = left >= inp.head_bytes;
        if head_resident {
            left -= inp.head_bytes;
        }
        // Look-ahead's routers come before more slots: they are small beside an expert, and
        // they hide the router's wait on every miss. When every expert fits there is nothing
        // to guess.
        let fits_all = |left: u64| {
            MIN_EXPERT_SLOTS as u64 + left / inp.expert_bytes.max(1) >= inp.experts_total as u64
        };
        if inp.experts_total > 0
            && inp.router_bytes > 0
            && left >= inp.router_bytes
            && !fits_all(left)
        {
            plan.lookahead_bytes = inp.router_bytes;
            left -= inp.router_bytes;
        }
        // Dense parts and the head first: each of their bytes is read every token, an
        // expert's only when routing picks it.
        let expert_slots = if inp.experts_total == 0 {
            0
        } else {
            (MIN_EXPERT_SLOTS + (left / inp.expert_bytes.max(1)) as usize).min(inp.experts_total)
        };
        plan.expert_slots = expert_slots;
        plan.expert_read_per_token = if expert_slots == inp.experts_total {
            0
        } else {
            inp.experts_per_token as u64 * inp.expert_file_bytes
        };
        // What no layer, head or expert can use deepens the read-ahead: while a batch computes
        // the resident layers, the reader keeps filling buffers instead of waiting for one.
        let (mut buffers, mut inflight) = (buffers, inflight);
        if inp.experts_total == 0 {
            let more = (left / buf(slice)) as usize;
            buffers += more;
            inflight += more as u64 * buf(slice);
        }
        plan.resident_layers = resident;
        plan.streamed_layers = inp.num_layers - resident;
        plan.head_resident = head_resident;
        plan.slice_bytes = slice;
        plan.buffers = buffers;
        plan.inflight_bytes = inflight;
        plan.bytes_read_per_token = plan.streamed_layers as u64 * inp.layer_file_bytes
            + if head_resident {
                0
            } else {
                inp.head_file_bytes
            }
            + plan.expert_read_per_token;
        Ok(plan)
    }

    /// Bytes the plan holds at most.
    pub fn total_bytes(&self) -> u64 {
        self.resident_layers as u64 * self.layer_bytes
            + self.expert_slots as u64 * self.expert_bytes
            + self.lookahead_bytes
            + self.inflight_bytes
            + self.kv_bytes
            + self.work_bytes
            + self.fixed_bytes
            + self.reserved_bytes
            + if self.head_resident {
                self.head_bytes
            } else {
                0
            }
    }

    /// Whether anything is read from disk while generating (besides experts, which the
    /// expert cache reads).
    pub fn streams(&self) -> bool {
        self.streamed_layers > 0 || !self.head_resident
    }

    /// The expert cache's line of the plan, when the model has experts.
    fn fmt_experts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.experts_total == 0 {
            return Ok(());
        }
        writeln!(
            f,
            "  experts: {} of {} cached ({} each, {}), up to {} read per token (cold cache), {} warm with uniform routing",
            self.expert_slots,
            self.experts_total,
            fmt_bytes(self.expert_bytes),
            fmt_bytes(self.expert_slots as u64 * self.expert_bytes),
            fmt_bytes(self.expert_read_per_token),
            fmt_bytes(self.expert_read_warm())
        )?;
        if self.expert_slots < self.experts_total {
            match self.lookahead_bytes {
                0 => writeln!(f, "  expert look-ahead: off")?,
                b => writeln!(
                    f,
                    "  expert look-ahead: where it pays (routers' copies {})",
                    fmt_bytes(b)
                )?,
            }
        }
        Ok(())
    }

    /// Expert bytes read per token at batch 1 once the cache is warm, if every expert is
    /// equally likely: each use misses with the share of experts not cached. (Real routing
    /// is skewed, so a frequency-aware cache does better than this.)
    pub fn expert_read_warm(&self) -> u64 {
        let total = self.experts_total.max(1) as f64;
        let miss = 1.0 - (self.expert_slots as f64 / total).min(1.0);
        (self.expert_read_per_token as f64 * miss) as u64
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.device {
            return self.fmt_tiers(d, f);
        }
        writeln!(
            f,
            "plan: budget {}, minimum {}",
            fmt_bytes(self.budget),
            fmt_bytes(self.minimum)
        )?;
        writeln!(
            f,
            "  layers: {} resident, {} streamed ({} each, held in the file's form)",
            self.resident_layers,
            self.streamed_layers,
            fmt_bytes(self.layer_bytes)
        )?;
        self.fmt_experts(f)?;
        writeln!(
            f,
            "  output head: {} ({})",
            if self.head_resident {
                "resident"
            } else {
                "streamed"
            },
            fmt_bytes(self.head_bytes)
        )?;
        if self.streams() {
            writeln!(
                f,
                "  streaming: slices of up to {}, {} read buffers ({} read ahead), {} in flight",
                fmt_bytes(self.slice_bytes),
                self.buffers,
                self.buffers - 1,
                fmt_bytes(self.inflight_bytes)
            )?;
        }
        writeln!(
            f,
            "  KV cache {}, working set {}{}",
            fmt_bytes(self.kv_bytes),
            fmt_bytes(self.work_bytes + self.fixed_bytes),
            if self.reserved_bytes > 0 {
                format!(", tokenizer {}", fmt_bytes(self.reserved_bytes))
            } else {
                String::new()
            }
        )?;
        write!(
            f,
            "  bytes read per token: {}",
            fmt_bytes(self.bytes_read_per_token)
        )
    }
}

impl Plan {
    /// The three-tier plan: device, host, disk.
    fn fmt_tiers(&self, d: &DevicePlan, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan: device budget {} (minimum {}), host budget {} (minimum {})",
            fmt_bytes(d.budget),
            fmt_bytes(d.minimum),
            fmt_bytes(self.budget),
            fmt_bytes(self.minimum)
        )?;
        writeln!(
            f,
            "  layers: {} on the device, {} in host memory, {} read from disk ({} each)",
            d.resident_layers,
            self.resident_layers,
            self.streamed_layers,
            fmt_bytes(d.layer_bytes)
        )?;
        let head = if d.head_resident {
            "on the device"
        } else if self.head_resident {
            "in host memory"
        } else {
            "read from disk"
        };
        writeln!(f, "  output head: {head} ({})", fmt_bytes(d.head_bytes))?;
        self.fmt_experts(f)?;
        writeln!(
            f,
            "  device: KV cache {}, working set {}, {} staging slots of {}",
            fmt_bytes(d.kv_bytes),
            fmt_bytes(d.work_bytes + d.fixed_bytes),
            d.slots,
            fmt_bytes(d.slot_bytes)
        )?;
        if self.streams() {
            writeln!(
                f,
                "  host: slices of up to {}, {} read buffers, {} in flight",
                fmt_bytes(self.slice_bytes),
                self.buffers,
                fmt_bytes(self.inflight_bytes)
            )?;
        }
        write!(
            f,
            "  per token: disk→host {}, host→device {}",
            fmt_bytes(self.bytes_read_per_token),
            fmt_bytes(d.bytes_moved_per_token)
        )
    }
}

// ---- Composition: a model's plan for the options an engine is opened with. ----

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
    /// Guess the next sparse layer's experts while a layer computes and read them early, for
    /// the layers where the guesses pay. It changes when experts are read, never the tokens.
    pub expert_lookahead: bool,
    /// Write each sparse layer's choice of experts to this file, one JSON line each.
    pub expert_trace: Option<std::path::PathBuf>,
    /// The most guessed tokens one step may carry and then take back (speculative
    /// verification): a linear layer keeps its state before such a step and the step's
    /// inputs, so that it can replay the kept tokens rather than start over.
    pub rollback_rows: usize,
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
            expert_lookahead: true,
            expert_trace: None,
            rollback_rows: 0,
        }
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
    // Latent attention has no expanded keys and values; its copies are counted below.
    let qkv = if cfg.mla.is_some() {
        0
    } else {
        ((2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) as u64
    };
    let mut per_row = 6 * cfg.hidden_size as u64 + 2 * qkv + 3 * cfg.intermediate_size as u64;
    // Latent attention's copies per row: the queries and their parts (the no-RoPE part as
    // f32 values, the RoPE part rotated), the bottleneck and its norm, the latent and its
    // RoPE key, and the output after W_UV. The latent-space work runs a chunk of query rows
    // at a time: its copies, and kv_b_proj gathered (counted as f32, its widest form), are
    // fixed.
    let mut mla_fixed = 0;
    if let Some(m) = &cfg.mla {
        let nh = cfg.num_heads;
        let qd = m.qk_nope_head_dim + m.qk_rope_head_dim;
        let (rank, rope) = (m.kv_lora_rank, m.qk_rope_head_dim);
        per_row += (2 * nh * qd
            + nh * rope
            + 2 * m.q_lora_rank.unwrap_or(0)
            + 3 * m.cache_dim()
            + nh * m.v_head_dim) as u64;
        // A chunk is never more rows than a sweep has.
        let chunk = crate::model::mla::mla_chunk_rows(o.attention_scores_bytes, nh, rank, rope)
            .min(o.max_step_tokens.max(1));
        mla_fixed = (nh * (m.qk_nope_head_dim + m.v_head_dim) * rank
            + chunk * (m.qk_nope_head_dim + 6 * nh * (rank + rope))
            + 64 * rank) as u64;
    }
    if let Some(m) = &cfg.moe {
        // Each row's top-k experts: its gathered input, their activations and weighted
        // outputs, kept until they are summed in expert order; the router's probabilities;
        // the shared expert's activations.
        per_row += (m.top_k * (2 * cfg.hidden_size + 3 * m.expert_size)
            + 2 * m.experts
            + 3 * m.shared_size.unwrap_or(0)) as u64;
    }
    let threads = rayon::current_num_threads() as u64;
    let mut linear_fixed = 0;
    if let Some(l) = &cfg.linear {
        let (row, fixed) = linear_work(l, threads);
        // A linear layer's copies replace attention's, which run in other layers.
        per_row += row.saturating_sub(2 * qkv);
        linear_fixed = fixed;
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
        .map(|&w| (w * cfg.kv_values_per_token()) as u64)
        .max()
        .unwrap_or(0);
    // Only our CPU kernels widen tiles into scratch; a GPU's products do not.
    let scratch = if o.device.is_cpu() && rows > crate::kernels::matmul::GEMV_MAX_ROWS as u64 {
        threads * ROW_TILE as u64 * widest
    } else {
        0
    };
    4 * (rows * per_row + scores + logits + scratch + window_copy + mla_fixed + linear_fixed)
}

/// Gated DeltaNet's values per row at the layer's peak, and its fixed per-thread buffers,
/// counted in f32 values (an f64 counts as two). The peak is the largest of three phases:
/// unfusing (the fused products beside their split copies), the convolution (its input with
/// the window, and its output), and the delta rule (each head's gathered rows, widened to f64
/// in the chunked form, with every head's output). The fixed part is the chunked form's
/// per-chunk matrices and its f64 copy of the state, one set per thread.
fn linear_work(l: &crate::config::LinearSpec, threads: u64) -> (u64, u64) {
    let shape = linear_shape(l);
    let (c, nv, dk, dv) = (
        shape.channels() as u64,
        l.value_heads as u64,
        l.key_dim as u64,
        l.value_dim as u64,
    );
    let zw = nv * dv;
    // q|k|v, z, b and a, then β and the decay.
    let split = c + zw + 4 * nv;
    let unfuse = if l.fused { 2 * (c + zw + 2 * nv) } else { 0 };
    let convolve = split + zw + 2 * c;
    let head = 3 * (2 * dk + dv + 1) + 3 * dv;
    let rule = split + 2 * zw + c + threads * head;
    let chunk = crate::kernels::delta::CHUNK as u64;
    let fixed = threads * 2 * (2 * chunk * chunk + 2 * chunk * dv + 4 * chunk * dk + dk * dv);
    (unfuse.max(convolve).max(rule), fixed)
}

/// KV-cache bytes of one sequence: full layers hold the context, sliding ones their window,
/// linear ones their fixed recurrent state ([`state_bytes_per_seq`]).
pub fn kv_bytes_per_seq(cfg: &ModelConfig, o: &EngineOptions) -> u64 {
    let kv: u64 = cfg
        .layer_windows
        .iter()
        .enumerate()
        .filter(|&(l, _)| !cfg.is_linear(l))
        .map(|(_, &w)| {
            (cfg.kv_values_per_token() * kv_slots(o.context, w, o.max_step_tokens) * 4) as u64
        })
        .sum();
    kv + state_bytes_per_seq(cfg, o)
}

/// The recurrent states' bytes of one sequence over the linear layers (with what a step
/// needs to be taken back, when speculation may take one back).
pub fn state_bytes_per_seq(cfg: &ModelConfig, o: &EngineOptions) -> u64 {
    match &cfg.linear {
        Some(l) => {
            let per = crate::kernels::delta::State::max_bytes(&linear_shape(l), o.rollback_rows);
            per * l.layers.iter().filter(|&&x| x).count() as u64
        }
        None => 0,
    }
}

/// The kernel's shape of a model's linear layers.
pub fn linear_shape(l: &crate::config::LinearSpec) -> crate::kernels::delta::Shape {
    crate::kernels::delta::Shape {
        key_heads: l.key_heads,
        value_heads: l.value_heads,
        key_dim: l.key_dim,
        value_dim: l.value_dim,
        kernel: l.conv_kernel,
    }
}

impl ModelInfo {
    /// The plan a budget would give, without loading anything.
    pub fn plan(&self, opts: &EngineOptions) -> Result<Plan> {
        validate_options(opts)?;
        let budget = resolve_budget(opts.max_memory)?;
        let inp = self.plan_input(opts);
        let Some(dev_budget) = device_budget(opts)? else {
            let mut plan = Plan::new(&inp, budget)?;
            self.count_streamed_layers(&mut plan, 0);
            return Ok(plan);
        };
        let c = &self.cfg;
        // The recurrent states live in host memory (their recurrence runs on the CPU); the
        // KV caches of attention layers on the device.
        let states = state_bytes_per_seq(c, opts) * opts.max_batch as u64;
        let dev = DevicePlan::new(
            &DeviceInput {
                num_layers: c.num_layers,
                layer_bytes: self.sizes.layer_bytes,
                head_bytes: self.sizes.head_bytes,
                min_slot_bytes: inp.min_slice_bytes,
                kv_bytes: inp.kv_bytes - states,
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
            kv_bytes: states,
            work_bytes: host_work,
            fixed_bytes: 0,
            ..inp
        };
        let mut plan = Plan::new(&host_inp, budget)?;
        // A slice read from disk must fit a staging slot.
        if dev.stages() {
            plan.slice_bytes = plan.slice_bytes.min(dev.slot_bytes);
        }
        self.count_streamed_layers(&mut plan, dev.resident_layers);
        plan.device = Some(dev);
        Ok(plan)
    }

    /// Planned bytes per token with each streamed layer at its own size: the plan sizes its
    /// buffers for the largest layer, but a model whose layers differ (DeepSeek's dense first
    /// layers) reads less. The streamed layers are the last ones, after `device_layers` on a
    /// device and the plan's resident ones.
    fn count_streamed_layers(&self, plan: &mut Plan, device_layers: usize) {
        let from = device_layers + plan.resident_layers;
        let files = &self.sizes.layer_files;
        if files.len() != self.cfg.num_layers || from > files.len() {
            return;
        }
        let largest = plan.streamed_layers as u64 * self.sizes.layer_file_bytes;
        let each: u64 = files[from..].iter().sum();
        plan.bytes_read_per_token =
            plan.bytes_read_per_token - largest.min(plan.bytes_read_per_token) + each;
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
            router_bytes: if opts.expert_lookahead {
                self.sizes.router_bytes
            } else {
                0
            },
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
    match opts.device_memory {
        Some(b) => Ok(Some(b)),
        // The CPU has no memory of its own to measure: no device tier unless one is asked for.
        None => crate::device::of(&opts.device)
            .free_memory(&opts.device)
            .map(|f| f.map(|f| f / 10 * 9)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3-Next's linear layer (16 key heads, 32 value heads, 128 × 128) peaks in its
    /// convolution: q|k|v (8192), z (4096), b, a, β and the decay (4 × 32), the head
    /// outputs (4096), and the convolution's input and output (2 × 8192); its fixed part is
    /// the chunked form's f64 matrices. Attention's 2 × 9216 per row are not enough for it.
    #[test]
    fn the_working_set_counts_a_linear_layers_copies() {
        let cfg = crate::synth::preset("qwen3-next-80b-a3b")
            .unwrap()
            .model_config_for(crate::weights::safetensors::DType::BF16)
            .unwrap();
        let l = cfg.linear.as_ref().unwrap();
        let (row, fixed) = linear_work(l, 1);
        assert_eq!(row, 12416 + 4096 + 2 * 8192);
        assert_eq!(
            fixed,
            2 * (2 * 64 * 64 + 2 * 64 * 128 + 4 * 64 * 128 + 128 * 128)
        );
        let o = EngineOptions {
            max_step_tokens: 512,
            context: 8192,
            ..Default::default()
        };
        let attention_only = ModelConfig {
            linear: None,
            ..cfg.clone()
        };
        assert!(work_bytes(&cfg, &o) >= work_bytes(&attention_only, &o) + 4 * 512 * (row - 18432));
    }

    fn input() -> PlanInput {
        PlanInput {
            num_layers: 10,
            layer_bytes: 1 << 30,
            layer_file_bytes: 1 << 30,
            small_bytes: 1 << 10,
            head_bytes: 2 << 30,
            head_file_bytes: 2 << 30,
            min_slice_bytes: 4 << 20,
            kv_bytes: 64 << 20,
            work_bytes: 32 << 20,
            fixed_bytes: 0,
            reserved_bytes: 0,
            expert_bytes: 0,
            expert_file_bytes: 0,
            experts_total: 0,
            experts_per_token: 0,
            router_bytes: 0,
        }
    }

    fn device_input() -> DeviceInput {
        DeviceInput {
            num_layers: 10,
            layer_bytes: 1 << 30,
            head_bytes: 2 << 30,
            min_slot_bytes: 4 << 20,
            kv_bytes: 64 << 20,
            work_bytes: 32 << 20,
            fixed_bytes: 0,
            extra_slots: 0,
            experts: false,
        }
    }

    #[test]
    fn device_tier_fills_its_budget_and_counts_the_link() {
        let inp = device_input();
        let d = DevicePlan::new(&inp, 4 << 30).unwrap();
        assert_eq!(d.slots, SLOTS);
        assert_eq!(d.slot_bytes, SLOT_TARGET);
        assert_eq!(d.resident_layers, 3);
        assert!(!d.head_resident);
        assert!(d.total_bytes() <= 4 << 30);
        assert_eq!(d.bytes_moved_per_token, (7 << 30) + (2 << 30));
        // Everything fits: nothing staged, nothing moved.
        let all = DevicePlan::new(&inp, 20 << 30).unwrap();
        assert_eq!((all.resident_layers, all.head_resident), (10, true));
        assert_eq!((all.slots, all.bytes_moved_per_token), (0, 0));
        assert!(!all.stages());
        // At the minimum: two slots of the smallest slice and nothing resident.
        let min = DevicePlan::new(&inp, d.minimum).unwrap();
        assert_eq!((min.slots, min.slot_bytes), (2, inp.min_slot_bytes));
        assert_eq!(min.resident_layers, 0);
        assert!(min.total_bytes() <= min.budget);
        let e = DevicePlan::new(&inp, d.minimum - 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("device budget") && e.contains("minimum"), "{e}");
    }

    #[test]
    fn experts_keep_staging_slots_when_everything_else_fits() {
        let inp = DeviceInput {
            experts: true,
            ..device_input()
        };
        let d = DevicePlan::new(&inp, 20 << 30).unwrap();
        assert_eq!((d.resident_layers, d.head_resident), (10, true));
        assert!(d.stages() && d.slots >= 2, "{d:?}");
        assert!(d.total_bytes() <= 20 << 30);
    }

    #[test]
    fn what_no_layer_can_use_deepens_the_read_ahead() {
        let inp = input();
        // 3.5 GiB: after the read buffers, three 1 GiB layers fit and 150 MiB is left; it goes
        // to more buffers of the same slice.
        let p = Plan::new(&inp, 3584 << 20).unwrap();
        let per = (p.inflight_bytes - 2 * inp.small_bytes) / p.buffers as u64;
        let spare = p.budget - p.total_bytes();
        assert!(
            spare < per,
            "{spare} left over with buffers of {per}: {p:?}"
        );
        assert!(p.inflight_bytes > STREAM_TARGET, "{p:?}");
        assert_eq!(p.resident_layers, 3);
    }

    #[test]
    fn refuses_below_minimum_and_states_it() {
        let e = Plan::new(&input(), 100 << 20).unwrap_err().to_string();
        assert!(e.contains("minimum"), "{e}");
    }

    #[test]
    fn minimum_does_not_grow_with_the_layer() {
        let mut big = input();
        big.layer_bytes *= 8;
        let a = Plan::new(&input(), 1 << 30).unwrap();
        let b = Plan::new(&big, 1 << 30).unwrap();
        assert_eq!(a.minimum, b.minimum);
        assert!(a.minimum < 120 << 20, "{}", a.minimum);
    }

    #[test]
    fn more_budget_more_resident() {
        let inp = input();
        let small = Plan::new(&inp, 3 << 30).unwrap();
        let large = Plan::new(&inp, 8 << 30).unwrap();
        assert!(small.resident_layers < large.resident_layers);
        assert_eq!(small.resident_layers + small.streamed_layers, 10);
        assert!(large.bytes_read_per_token < small.bytes_read_per_token);
        assert!(small.total_bytes() <= 3 << 30 && large.total_bytes() <= 8 << 30);
        assert!(small.buffers >= 2 && small.slice_bytes >= inp.min_slice_bytes);
        // At the minimum, exactly two buffers of the smallest slice.
        let min = Plan::new(&inp, small.minimum).unwrap();
        assert_eq!((min.buffers, min.slice_bytes), (2, inp.min_slice_bytes));
        assert!(min.total_bytes() <= min.budget);
        let all = Plan::new(&inp, 100 << 30).unwrap();
        assert_eq!(
            (
                all.streamed_layers,
                all.head_resident,
                all.bytes_read_per_token
            ),
            (0, true, 0)
        );
    }
}
