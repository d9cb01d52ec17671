//! Generation: batched prefill and decode over [`Engine::step`], with sampling and stop rules.
//! Sequences that finish leave the batch; the rest go on in the next sweep.

pub mod perplexity;
pub mod sampling;

use crate::engine::{Engine, LogitsFor, Sequence};
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
pub use sampling::{argmax, Sampler, SamplingParams};

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Keep going past EOS (for benchmarks and reference comparisons).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_new_tokens` or the context size was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, without the EOS that ended them.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Tracks one sequence's output and decides what text is safe to show: text that could still
/// turn out to be the start of a stop string is held back.
struct Output {
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    shown: usize,
    done: Option<FinishReason>,
    sampler: Sampler,
}

impl Output {
    /// Re-decodes the output and returns the newly safe text.
    fn update(&mut self, tok: &TextTokenizer, stops: &[String]) -> Result<String> {
        let mut text = tok.decode(&self.ids)?;
        if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            self.done = Some(FinishReason::Stop);
        }
        // A trailing replacement character is usually half of a multi-byte character.
        let mut safe = if self.done.is_some() {
            text.len()
        } else {
            text.trim_end_matches('\u{FFFD}').len()
        };
        if self.done.is_none() {
            for s in stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                        safe -= k;
                        break;
                    }
                }
            }
        }
        let piece = if safe > self.shown
            && text.is_char_boundary(safe)
            && text.is_char_boundary(self.shown)
        {
            text[self.shown..safe].to_string()
        } else {
            String::new()
        };
        self.shown = self.shown.max(safe);
        self.text = text;
        Ok(piece)
    }
}

/// Generates for each prompt (token ids) in one batch. `on_text(i, piece)` receives the text of
/// prompt `i` as it becomes final.
pub fn generate(
    engine: &mut Engine,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let mut seqs: Vec<Sequence> = prompts
        .iter()
        .map(|_| engine.new_sequence())
        .collect::<Result<_>>()?;
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    continue_batch(
        engine,
        tok,
        &mut refs,
        prompts.to_vec(),
        prompts.to_vec(),
        params,
        on_text,
    )
}

/// Continues existing sequences: `feeds[i]` are the tokens sequence `i` has not cached yet and
/// `prompts[i]` its whole prompt (for the repetition penalty and the result). Used by chat to
/// reuse the cached conversation.
pub fn continue_batch(
    engine: &mut Engine,
    tok: &TextTokenizer,
    seqs: &mut [&mut Sequence],
    feeds: Vec<Vec<u32>>,
    prompts: Vec<Vec<u32>>,
    params: &GenerationParams,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    if feeds.iter().any(|p| p.is_empty()) {
        return Err(Error::Invalid("a prompt tokenized to zero tokens".into()));
    }
    let context = engine.options().context;
    if let Some(p) = prompts.iter().find(|p| p.len() >= context) {
        return Err(Error::Invalid(format!(
            "a prompt of {} tokens does not fit the context size of {context}",
            p.len()
        )));
    }
    let mut outs: Vec<Output> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| Output {
            prompt_ids: p,
            ids: vec![],
            text: String::new(),
            shown: 0,
            done: if params.max_new_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            sampler: Sampler::new(params.sampling.clone(), i as u64),
        })
        .collect();
    let eos = &tok.eos_ids;
    // Tokens each sequence has yet to feed. A long prefill is split over several sweeps so no
    // step carries more than the engine's `max_step_tokens`.
    let mut pending = feeds;
    let cap = engine.options().max_step_tokens;
    loop {
        let mut room = cap;
        let mut parts: Vec<(usize, usize)> = Vec::new();
        for i in (0..outs.len()).filter(|&i| outs[i].done.is_none()) {
            let n = pending[i].len().min(room);
            if n > 0 {
                parts.push((i, n));
                room -= n;
            }
        }
        if parts.is_empty() {
            break;
        }
        let logits = {
            let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(parts.len());
            let mut it = parts.iter().peekable();
            for (i, s) in seqs.iter_mut().enumerate() {
                if let Some(&&(j, n)) = it.peek() {
                    if i == j {
                        batch.push((&mut **s, &pending[i][..n]));
                        it.next();
                    }
                }
            }
            // Skip the output head when every sequence in this step is mid-prefill.
            let which = if parts.iter().any(|&(i, n)| n == pending[i].len()) {
                LogitsFor::Last
            } else {
                LogitsFor::None
            };
            engine.step(&mut batch, which)?
        };
        let mut logits = logits.into_iter();
        for &(i, n) in &parts {
            let l = logits.next();
            pending[i].drain(..n);
            if !pending[i].is_empty() {
                continue; // mid-prefill: these logits are not the prompt's last
            }
            let l = l.ok_or_else(|| Error::Invalid("step returned no logits".into()))?;
            let row: Vec<f32> = l.squeeze(0)?.to_vec1()?;
            let o = &mut outs[i];
            let history: Vec<u32> = o.prompt_ids.iter().chain(&o.ids).copied().collect();
            let t = o.sampler.sample(&row, &history);
            if !params.ignore_eos && eos.contains(&t) {
                o.done = Some(FinishReason::Stop);
            } else {
                o.ids.push(t);
                pending[i] = vec![t];
                if o.ids.len() >= params.max_new_tokens || seqs[i].len() + 1 >= context {
                    o.done = Some(FinishReason::Length);
                }
            }
            let piece = o.update(tok, &params.stop_strings)?;
            if !piece.is_empty() {
                on_text(i, &piece);
            }
        }
    }
    Ok(outs
        .into_iter()
        .map(|o| Completion {
            prompt_ids: o.prompt_ids,
            token_ids: o.ids,
            text: o.text,
            finish_reason: o.done.unwrap_or(FinishReason::Length),
        })
        .collect())
}
