//! The one way in: a [`Session`] opens a model for a [`Workload`], sizes its engine by one rule
//! ([`engine_options`]), and holds the engine, the scheduler and the tokenizer. Every front end
//! (the `airllm` commands, the server, the Python module) drives one, so `inspect` plans exactly
//! what `run` would, and no front end builds [`EngineOptions`] itself.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;

use crate::config::ModelConfig;
use crate::engine::{Engine, EngineOptions, ModelInfo};
use crate::error::{Error, Result};
pub use crate::generate::Hook;
use crate::generate::{
    Caches, Completion, DraftSource, Event, GenerationParams, Request, RequestId, Scheduler,
    Speculator,
};
use crate::load::LoadOptions;
use crate::stream::Plan;
use crate::tokenizer::TextTokenizer;

/// Where speculative guesses come from.
#[derive(Debug, Clone)]
pub enum Guesses {
    /// A draft model (a path or a hub spec) with the model's tokenizer, kept resident, guessing
    /// up to `max` tokens per sweep.
    Draft { model: String, max: usize },
    /// Up to `n` tokens per sweep from n-gram matches in the sequence's own tokens.
    Lookup(usize),
}

impl Guesses {
    fn most(&self) -> usize {
        match self {
            Guesses::Draft { max, .. } => *max,
            Guesses::Lookup(n) => *n,
        }
    }
}

/// How to open a model: what [`LoadOptions`] says, the budgets, the device and speculation.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub load: LoadOptions,
    /// The host budget in bytes; `None` takes 90% of the memory available once the tokenizer
    /// and the draft are loaded (they are counted in the budget either way).
    pub max_memory: Option<u64>,
    pub device: Device,
    /// The device's budget; see [`EngineOptions::device_memory`].
    pub device_memory: Option<u64>,
    pub guesses: Option<Guesses>,
    /// Keep streamed weights in the page cache (benchmarks of a warm cache).
    pub keep_page_cache: bool,
    /// Build the tokenizer. Without one, requests get token ids and no text.
    pub tokenizer: bool,
    /// See [`EngineOptions::expert_lookahead`].
    pub expert_lookahead: bool,
    /// See [`EngineOptions::expert_trace`].
    pub expert_trace: Option<std::path::PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            load: LoadOptions::default(),
            max_memory: None,
            device: Device::Cpu,
            device_memory: None,
            guesses: None,
            keep_page_cache: false,
            tokenizer: true,
            expert_lookahead: true,
            expert_trace: None,
        }
    }
}

/// What the session is opened for: the plan reserves memory for exactly this.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Tokens each sequence holds (prompt plus generated); `None` takes min(2048, the model's
    /// maximum), for front ends that do not know their prompts in advance.
    pub context: Option<usize>,
    /// Sequences that share a sweep.
    pub sequences: usize,
    /// Most tokens one sweep carries; longer prompts are prefilled over several sweeps.
    pub prefill_chunk: usize,
    /// Every prompt token of a sweep is scored (perplexity), not only each sequence's last.
    pub score_prompts: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            context: None,
            sequences: 1,
            prefill_chunk: 512,
            score_prompts: false,
        }
    }
}

/// The context of a front end that does not know its prompts in advance (chat, a server, the
/// Python API): min(2048, the model's maximum).
pub fn default_context(cfg: &ModelConfig) -> usize {
    cfg.max_position_embeddings.min(2048)
}

/// The one sizing rule: the engine options for `work` on a model of config `cfg`, with bytes
/// held outside the engine counted against `max_memory`: `held` already taken from the
/// process (the tokenizer), and `to_load` about to be (a draft model).
pub fn engine_options(
    cfg: &ModelConfig,
    o: &SessionOptions,
    work: &Workload,
    held: u64,
    to_load: u64,
) -> Result<EngineOptions> {
    if work.sequences == 0 || work.prefill_chunk == 0 {
        return Err(Error::Invalid(format!(
            "sequences ({}) and prefill chunk ({}) must be at least 1",
            work.sequences, work.prefill_chunk
        )));
    }
    let context = work.context.unwrap_or_else(|| default_context(cfg));
    let seqs = work.sequences;
    let mut step = work
        .prefill_chunk
        .min(context.saturating_mul(seqs))
        .max(seqs);
    let mut rows = if work.score_prompts { step } else { seqs };
    // A verifying sweep carries a row per guess, within the rows computed exactly as alone.
    if let Some(g) = &o.guesses {
        let r = (g.most() + 1).min(crate::kernels::attention::ROW_EXACT);
        rows = rows.max(r);
        step = step.max(r);
    }
    // Without a budget, 90% of what is available now; what is already held is no longer
    // available, so it is added back to be counted like the rest (what is still to load is
    // not: it comes out of what is available).
    let max_memory = match o.max_memory {
        Some(b) => b,
        None => crate::engine::resolve_budget(None)?.saturating_add(held),
    };
    let reserved = held.saturating_add(to_load);
    Ok(EngineOptions {
        max_memory: Some(max_memory),
        context,
        max_batch: seqs,
        max_step_tokens: step,
        max_logit_rows: rows,
        keep_page_cache: o.keep_page_cache,
        reserved_bytes: reserved,
        device: o.device.clone(),
        device_memory: o.device_memory,
        expert_lookahead: o.expert_lookahead,
        expert_trace: o.expert_trace.clone(),
        rollback_rows: o.guesses.as_ref().map_or(0, |g| {
            (g.most() + 1).min(crate::kernels::attention::ROW_EXACT)
        }),
        ..Default::default()
    })
}

/// Opens `info` as a resident draft for a model opened with `target` (see [`draft_options`]).
/// What it holds, `plan().total_bytes()`, is what [`Prepared`] reserved for it.
pub fn open_draft(info: ModelInfo, target: &EngineOptions) -> Result<Engine> {
    let opts = draft_options(&info, target)?;
    let e = Engine::from_info(info, opts)?;
    if e.plan().streams() {
        return Err(Error::Internal("the draft model's plan streams".into()));
    }
    Ok(e)
}

/// The options of a resident draft for a model opened with `target`: the same context, batch
/// and step size, one row of logits per sequence, and a budget of exactly what it holds (a
/// draft that streamed would cost as much as the sweep it saves).
fn draft_options(info: &ModelInfo, target: &EngineOptions) -> Result<EngineOptions> {
    let mut opts = EngineOptions {
        max_memory: Some(u64::MAX / 4),
        max_logit_rows: target.max_batch.max(1),
        reserved_bytes: 0,
        // On a GPU it takes what it needs of the device's free memory before the model plans.
        device_memory: None,
        ..target.clone()
    };
    opts.max_memory = Some(info.plan(&opts)?.total_bytes());
    Ok(opts)
}

/// A model found and opened, sized for a workload, before its engine is built:
/// [`Session::plan`] stops here, [`Session::open`] goes on.
pub struct Prepared {
    pub info: ModelInfo,
    pub tok: Option<TextTokenizer>,
    /// What the tokenizer holds, counted against the budget.
    pub tok_bytes: u64,
    /// The draft model: its path and info, and the options it is sized for (the model's, less
    /// speculation).
    pub draft: Option<(PathBuf, ModelInfo, EngineOptions)>,
    pub draft_bytes: u64,
    /// The engine's options, once [`Prepared::size`] has run.
    pub opts: EngineOptions,
    /// With compression: the conversion used, and whether this call built it.
    pub compressed: Option<(PathBuf, bool)>,
    /// No budget was given: it is 90% of the available memory.
    pub budget_defaulted: bool,
    /// The options it was opened with.
    options: SessionOptions,
    /// [`Prepared::size`] has run.
    sized: bool,
}

impl Prepared {
    /// Resolves `spec` (the default model when `None`) and opens its weights and tokenizer.
    /// A caller that needs the tokenizer to know its workload (the prompts' lengths) sizes it
    /// after, with [`Prepared::size`].
    pub fn new(spec: Option<&str>, o: &SessionOptions) -> Result<Prepared> {
        let at = crate::load::locate(spec, &o.load)?;
        let info = ModelInfo::open_opts(&at.weights, false, o.load.f16)?;
        let (tok, tok_bytes) = if o.tokenizer {
            // The tokenizer stays the original's: a conversion keeps only what GGUF metadata
            // can hold.
            let (t, n) = crate::alloc::measure(|| TextTokenizer::open(&at.source));
            (Some(t?), n)
        } else {
            (None, 0)
        };
        Ok(Prepared {
            info,
            tok,
            tok_bytes,
            draft: None,
            draft_bytes: 0,
            opts: EngineOptions::default(),
            compressed: at.compressed,
            budget_defaulted: o.max_memory.is_none(),
            options: o.clone(),
            sized: false,
        })
    }

    /// Sizes the engine (and the draft's) for `work`.
    pub fn size(&mut self, work: &Workload) -> Result<()> {
        let o = &self.options;
        // The draft is sized for the model's workload before the model is planned, so the
        // model's budget is what the draft leaves.
        let no_guesses = SessionOptions {
            guesses: None,
            ..o.clone()
        };
        let base = engine_options(&self.info.cfg, &no_guesses, work, self.tok_bytes, 0)?;
        self.draft = None;
        self.draft_bytes = 0;
        match &o.guesses {
            Some(Guesses::Draft { model, max }) => {
                if *max == 0 {
                    return Err(Error::Invalid("draft max must be at least 1".into()));
                }
                let ctx = |e: Error| Error::Draft {
                    spec: model.clone(),
                    source: Box::new(e),
                };
                let path = crate::hub::resolve(model, None, o.load.progress).map_err(ctx)?;
                if let Some(tok) = &self.tok {
                    let theirs = TextTokenizer::open(&path).map_err(ctx)?;
                    if let Some(why) = tok.difference(&theirs) {
                        return Err(ctx(Error::Invalid(format!(
                            "its tokenizer is not the model's: {why}"
                        ))));
                    }
                }
                let dinfo = ModelInfo::open(&path).map_err(ctx)?;
                let held = draft_options(&dinfo, &base).map_err(ctx)?.max_memory;
                self.draft_bytes = held.unwrap_or(0);
                self.draft = Some((path, dinfo, base));
            }
            Some(Guesses::Lookup(0)) => {
                return Err(Error::Invalid("lookup must be at least 1".into()))
            }
            _ => {}
        }
        self.opts = engine_options(&self.info.cfg, o, work, self.tok_bytes, self.draft_bytes)?;
        self.sized = true;
        Ok(())
    }

    /// The options it was opened with.
    pub fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// The plan the engine would get.
    pub fn plan(&self) -> Result<Plan> {
        if !self.sized {
            return Err(Error::Internal("a plan asked for before sizing".into()));
        }
        self.info.plan(&self.opts)
    }
}

/// A model opened for a workload: its engine, scheduler and tokenizer.
pub struct Session {
    engine: Engine,
    sched: Scheduler,
    tok: Option<Arc<TextTokenizer>>,
    /// The draft model's path and what it holds, when speculating with one.
    pub draft: Option<(PathBuf, u64)>,
    /// With compression: the conversion used, and whether this call built it.
    pub compressed: Option<(PathBuf, bool)>,
    pub budget_defaulted: bool,
}

impl Session {
    /// Opens the model `spec` names (the default model when `None`) for `work`.
    pub fn open(spec: Option<&str>, o: &SessionOptions, work: &Workload) -> Result<Session> {
        Self::start(Self::plan(spec, o, work)?)
    }

    /// The plan [`Session::open`] would make, with the model's info, without building the
    /// engine (what `inspect` shows).
    pub fn plan(spec: Option<&str>, o: &SessionOptions, work: &Workload) -> Result<Prepared> {
        let mut p = Prepared::new(spec, o)?;
        p.size(work)?;
        Ok(p)
    }

    /// Builds the engine (and the draft's) that `p` sized.
    pub fn start(p: Prepared) -> Result<Session> {
        if !p.sized {
            return Err(Error::Internal(
                "a session started before it was sized".into(),
            ));
        }
        let Prepared {
            info,
            tok,
            draft,
            opts,
            compressed,
            budget_defaulted,
            options,
            ..
        } = p;
        let (spec, draft) = match (&options.guesses, draft) {
            (Some(Guesses::Draft { max, .. }), Some((path, dinfo, base))) => {
                let e = open_draft(dinfo, &base)?;
                let held = e.plan().total_bytes();
                (
                    Some(Speculator::new(DraftSource::Model(Box::new(e)), *max)),
                    Some((path, held)),
                )
            }
            (Some(Guesses::Lookup(n)), _) => (Some(Speculator::new(DraftSource::Lookup, *n)), None),
            _ => (None, None),
        };
        Ok(Session {
            draft,
            compressed,
            budget_defaulted,
            ..Session::new(Engine::from_info(info, opts)?, tok, spec)
        })
    }

    /// A session over an engine built by hand (tests of particular engine options), with a
    /// speculator when given.
    pub fn new(engine: Engine, tok: Option<TextTokenizer>, spec: Option<Speculator>) -> Session {
        Session {
            engine,
            sched: match spec {
                Some(s) => Scheduler::with_speculation(s),
                None => Scheduler::new(),
            },
            tok: tok.map(Arc::new),
            draft: None,
            compressed: None,
            budget_defaulted: false,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }
    /// The tokenizer (absent when opened without one).
    pub fn tokenizer(&self) -> Option<&Arc<TextTokenizer>> {
        self.tok.as_ref()
    }

    /// Queues a request; it joins the sweeps as room allows.
    pub fn submit(&mut self, r: Request) -> RequestId {
        self.sched.submit(r)
    }
    pub fn cancel(&mut self, id: RequestId) {
        self.sched.cancel(id)
    }
    pub fn is_idle(&self) -> bool {
        self.sched.is_idle()
    }
    /// Sequences running and waiting.
    pub fn load(&self) -> (usize, usize) {
        (self.sched.active(), self.sched.waiting())
    }

    /// One sweep for the running requests, and what happened to each.
    pub fn step(&mut self) -> Vec<Event> {
        self.sched.tick(&mut self.engine, self.tok.as_deref())
    }

    /// Runs `reqs` to the end: see [`Scheduler::run`].
    pub fn run(
        &mut self,
        reqs: Vec<Request>,
        on: impl FnMut(Hook<'_>) -> Result<()>,
    ) -> Result<Vec<(Completion, Caches)>> {
        self.sched
            .run(&mut self.engine, self.tok.as_deref(), reqs, on)
    }

    /// The perplexity of `tokens` in windows of `ctx`: see
    /// [`crate::generate::perplexity::perplexity`].
    pub fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        bos: Option<u32>,
        on_window: impl FnMut(usize, usize, f64),
    ) -> Result<crate::generate::perplexity::PerplexityReport> {
        crate::generate::perplexity::perplexity(
            &mut self.sched,
            &mut self.engine,
            tokens,
            ctx,
            bos,
            on_window,
        )
    }

    /// Generates for each prompt (token ids) in one batch; `on_text(i, piece)` receives the
    /// text of prompt `i` as it becomes final.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &GenerationParams,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Completion>> {
        let reqs = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Request {
                stream: i as u64,
                ..Request::new(p.clone(), params.clone())
            })
            .collect();
        let out = self.run(reqs, |h| {
            if let Hook::Event(i, Event::Tokens { text, .. }) = h {
                if !text.is_empty() {
                    on_text(i, text)
                }
            }
            Ok(())
        })?;
        Ok(out.into_iter().map(|(c, _)| c).collect())
    }
}
