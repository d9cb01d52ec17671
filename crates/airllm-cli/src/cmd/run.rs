//! `airllm run`: generate from one or more prompts, batched in one sweep per token.

use std::io::Write;
use std::time::Instant;

use airllm::chat::{ChatTemplate, Message};
use anyhow::Result;

use crate::args::{prepare, start, RunArgs};
use crate::report;

pub fn run(a: RunArgs) -> Result<()> {
    let o = a.model.session_options(Some(&a.spec))?;
    // The tokenizer comes with the session; the prompts' lengths size its workload, so the
    // model's plan is made once they are known.
    let prep = prepare(&a.model, &o)?;
    let tok = prep
        .tok
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("internal error: no tokenizer"))?;
    let prompts: Vec<Vec<u32>> = a
        .prompt
        .iter()
        .map(|p| {
            if a.chat {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", p));
                Ok(ChatTemplate::of(tok)?.prompt(tok, &msgs)?)
            } else {
                tok.encode(p)
            }
        })
        .collect::<airllm::Result<_>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let total = prompts.iter().map(Vec::len).sum();
    let gp = a.sample.params(a.max_new_tokens)?;
    let context = longest.saturating_add(a.max_new_tokens).saturating_add(1);
    let work = a.model.workload(Some(context), prompts.len(), Some(total));
    let mut s = start(prep, &work)?;
    a.sample.report_seed(&gp);
    let t = Instant::now();
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let out = s.generate(&prompts, &gp, |i, piece| {
        // The first prompt streams live; the others print when the batch is done.
        if stream && i == 0 {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let elapsed = t.elapsed();
    let mut stdout = std::io::stdout().lock();
    for (i, (c, p)) in out.iter().zip(&a.prompt).enumerate() {
        if a.json {
            let obj = serde_json::json!({
                "prompt": p,
                "prompt_token_ids": c.prompt_ids,
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason.as_str(),
            });
            writeln!(stdout, "{obj}")?;
        } else if i == 0 {
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{}", c.text)?;
        }
    }
    let generated: usize = out.iter().map(|c| c.token_ids.len()).sum();
    report::summary(s.engine(), generated, elapsed);
    report::speculation(s.scheduler());
    if a.model.profile {
        report::profile(s.engine());
    }
    Ok(())
}
