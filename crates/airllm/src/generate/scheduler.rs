//! The scheduler: every request's state (sampler, stop rules, where its prefill stands, its
//! token limit) and the sweeps that serve them. Each [`Scheduler::tick`] runs one sweep over the
//! active sequences: decode rows first, then prefill chunks in the room left. Requests join
//! and leave between sweeps, so a streamed layer read once serves everyone in flight.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::speculative::{self, DraftSource, DraftState, Speculator};
use super::{Caches, Completion, FinishReason, GenerationParams, Output, Sampler};
use crate::engine::{Engine, Sequence};
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

pub type RequestId = u64;

/// New tokens a prompt of `prompt_len` leaves room for in a context of `context`: a request
/// that generates needs at least one. The one rule for the scheduler and the server.
pub fn new_token_room(context: usize, prompt_len: usize) -> usize {
    context.saturating_sub(prompt_len)
}

/// One generation to run.
pub struct Request {
    /// The whole prompt (the repetition penalty and the result see all of it).
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// Separates random streams: requests with the same seed and stream sample the same
    /// tokens, whatever else shares their sweeps.
    pub stream: u64,
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// A sequence whose cache already holds the first `n` prompt tokens (a conversation's
    /// earlier turns), and that `n`; the rest of the prompt is fed from there.
    pub resume: Option<(Sequence, usize)>,
    /// With `resume`, the draft model's sequence of the same conversation (it holds a prefix
    /// of the resumed tokens), so a speculating chat does not prefill the draft again.
    pub resume_draft: Option<Sequence>,
    /// Score the prompt from this position on: the completion carries the log-probability of
    /// each prompt token after it (perplexity). Prefill sweeps before it skip the output head.
    pub score_from: Option<usize>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, params: GenerationParams) -> Self {
        Request {
            prompt,
            params,
            stream: 0,
            logprobs: None,
            resume: None,
            resume_draft: None,
            score_from: None,
        }
    }
}

/// A sampled token's log-probability under the model (before any sampling filter), and the
/// most likely tokens at that position with theirs.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestStats {
    /// From submission to admission (its KV cache allocated).
    pub queued: Duration,
    /// From submission to the first sampled token.
    pub first_token: Option<Duration>,
    /// From submission to the end.
    pub total: Duration,
    /// Tokens fed through the model for the prompt (less than the prompt when resumed).
    pub prefilled: usize,
}

pub enum Event {
    /// Tokens sampled in this sweep and the text that became final with them (text that may
    /// still turn into a stop string is held back).
    Tokens {
        id: RequestId,
        tokens: Vec<u32>,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The request ended. Its sequence comes back for a caller that continues the
    /// conversation: it holds the prompt and every token fed after it (all of the output but
    /// the last token, or all of it when EOS ended the request).
    Done {
        id: RequestId,
        completion: Completion,
        seq: Sequence,
        /// The draft model's sequence, when the scheduler speculates with one: it holds a
        /// prefix of `seq`'s tokens, for [`Request::resume_draft`].
        draft_seq: Option<Sequence>,
        stats: RequestStats,
    },
    /// The request could not run; the others go on.
    Failed { id: RequestId, error: Error },
}

impl Event {
    /// The request the event is about.
    pub fn id(&self) -> RequestId {
        match self {
            Event::Tokens { id, .. } | Event::Done { id, .. } | Event::Failed { id, .. } => *id,
        }
    }
}

/// What [`Scheduler::run`] reports as it goes.
pub enum Hook<'a> {
    /// An event of the request at this index of the call's requests.
    Event(usize, &'a Event),
    /// A sweep ended; the engine as it stands.
    Swept(&'a Engine),
}

struct Waiting {
    id: RequestId,
    req: Request,
    since: Instant,
}

struct Active {
    id: RequestId,
    out: Output,
    params: GenerationParams,
    logprobs: Option<usize>,
    seq: Sequence,
    /// Tokens not yet fed: the rest of the prompt, then each sampled token.
    pending: Vec<u32>,
    score_from: Option<usize>,
    prompt_logprobs: Vec<f64>,
    submitted: Instant,
    stats: RequestStats,
    /// Sampled since the last report.
    new_tokens: Vec<u32>,
    new_text: String,
    new_logprobs: Vec<TokenLogprob>,
    failed: bool,
    /// Guess state, when the scheduler speculates.
    draft: Option<DraftState>,
}

/// Continuous batching over one engine. Admission is bounded by the engine's plan: at most
/// `max_batch` sequences are active, and each one's KV cache is charged to the budget when it
/// is admitted; the others wait in order.
pub struct Scheduler {
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    next_id: RequestId,
    spec: Option<Speculator>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new()
    }
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler {
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_id: 0,
            spec: None,
        }
    }

    /// A scheduler whose decode sweeps verify guesses from `spec`.
    pub fn with_speculation(spec: Speculator) -> Self {
        Scheduler {
            spec: Some(spec),
            ..Self::new()
        }
    }

    pub fn speculation(&self) -> Option<&Speculator> {
        self.spec.as_ref()
    }

    /// Queues a request; it joins the next sweep that has room for it.
    pub fn submit(&mut self, req: Request) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            req,
            since: Instant::now(),
        });
        id
    }

    /// Drops a request, waiting or active; its KV cache is freed now.
    pub fn cancel(&mut self, id: RequestId) {
        self.waiting.retain(|w| w.id != id);
        self.active.retain(|a| a.id != id);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn active(&self) -> usize {
        self.active.len()
    }
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Runs `reqs` to the end on an idle scheduler (the one run-to-completion loop). `on(Hook::Event(i, event))` sees each event of request `i` as
    /// it happens, and `on(Hook::Swept(engine))` follows each sweep; an error from `on` stops
    /// the run there (the requests are cancelled) and is returned. Returns each completion with
    /// its caches (a chat continues from them); the first request that fails fails the call,
    /// and the others are cancelled.
    pub fn run(
        &mut self,
        engine: &mut Engine,
        tok: Option<&TextTokenizer>,
        reqs: Vec<Request>,
        mut on: impl FnMut(Hook<'_>) -> Result<()>,
    ) -> Result<Vec<(Completion, Caches)>> {
        let ids: Vec<RequestId> = reqs.into_iter().map(|r| self.submit(r)).collect();
        let mut done: Vec<Option<(Completion, Caches)>> = ids.iter().map(|_| None).collect();
        let r = (|| -> Result<()> {
            while !self.is_idle() {
                for ev in self.tick(engine, tok) {
                    let Some(i) = ids.iter().position(|&x| x == ev.id()) else {
                        continue;
                    };
                    on(Hook::Event(i, &ev))?;
                    match ev {
                        Event::Done {
                            completion,
                            seq,
                            draft_seq,
                            ..
                        } => {
                            let caches = Caches {
                                seq,
                                draft: draft_seq,
                            };
                            done[i] = Some((completion, caches));
                        }
                        Event::Failed { error, .. } => return Err(error),
                        Event::Tokens { .. } => {}
                    }
                }
                on(Hook::Swept(engine))?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            // The others stop too: the scheduler is left idle for the next call.
            for &id in &ids {
                self.cancel(id);
            }
            return Err(e);
        }
        done.into_iter()
            .map(|d| d.ok_or_else(|| Error::Internal("a request never ended".into())))
            .collect()
    }

    /// Moves waiting requests in while the plan has room. A request that cannot fit even
    /// alone fails; one that waits for others to finish stays queued.
    fn admit(&mut self, engine: &Engine, events: &mut Vec<Event>) {
        let context = engine.options().context;
        while self.active.len() < engine.options().max_batch.max(1) {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let Waiting { id, mut req, since } = w;
            let resume_draft = req.resume_draft.take();
            let p = &req.prompt;
            let cached = req.resume.as_ref().map_or(0, |(_, n)| *n);
            let bad = if p.is_empty() {
                Some("the prompt has no tokens".to_string())
            } else if p.len() > context
                || (req.params.max_new_tokens > 0 && new_token_room(context, p.len()) == 0)
            {
                Some(format!(
                    "a prompt of {} tokens does not fit the context size of {context}",
                    p.len()
                ))
            } else if cached >= p.len() {
                Some("a resumed sequence must leave a prompt token to feed".to_string())
            } else {
                None
            };
            if let Some(msg) = bad {
                events.push(Event::Failed {
                    id,
                    error: Error::Invalid(msg),
                });
                continue;
            }
            let seq = match req.resume {
                Some((mut s, n)) => {
                    if s.truncate(n) != n {
                        // A sliding window dropped keys the rest needs: start over.
                        s.truncate(0);
                        (s, 0)
                    } else {
                        (s, n)
                    }
                }
                None => match engine.new_sequence() {
                    Ok(s) => (s, 0),
                    Err(e) if !self.active.is_empty() => {
                        // The budget is held by running sequences: wait for one to end.
                        tracing::debug!("request {id} waits for room: {e}");
                        self.waiting.push_front(Waiting {
                            id,
                            req: Request {
                                resume: None,
                                ..req
                            },
                            since,
                        });
                        break;
                    }
                    Err(e) => {
                        events.push(Event::Failed { id, error: e });
                        continue;
                    }
                },
            };
            let (seq, fed) = seq;
            let draft = match self.spec.as_mut().map(|s| &mut s.source) {
                None => None,
                Some(src) => {
                    let dseq = match src {
                        DraftSource::Model(e) => match resume_draft.map_or_else(
                            || e.new_sequence(),
                            |mut d| {
                                // What it holds of the prompt; the rest is fed when it guesses.
                                d.truncate(d.len().min(fed));
                                Ok(d)
                            },
                        ) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                events.push(Event::Failed {
                                    id,
                                    error: Error::Invalid(format!("draft model: {e}")),
                                });
                                continue;
                            }
                        },
                        DraftSource::Lookup => None,
                    };
                    // The draft's own random stream, apart from the request's.
                    let stream = req.stream ^ (1 << 62);
                    Some(DraftState::new(
                        dseq,
                        Sampler::new(req.params.sampling.clone(), stream),
                    ))
                }
            };
            let params = req.params;
            // A scored prompt that generates nothing ends after its prefill, not before it.
            let done = (params.max_new_tokens == 0 && req.score_from.is_none())
                .then_some(FinishReason::Length);
            self.active.push(Active {
                id,
                pending: req.prompt[fed..].to_vec(),
                score_from: req.score_from,
                prompt_logprobs: Vec::new(),
                out: Output {
                    prompt_ids: req.prompt,
                    ids: vec![],
                    eos: None,
                    text: String::new(),
                    shown: 0,
                    done,
                    sampler: Sampler::new(params.sampling.clone(), req.stream),
                },
                logprobs: req.logprobs,
                params,
                seq,
                submitted: since,
                stats: RequestStats {
                    queued: since.elapsed(),
                    ..Default::default()
                },
                new_tokens: Vec::new(),
                new_text: String::new(),
                new_logprobs: Vec::new(),
                failed: false,
                draft,
            });
        }
    }

    /// One sweep over the active sequences, after admitting what fits. Returns what happened
    /// to each request; an idle scheduler returns nothing at once. Without a tokenizer (a
    /// benchmark) there is no text, no EOS and no stop string: requests run to their limit.
    pub fn tick(&mut self, engine: &mut Engine, tok: Option<&TextTokenizer>) -> Vec<Event> {
        let mut events = Vec::new();
        self.admit(engine, &mut events);
        self.finish_done(&mut events);
        if self.active.is_empty() {
            return events;
        }
        let context = engine.options().context;
        let mut room = engine.options().max_step_tokens.max(1);
        let mut rows_left = engine.options().max_logit_rows.max(1);
        // Decoding sequences take guesses. In a sweep that only decodes, all rows stay within
        // the rows computed exactly as alone (greedy output is plain greedy output); a prefill
        // chunk beside them takes the sweep past that whether or not guesses ride along.
        if self.spec.is_some() {
            if let Err(e) = self.guess(engine) {
                // The draft only helps: without it every request decodes as it would have.
                tracing::warn!("draft model failed, speculation is off from here: {e}");
                self.spec = None;
                for a in &mut self.active {
                    a.drop_guesses();
                }
            }
        }
        // Decode rows first (latency matters), then prefill chunks in admission order.
        let mut order: Vec<usize> = (0..self.active.len()).collect();
        order.sort_by_key(|&i| !self.active[i].decoding());
        // Each part: the sequence, its new tokens, and its rows of logits.
        let mut parts: Vec<(usize, usize, usize)> = Vec::new();
        for i in order {
            if room == 0 || rows_left == 0 {
                break;
            }
            let a = &mut self.active[i];
            if a.draft.as_ref().is_some_and(|d| !d.guesses.is_empty()) {
                // One row per token: the token sampled last and the guesses after it.
                let n = a.pending.len();
                if n <= room && n <= rows_left {
                    parts.push((i, n, n));
                    room -= n;
                    rows_left -= n;
                    continue;
                }
                // No room for them (guesses are sized to fit, so this is a safeguard).
                a.drop_guesses();
            }
            if a.decoding() {
                // The token sampled last; or, after a rollback that a sliding window cut
                // short, the tokens to feed again, in chunks like a prefill's.
                let n = a.pending.len().min(room);
                let tail = (n == a.pending.len()) as usize;
                parts.push((i, n, tail));
                room -= n;
                rows_left -= tail;
                continue;
            }
            let mut n = a.pending.len().min(room);
            // Rows before a scored range go in sweeps of their own, which skip the head.
            let at = a.seq.len();
            if let Some(from) = a.score_from {
                if at < from {
                    n = n.min(from - at);
                }
            }
            let tail = if a.score_from.is_some_and(|f| at + n > f) {
                // A scored chunk returns a row for every token it carries.
                n = n.min(rows_left);
                n
            } else {
                (n == a.pending.len()) as usize
            };
            parts.push((i, n, tail));
            room -= n;
            rows_left -= tail;
        }
        parts.sort_unstable();
        // Guesses of a sequence left out of this sweep are not fed later as if sampled.
        for (i, a) in self.active.iter_mut().enumerate() {
            if !parts.iter().any(|p| p.0 == i) {
                a.drop_guesses();
            }
        }
        let decode_only = parts.iter().all(|&(i, _, _)| self.active[i].decoding());
        let t = Instant::now();
        let result = {
            let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(parts.len());
            let tails: Vec<usize> = parts.iter().map(|p| p.2).collect();
            let mut it = parts.iter().peekable();
            for (i, a) in self.active.iter_mut().enumerate() {
                if let Some(&&(j, n, _)) = it.peek() {
                    if i == j {
                        batch.push((&mut a.seq, &a.pending[..n]));
                        it.next();
                    }
                }
            }
            engine.step_rows(&mut batch, &tails)
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The step may have cached some layers' tokens and not others: the
                // sequences in it cannot go on.
                let ids: Vec<RequestId> =
                    parts.iter().map(|&(i, _, _)| self.active[i].id).collect();
                for id in ids {
                    self.cancel(id);
                    events.push(Event::Failed {
                        id,
                        error: e.duplicate(),
                    });
                }
                return events;
            }
        };
        if let (Some(spec), true) = (self.spec.as_mut(), decode_only) {
            let rows: usize = parts.iter().map(|p| p.2).sum();
            spec.sweep_took(rows, t.elapsed().as_secs_f64());
        }
        let mut logits = logits.into_iter();
        for &(i, n, _) in &parts {
            let l = logits.next();
            let a = &mut self.active[i];
            if a.decoding() {
                if n < a.pending.len() {
                    a.pending.drain(..n);
                    continue;
                }
                let stats = self.spec.as_mut().map(|s| &mut s.stats);
                if let Err(e) = a.advance(l, tok, context, stats) {
                    events.push(a.fail(e));
                    continue;
                }
                if let Some(ev) = a.take_tokens() {
                    events.push(ev);
                }
                continue;
            }
            let at = a.seq.len() - n; // the position of this chunk's first row
            let mut l = l;
            if a.score_from.is_some_and(|f| at + n > f) {
                match a.score(l.as_ref(), at, n) {
                    Ok(last) => l = last,
                    Err(e) => {
                        events.push(a.fail(e));
                        continue;
                    }
                }
            }
            a.pending.drain(..n);
            a.stats.prefilled += n;
            if !a.pending.is_empty() {
                continue; // mid-prefill: these logits are not the prompt's last
            }
            if a.score_from.is_some() && a.params.max_new_tokens == 0 {
                a.out.done = Some(FinishReason::Length);
                continue;
            }
            if let Err(e) = a.advance(l, tok, context, None) {
                events.push(a.fail(e));
                continue;
            }
            if let Some(ev) = a.take_tokens() {
                events.push(ev);
            }
        }
        self.finish_done(&mut events);
        events
    }

    /// Puts guesses after each decoding sequence's pending token, as many as the measured
    /// costs and acceptance favour, within the rows the engine computes exactly as alone.
    fn guess(&mut self, engine: &Engine) -> Result<()> {
        let Some(spec) = self.spec.as_mut() else {
            return Ok(());
        };
        let o = engine.options();
        // Only a sequence that decodes, with just its last token to feed, takes guesses; the
        // others (prefill chunks) keep a row of logits each.
        let eligible = |a: &Active| a.decoding() && a.pending.len() == 1;
        let n = self.active.iter().filter(|a| eligible(a)).count();
        if n == 0 {
            return Ok(());
        }
        let limit = engine
            .exact_rows()
            .min(o.max_logit_rows.saturating_sub(self.active.len() - n))
            .min(o.max_step_tokens);
        let spare = limit.saturating_sub(n);
        let context = o.context;
        let vocab = engine.config().vocab_size;
        let mut wants: Vec<usize> = Vec::with_capacity(self.active.len());
        let mut j = 0;
        for a in self.active.iter_mut() {
            if !eligible(a) {
                wants.push(0);
                continue;
            }
            let share = spare / n + (j < spare % n) as usize;
            j += 1;
            let room_new = a.params.max_new_tokens.saturating_sub(a.out.ids.len() + 1);
            let room_ctx = context.saturating_sub(a.seq.len() + 2);
            let cap = share.min(room_new).min(room_ctx);
            let st = a
                .draft
                .as_mut()
                .expect("speculating requests have draft state");
            let k = spec.draft_len(st.alpha(), n - 1, cap);
            wants.push(st.explore(k, cap));
        }
        // The sequences' tokens, for those that guess.
        let tokens: Vec<Vec<u32>> = self
            .active
            .iter()
            .zip(&wants)
            .map(|(a, &k)| match k {
                0 => Vec::new(),
                _ => a.out.tokens().copied().collect(),
            })
            .collect();
        match spec.source {
            DraftSource::Lookup => {
                for ((a, toks), &k) in self.active.iter_mut().zip(&tokens).zip(&wants) {
                    let st = a.draft.as_mut().expect("draft state");
                    st.guesses = speculative::lookup(toks, k);
                    st.dists = st
                        .guesses
                        .iter()
                        .map(|&g| super::sampling::Dist::Token(g))
                        .collect();
                }
            }
            DraftSource::Model(_) => {
                let mut reqs: Vec<(&mut DraftState, &[u32], usize)> = self
                    .active
                    .iter_mut()
                    .zip(&tokens)
                    .zip(&wants)
                    .map(|((a, t), &k)| (a.draft.as_mut().expect("draft state"), t.as_slice(), k))
                    .collect();
                speculative::draft_model(spec, &mut reqs, vocab)?;
            }
        }
        for a in &mut self.active {
            let st = a.draft.as_ref().expect("draft state");
            if !st.guesses.is_empty() {
                a.pending.extend(&st.guesses);
            }
        }
        Ok(())
    }

    /// Ends the requests that are done: their results go out and their sequences leave.
    fn finish_done(&mut self, events: &mut Vec<Event>) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].out.done.is_none() {
                i += 1;
                continue;
            }
            let a = self.active.swap_remove(i);
            if a.failed {
                continue; // already reported
            }
            let mut stats = a.stats;
            stats.total = a.submitted.elapsed();
            events.push(Event::Done {
                id: a.id,
                completion: Completion {
                    prompt_logprobs: a.prompt_logprobs,
                    prompt_ids: a.out.prompt_ids,
                    token_ids: a.out.ids,
                    eos: a.out.eos,
                    text: a.out.text,
                    finish_reason: a.out.done.unwrap_or(FinishReason::Length),
                },
                seq: a.seq,
                draft_seq: a.draft.and_then(|d| d.seq),
                stats,
            });
        }
        // Keep admission order: swap_remove moved the last entry forward.
        self.active.sort_by_key(|a| a.id);
    }
}

impl Active {
    /// Ends the request with `error`; [`Scheduler::finish_done`] then drops it unreported.
    fn fail(&mut self, error: Error) -> Event {
        self.out.done = Some(FinishReason::Stop);
        self.failed = true;
        Event::Failed { id: self.id, error }
    }

    /// Scores the rows of a chunk whose first row sits at position `at` from `all` (`[n,
    /// vocab]`), and returns the last row as a step for `Last` would have.
    fn score(
        &mut self,
        all: Option<&candle_core::Tensor>,
        at: usize,
        n: usize,
    ) -> Result<Option<candle_core::Tensor>> {
        let Some(all) = all else {
            return Ok(None);
        };
        if let (Some(from), true) = (self.score_from, self.out.ids.is_empty()) {
            let rows: Vec<Vec<f32>> = all.to_vec2()?;
            let p = &self.out.prompt_ids;
            for (k, row) in rows.iter().enumerate() {
                let j = at + k;
                if j >= from && j + 1 < p.len() {
                    self.prompt_logprobs
                        .push(super::perplexity::log_softmax_at(row, p[j + 1] as usize));
                }
            }
        }
        Ok(Some(all.narrow(0, n - 1, 1)?))
    }

    /// What was sampled since the last report, if anything.
    fn take_tokens(&mut self) -> Option<Event> {
        if self.new_tokens.is_empty() && self.new_text.is_empty() {
            return None;
        }
        Some(Event::Tokens {
            id: self.id,
            tokens: std::mem::take(&mut self.new_tokens),
            text: std::mem::take(&mut self.new_text),
            logprobs: std::mem::take(&mut self.new_logprobs),
        })
    }

    /// Takes this sweep's guesses back out of the pending tokens.
    fn drop_guesses(&mut self) {
        if let Some(d) = self.draft.as_mut() {
            let n = self.pending.len().saturating_sub(d.guesses.len());
            self.pending.truncate(n.max(1).min(self.pending.len()));
            d.guesses.clear();
            d.dists.clear();
        }
    }

    /// Whether the request has sampled a token: its sweeps decode (and may carry guesses).
    fn decoding(&self) -> bool {
        !self.out.ids.is_empty()
    }

    /// Takes the step's logits for this request's new tokens: the last row of a prompt, or
    /// a decode step's rows (the token sampled last, then each guess). Samples from the first
    /// row, keeps guesses as speculative sampling accepts them, stops at the first rejected
    /// one or a stop rule, and rolls the caches back to what was kept.
    fn advance(
        &mut self,
        l: Option<candle_core::Tensor>,
        tok: Option<&TextTokenizer>,
        context: usize,
        stats: Option<&mut speculative::SpecStats>,
    ) -> Result<()> {
        let l = l.ok_or_else(|| Error::Internal("step returned no logits".into()))?;
        let rows: Vec<Vec<f32>> = l.to_vec2()?;
        let decoding = self.decoding();
        let (guesses, dists) = match &mut self.draft {
            Some(d) if decoding => (std::mem::take(&mut d.guesses), std::mem::take(&mut d.dists)),
            _ => (Vec::new(), Vec::new()),
        };
        let k = guesses.len();
        if rows.len() != k + 1 {
            return Err(Error::Internal(format!(
                "{} rows of logits for {} guesses",
                rows.len(),
                k
            )));
        }
        // Tokens in the cache up to the first row's token.
        let base = self.seq.len() - k;
        let (mut accepted, mut rejected, mut emitted) = (0, false, 0);
        let mut eos = false;
        for (i, row) in rows.iter().enumerate() {
            // The history matters only to the repetition penalty.
            let history: Vec<u32> = if self.out.sampler.penalizes() {
                self.out.tokens().copied().collect()
            } else {
                Vec::new()
            };
            let p = self.out.sampler.distribution(row, &history);
            let t = if i < k {
                match speculative::verify(&p, &dists[i], guesses[i], &mut self.out.sampler) {
                    Ok(g) => {
                        accepted += 1;
                        g
                    }
                    Err(t) => {
                        rejected = true;
                        t
                    }
                }
            } else {
                self.out.sampler.draw(&p)
            };
            emitted += 1;
            eos = self.emit(t, row, base + i, tok, context)?;
            if self.out.done.is_some() || rejected {
                break;
            }
        }
        if let Some(st) = self.draft.as_mut() {
            if k > 0 {
                st.record(accepted, rejected);
            }
        }
        if let (Some(s), true) = (stats, decoding) {
            s.seq_sweeps += 1;
            s.rounds += (k > 0) as usize;
            s.drafted += k;
            s.accepted += accepted;
            s.tokens += emitted;
        }
        // Roll back what was not kept: the cache holds every token but the last sampled one
        // (which is fed next), or every one when EOS ended the request.
        let total = self.out.prompt_ids.len() + self.out.ids.len();
        let want = if eos { total } else { total - 1 };
        let kept = self.seq.truncate(want.min(self.seq.len()));
        if let Some(d) = self.draft.as_mut().and_then(|d| d.seq.as_mut()) {
            d.truncate(d.len().min(kept));
        }
        if self.out.done.is_none() {
            self.pending = self.out.tokens().skip(kept).copied().collect();
        }
        Ok(())
    }

    /// Applies token `t`, sampled from `row` (whose token made the cache `fed` long), to the
    /// output and the stop rules. Returns whether it was an EOS that ended the request.
    fn emit(
        &mut self,
        t: u32,
        row: &[f32],
        fed: usize,
        tok: Option<&TextTokenizer>,
        context: usize,
    ) -> Result<bool> {
        if self.stats.first_token.is_none() {
            self.stats.first_token = Some(self.submitted.elapsed());
        }
        let lp = self.logprobs.map(|k| logprobs_of(row, t, k));
        let o = &mut self.out;
        let eos = tok.is_some_and(|tok| tok.eos_ids.contains(&t)) && !self.params.ignore_eos;
        if eos {
            o.done = Some(FinishReason::Stop);
            o.eos = Some(t);
        } else {
            o.ids.push(t);
            self.new_tokens.push(t);
            if o.ids.len() >= self.params.max_new_tokens || fed + 1 >= context {
                o.done = Some(FinishReason::Length);
            }
            if let Some(lp) = lp {
                self.new_logprobs.push(lp);
            }
        }
        if let Some(tok) = tok {
            let piece = o.update(tok, &self.params.stop_strings)?;
            self.new_text.push_str(&piece);
        }
        Ok(eos)
    }
}

/// The log-probability of `t` under `row`'s softmax, and the `k` most likely tokens with
/// theirs (ties to the lower id), in f64.
fn logprobs_of(row: &[f32], t: u32, k: usize) -> TokenLogprob {
    let log_sum = super::sampling::log_sum_exp(row);
    let lp = |i: usize| (row[i] as f64 - log_sum) as f32;
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
    }
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    TokenLogprob {
        token: t,
        logprob: row
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(t as usize)),
        top: idx.into_iter().map(|i| (i, lp(i as usize))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let l = logprobs_of(&row, 2, 2);
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((l.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!(logprobs_of(&row, 0, 0).top.is_empty());
    }
}
