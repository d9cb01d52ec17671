//! `airllm inspect`: a model's shape and the plan a session with the same options would make.

use airllm::session::Prepared;
use airllm::util::fmt_bytes;
use anyhow::Result;

use crate::args::{report_compressed, InspectArgs};

pub fn inspect(a: InspectArgs) -> Result<()> {
    let mut o = a.model.session_options(Some(&a.spec))?;
    let work = a.model.workload(None, a.batch, None);
    // The tokenizer is built as `run` builds it, to count what it holds; a folder without one
    // can still be inspected.
    let spec = a.model.model.as_deref();
    let mut p: Prepared = match Prepared::new(spec, &o) {
        Ok(p) => p,
        Err(e) => {
            o.tokenizer = false;
            let p = Prepared::new(spec, &o)?;
            eprintln!("note: no tokenizer counted in the plan ({e:#})");
            p
        }
    };
    p.size(&work)?;
    report_compressed(&p.compressed);
    if a.json {
        let e = &p.opts;
        let v = serde_json::json!({
            "model": p.info.dir.display().to_string(),
            "architecture": p.info.cfg.arch.hf_name(),
            "file_bytes": p.info.sizes.file_bytes,
            "layers": p.info.cfg.num_layers,
            "context": e.context,
            "sequences": e.max_batch,
            "tokens_per_sweep": e.max_step_tokens,
            "logit_rows": e.max_logit_rows,
            "kv_bytes_per_token": kv_per_token(&p.info.cfg),
            "kv_bytes_per_sequence": airllm::stream::plan::kv_bytes_per_seq(&p.info.cfg, e)
                - airllm::stream::plan::state_bytes_per_seq(&p.info.cfg, e),
            "state_bytes_per_sequence": airllm::stream::plan::state_bytes_per_seq(&p.info.cfg, e),
            "tokenizer_bytes": p.tok_bytes,
            "draft_bytes": p.draft_bytes,
            "plan": p.plan()?,
        });
        println!("{v}");
        return Ok(());
    }
    let c = &p.info.cfg;
    let s = &p.info.sizes;
    println!("model:        {}", p.info.dir.display());
    println!("architecture: {}", c.arch.hf_name());
    println!(
        "parameters:   {} ({:.2} B)",
        s.params,
        s.params as f64 / 1e9
    );
    println!(
        "dtype:        {} (declared: {})",
        s.dtypes.join(", "),
        c.declared_dtype.as_deref().unwrap_or("none")
    );
    println!("on disk:      {}", fmt_bytes(s.file_bytes));
    println!(
        "layers:       {} × {} on disk, {} as held",
        c.num_layers,
        fmt_bytes(s.layer_file_bytes),
        fmt_bytes(s.layer_bytes)
    );
    println!(
        "shape:        hidden {}, intermediate {}, heads {} (kv {}), head_dim {}, vocab {}",
        c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    let windows: Vec<String> = c
        .layer_windows
        .iter()
        .enumerate()
        .map(|(l, w)| match w {
            _ if c.is_linear(l) => "linear".into(),
            Some(w) => w.to_string(),
            None => "full".into(),
        })
        .collect();
    println!("attention:    {}", windows.join(" "));
    let kv = match &c.mla {
        Some(m) => format!(
            "latent: {} + {} RoPE values per token and layer (q_lora_rank {}, v_head_dim {})",
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            m.q_lora_rank.map_or("none".into(), |r| r.to_string()),
            m.v_head_dim
        ),
        None => format!(
            "keys and values: 2 × {} heads × {}",
            c.num_kv_heads, c.head_dim
        ),
    };
    let e = &p.opts;
    let states = airllm::stream::plan::state_bytes_per_seq(c, e);
    let kv_seq = airllm::stream::plan::kv_bytes_per_seq(c, e) - states;
    println!(
        "kv cache:     {} per token ({} × {} layers, f32); {} per sequence at context {}",
        fmt_bytes(kv_per_token(c)),
        kv,
        c.num_layers
            - c.linear
                .as_ref()
                .map_or(0, |l| l.layers.iter().filter(|&&x| x).count()),
        fmt_bytes(kv_seq),
        e.context
    );
    if let Some(l) = &c.linear {
        let n = l.layers.iter().filter(|&&x| x).count();
        println!(
            "states:       {} per sequence, whatever the context ({} Gated DeltaNet layers: {} value heads × {} × {} state, conv window {} × {}{})",
            fmt_bytes(states),
            n,
            l.value_heads,
            l.key_dim,
            l.value_dim,
            l.conv_kernel - 1,
            l.conv_dim(),
            if e.rollback_rows > 1 {
                format!(", and a journal of {} rows to take guesses back", e.rollback_rows)
            } else {
                String::new()
            }
        );
    }
    println!("rope:         {:?}", c.rope);
    println!("tied head:    {}", c.tie_word_embeddings);
    println!(
        "workload:     context {}, {} sequence(s), {} tokens per sweep; tokenizer {}{}",
        e.context,
        e.max_batch,
        e.max_step_tokens,
        fmt_bytes(p.tok_bytes),
        if p.draft_bytes > 0 {
            format!(", draft {}", fmt_bytes(p.draft_bytes))
        } else {
            String::new()
        }
    );
    println!("{}", p.plan()?);
    Ok(())
}

/// Bytes of cache one token takes in full-attention layers (sliding ones stop growing at
/// their window; linear ones keep a fixed state instead).
fn kv_per_token(c: &airllm::config::ModelConfig) -> u64 {
    let attn = (0..c.num_layers).filter(|&l| !c.is_linear(l)).count();
    (c.kv_values_per_token() * 4 * attn) as u64
}
