//! `airllm chat`: an interactive chat that keeps the conversation and its cache between turns.

use std::io::{BufRead, Write};
use std::time::Instant;

use airllm::chat::{ChatTemplate, Harmony, Message};
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
    // GPT-OSS's harmony format: the reasoning goes to stderr (dimmed on a terminal), the
    // answer to stdout.
    let harmony = Harmony::of(&tok);
    let dim = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut kwargs = serde_json::Map::new();
    if let Some(e) = &a.reasoning_effort {
        kwargs.insert("reasoning_effort".into(), serde_json::json!(e));
    }
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
        let prompt = tok.encode_special(&template.render_with(&messages, &kwargs)?)?;
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
        let (mut ids, mut shown) = (Vec::new(), (0usize, 0usize));
        let hide = a.hide_reasoning;
        let out = s.run(vec![req], |h| {
            if let Hook::Event(_, Event::Tokens { text, tokens, .. }) = h {
                let Some(hm) = &harmony else {
                    let _ = stdout.write_all(text.as_bytes());
                    let _ = stdout.flush();
                    return Ok(());
                };
                ids.extend_from_slice(tokens);
                let split = hm.split(&tok, &ids)?;
                let fresh = |all: &str, at: &mut usize| {
                    let safe = all.trim_end_matches('\u{FFFD}').len();
                    let new = all.get(*at..safe).unwrap_or_default().to_string();
                    *at = (*at).max(safe);
                    new
                };
                let r = fresh(&split.reasoning, &mut shown.0);
                if !r.is_empty() && !hide {
                    let (on, off) = if dim {
                        ("\x1b[2m", "\x1b[0m")
                    } else {
                        ("", "")
                    };
                    eprint!("{on}{r}{off}");
                }
                let c = fresh(&split.content, &mut shown.1);
                if !c.is_empty() {
                    if shown.0 > 0 && shown.1 == c.len() && !hide {
                        eprintln!();
                    }
                    let _ = stdout.write_all(c.as_bytes());
                    let _ = stdout.flush();
                }
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
        let reply = match &harmony {
            Some(h) => {
                let split = h.split(&tok, &c.token_ids)?;
                Message::new("assistant", &split.content).with_thinking(Some(split.reasoning))
            }
            None => Message::new("assistant", &c.text),
        };
        messages.push(reply);
    }
    if a.model.profile {
        report::profile(s.engine());
    }
    Ok(())
}
