//! Perplexity as llama.cpp's `llama-perplexity` computes it, so figures are comparable: the text
//! is cut into non-overlapping windows of `ctx` tokens, each evaluated from an empty cache with
//! its first token replaced by BOS (when the model adds one), and only the second half of each
//! window is scored, so every scored token has at least `ctx / 2` tokens of context.

use crate::engine::{Engine, LogitsFor};
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
    engine: &mut Engine,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_window: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(Error::Invalid(format!("--ctx {ctx} must be at least 4")));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens, fewer than one window of --ctx {ctx}",
            tokens.len()
        )));
    }
    let step = engine.options().max_step_tokens.min(ctx);
    let first = ctx / 2;
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut running = Vec::with_capacity(windows);
    for w in 0..windows {
        let mut win = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = bos {
            win[0] = b;
        }
        let mut seq = engine.new_sequence()?;
        let mut pos = 0;
        while pos < ctx {
            // Rows before `first` are not scored: they go in steps of their own, which skip the
            // output head (for a large vocabulary, the costliest matmul of the window).
            let end = if pos < first { first } else { ctx };
            let n = step.min(end - pos);
            let which = if pos < first {
                LogitsFor::None
            } else {
                LogitsFor::All
            };
            let out = engine.step(&mut [(&mut seq, &win[pos..pos + n])], which)?;
            if which == LogitsFor::All {
                let rows: Vec<Vec<f32>> = out[0].to_vec2()?;
                for (k, row) in rows.iter().enumerate() {
                    let j = pos + k;
                    if j < first || j + 1 >= ctx {
                        continue;
                    }
                    nll -= log_softmax_at(row, win[j + 1] as usize);
                    scored += 1;
                }
            }
            pos += n;
        }
        drop(seq);
        let ppl = (nll / scored as f64).exp();
        running.push(ppl);
        on_window(w + 1, windows, ppl);
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
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
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
