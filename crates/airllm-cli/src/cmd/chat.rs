//! `airllm chat`: an interactive chat that keeps the conversation and its cache between turns.

use std::io::{BufRead, Write};
use std::time::Instant;

use airllm::chat::{ChatTemplate, Message};
use airllm::generate::{Caches, Event, Request};
use airllm::session::Hook;
use anyhow::{bail, Result};

use crate::args::{prepare, start, ChatArgs};
use crate::report;

pub fn chat(a: ChatArgs) -> Result<()> {
    let o = a.model.session_options(Some(&a.spec))?;
    let prep = prepare(&a.model, &o)?;
    if prep.tok.as_ref().is_none_or(|t| t.chat_template.is_none()) {
        bail!("this model has no chat_template in tokenizer_config.json");
    }
    let gp = a.sample.params(a.max_new_tokens)?;
    let mut s = start(prep, &a.model.workload(None, 1, None))?;
    a.sample.report_seed(&gp);
    let Some(tok) = s.tokenizer().cloned() else {
        bail!("internal error: a chat session without a tokenizer");
    };
    let template = ChatTemplate::of(&tok)?;
    let mut messages: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    // The conversation's sequence between turns, and the token ids whose keys and values it
    // holds, to reuse the shared prefix each turn.
    let mut seq: Option<Caches> = None;
    let mut cached: Vec<u32> = Vec::new();
    eprintln!("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let prompt = template.prompt(&tok, &messages)?;
        let keep = cached
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        let (resume, resume_draft) = match seq.take() {
            Some(c) => (Some((c.seq, keep)), c.draft),
            None => (None, None),
        };
        let req = Request {
            resume,
            resume_draft,
            ..Request::new(prompt.clone(), gp.clone())
        };
        let mut stdout = std::io::stdout();
        let t = Instant::now();
        let out = s.run(vec![req], |h| {
            if let Hook::Event(_, Event::Tokens { text, .. }) = h {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Ok(())
        });
        let (c, caches) = match out {
            Ok(mut list) => list.remove(0),
            Err(e) => {
                // A failed step leaves the cache half-written: drop this turn, start the next
                // from an empty cache, and keep the REPL alive.
                eprintln!("error: {e}");
                messages.pop();
                cached.clear();
                continue;
            }
        };
        println!();
        report::summary(s.engine(), c.token_ids.len(), t.elapsed());
        report::speculation(s.scheduler());
        seq = Some(caches);
        cached = prompt;
        cached.extend(&c.token_ids);
        // The last sampled token was never fed through the model.
        cached.pop();
        messages.push(Message::new("assistant", &c.text));
    }
    if a.model.profile {
        report::profile(s.engine());
    }
    Ok(())
}
