//! Perplexity as llama.cpp's `llama-perplexity` computes it, so figures are comparable: the text
//! is cut into non-overlapping windows of `ctx` tokens, each evaluated from an empty cache with
//! its first token replaced by BOS (when the model adds one), and only the second half of each
//! window is scored, so every scored token has at least `ctx / 2` tokens of context.

use super::{Event, GenerationParams, Hook, Request, Scheduler};
use crate::engine::Engine;
use crate::error::{Error, Result};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub windows: usize,
    /// Tokens scored over all windows.
    pub scored: usize,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub ppl: f64,
    /// Perplexity of the windows so far, after each window (llama.cpp prints the same).
    pub running: Vec<f64>,
}

/// Scores `tokens` (the whole text, tokenized once). `on_window(i, n, running_ppl)` reports
/// progress.
pub fn perplexity(
    sched: &mut Scheduler,
    engine: &mut Engine,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_window: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(Error::Invalid(format!(
            "context {ctx} must be at least 4 tokens"
        )));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    // Each window is a request that scores its second half and generates nothing; the
    // scheduler runs as many windows per sweep as the plan has sequences and logit rows.
    let first = ctx / 2;
    let reqs: Vec<Request> = (0..windows)
        .map(|w| {
            let mut win = tokens[w * ctx..(w + 1) * ctx].to_vec();
            if let Some(b) = bos {
                win[0] = b;
            }
            let params = GenerationParams {
                max_new_tokens: 0,
                ..Default::default()
            };
            Request {
                score_from: Some(first),
                ..Request::new(win, params)
            }
        })
        .collect();
    let mut per_window: Vec<Option<Vec<f64>>> = vec![None; windows];
    let (mut nll, mut scored, mut next) = (0f64, 0usize, 0usize);
    let mut running = Vec::with_capacity(windows);
    sched.run(engine, None, reqs, |h| {
        if let Hook::Event(w, Event::Done { completion, .. }) = h {
            per_window[w] = Some(completion.prompt_logprobs.clone());
        }
        // Windows are reported in order, as they complete.
        while let Some(Some(lps)) = per_window.get(next) {
            nll -= lps.iter().sum::<f64>();
            scored += lps.len();
            let ppl = (nll / scored as f64).exp();
            running.push(ppl);
            next += 1;
            on_window(next, windows, ppl);
        }
        Ok(())
    })?;
    if next < windows {
        return Err(Error::Internal("a window was never scored".into()));
    }
    let mean = nll / scored as f64;
    Ok(PerplexityReport {
        ctx,
        windows,
        scored,
        nll: mean,
        ppl: mean.exp(),
        running,
    })
}

/// log softmax(row)[i], in f64.
pub(crate) fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    row[i] as f64 - super::sampling::log_sum_exp(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_uniform_row() {
        let row = vec![0.5f32; 4];
        assert!((log_softmax_at(&row, 2) - (0.25f64).ln()).abs() < 1e-12);
    }
}
