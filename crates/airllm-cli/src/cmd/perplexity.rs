//! `airllm perplexity`: a text file scored as llama.cpp's llama-perplexity scores it.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::args::{prepare, start, PerplexityArgs};
use crate::report;

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    // `-c/--ctx-size` means the window here, as in llama-perplexity.
    let ctx = a.model.ctx_size.unwrap_or(a.ctx);
    let o = a.model.session_options(None)?;
    let prep = prepare(&a.model, &o)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("{}: cannot read", a.file.display()))?;
    let tok = prep.tok.as_ref().context("internal error: no tokenizer")?;
    let mut tokens = tok.encode(&text)?;
    // As llama.cpp: BOS replaces each window's first token when the model adds BOS.
    let bos = tok.bos_id.filter(|b| tokens.first() == Some(b));
    if let Some(n) = a.chunks {
        tokens.truncate(n * ctx);
    }
    let work = airllm::Workload {
        context: Some(ctx),
        score_prompts: true,
        ..a.model.workload(Some(ctx), 1, None)
    };
    let mut s = start(prep, &work)?;
    eprintln!(
        "{} tokens, {} windows of {}",
        tokens.len(),
        tokens.len() / ctx,
        ctx
    );
    let t = Instant::now();
    let r = s.perplexity(&tokens, ctx, bos, |i, n, p| {
        eprint!("[{i}/{n}] {p:.4} ");
    })?;
    eprintln!();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = serde_json::json!(secs);
        v["tokens_per_s"] = serde_json::json!((r.windows * r.ctx) as f64 / secs.max(1e-9));
        println!("{v}");
    } else {
        println!(
            "perplexity {:.4} over {} windows of {} tokens ({} scored) in {:.1} s",
            r.ppl, r.windows, r.ctx, r.scored, secs
        );
    }
    if a.model.profile {
        report::profile(s.engine());
    }
    Ok(())
}
