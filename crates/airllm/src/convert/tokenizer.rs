//! Tokenizers across formats: a `tokenizer.json` into llama.cpp's `tokenizer.ggml.*` keys, and a
//! GGUF vocabulary back into `tokenizer.json` and its companion files.

use std::path::Path;

use serde_json::{json, Value as J};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;
use crate::weights::gguf::Value;

// llama.cpp token types.
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const UNUSED: i64 = 5;
const BYTE: i64 = 6;

/// All regex patterns inside a pre-tokenizer description.
fn regexes(v: &J, out: &mut Vec<String>) {
    match v {
        J::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("Regex", J::String(s)) => out.push(s.clone()),
                    _ => regexes(x, out),
                }
            }
        }
        J::Array(a) => a.iter().for_each(|x| regexes(x, out)),
        _ => {}
    }
}

/// The `tokenizer.ggml.pre` name for a byte-level pre-tokenizer, judged by its split regex.
fn pre_name(path: &Path, pre: &J) -> Result<&'static str> {
    let mut rx = Vec::new();
    regexes(pre, &mut rx);
    let text = pre.to_string();
    Ok(match rx.first().map(String::as_str) {
        Some(r) if r.contains(r"\p{N}{1,3}") => "llama-bpe",
        Some(r) if r.contains(r"\p{L}+|\p{N}") => "qwen2",
        None if text.contains("\"ByteLevel\"") && text.contains("\"use_regex\":true") => "gpt-2",
        _ => {
            return Err(Error::file(
                path,
                "pre_tokenizer: this split pattern has no llama.cpp equivalent we know (supported: GPT-2, Llama 3, Qwen2 patterns)",
            ))
        }
    })
}

/// `tokenizer.ggml.*` metadata for the model folder `dir`.
pub fn gguf_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
    let j: J = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let model = &j["model"];
    match model["type"].as_str() {
        Some("BPE") => {}
        other => {
            return Err(Error::file(
                &path,
                format!(
                    "model.type {:?} cannot be converted yet (supported: BPE)",
                    other.unwrap_or("missing")
                ),
            ))
        }
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::file(&path, "model.vocab is missing"))?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![NORMAL; n];
    let mut place = |piece: &str, id: u64, ty: Option<i64>| -> Result<()> {
        let i = id as usize;
        if i >= n {
            return Err(Error::file(
                &path,
                format!("token {piece:?} has id {i}, beyond the model's vocab_size {n}"),
            ));
        }
        tokens[i] = Some(piece.to_string());
        if let Some(t) = ty {
            types[i] = t;
        }
        Ok(())
    };
    for (piece, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::file(&path, format!("model.vocab[{piece:?}] is not an id")))?;
        place(piece, id, None)?;
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(Error::file(
                &path,
                "added_tokens: an entry lacks id or content",
            ));
        };
        let special = a["special"].as_bool().unwrap_or(false);
        place(c, id, Some(if special { CONTROL } else { USER_DEFINED }))?;
    }
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let unk = model["unk_token"].as_str();
    for (i, t) in tokens.iter().enumerate() {
        let Some(t) = t else {
            types[i] = UNUSED;
            continue;
        };
        if Some(t.as_str()) == unk {
            types[i] = UNKNOWN;
        } else if byte_fallback && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
            types[i] = BYTE;
        }
    }
    let merges: Vec<(String, String)> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            J::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            J::Array(p) if p.len() == 2 => {
                Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))
            }
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| Error::file(&path, "model.merges: an entry is not a pair"))?;

    let mut kv: Vec<(String, Value)> = Vec::new();
    let mut set = |k: &str, v: Value| kv.push((k.to_string(), v));
    if byte_fallback {
        // SentencePiece-style: llama.cpp merges the adjacent pair whose result scores highest,
        // so a merge's rank becomes its result's score.
        let mut scores = vec![None; n];
        for (rank, (a, b)) in merges.iter().enumerate() {
            if let Some(J::Number(id)) = vocab.get(&format!("{a}{b}")) {
                let i = id.as_u64().unwrap_or(0) as usize;
                if i < n && scores[i].is_none() {
                    scores[i] = Some(-(rank as f64));
                }
            }
        }
        // Pieces no merge produces come after every merge.
        let last = -(merges.len() as f64) - 1.0;
        let scores: Vec<Value> = tokens
            .iter()
            .zip(&scores)
            .map(|(t, s)| {
                let single = t.as_ref().is_some_and(|t| t.chars().count() == 1);
                Value::F(s.unwrap_or(if single { 0.0 } else { last }))
            })
            .collect();
        let prepend = j["normalizer"].to_string().contains("\"Prepend\"");
        set("tokenizer.ggml.model", Value::Str("llama".into()));
        set("tokenizer.ggml.pre", Value::Str("default".into()));
        set("tokenizer.ggml.scores", Value::Array(scores));
        set("tokenizer.ggml.add_space_prefix", Value::Bool(prepend));
    } else {
        let pre = pre_name(&path, &j["pre_tokenizer"])?;
        set("tokenizer.ggml.model", Value::Str("gpt2".into()));
        set("tokenizer.ggml.pre", Value::Str(pre.into()));
        set(
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|(a, b)| Value::Str(format!("{a} {b}")))
                    .collect(),
            ),
        );
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::Str(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    set("tokenizer.ggml.tokens", Value::Array(tokens));
    set(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I).collect()),
    );

    let tok = TextTokenizer::from_dir(dir)?;
    let bos = tok.bos_id.or(cfg.bos_token_id);
    if let Some(b) = bos {
        set("tokenizer.ggml.bos_token_id", Value::U(b as u64));
    }
    if let Some(&e) = cfg.eos_token_ids.first().or(tok.eos_ids.first()) {
        set("tokenizer.ggml.eos_token_id", Value::U(e as u64));
    }
    if let Some(u) = unk.and_then(|u| vocab.get(u)).and_then(J::as_u64) {
        set("tokenizer.ggml.unknown_token_id", Value::U(u));
    }
    let adds_bos = bos.is_some() && tok.encode("a")?.first().copied() == bos;
    set("tokenizer.ggml.add_bos_token", Value::Bool(adds_bos));
    set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    if let Some(t) = &tok.chat_template {
        set("tokenizer.chat_template", Value::Str(t.clone()));
    }
    Ok(kv)
}

/// Writes `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` and `config.json`
/// for the GGUF file `gguf` into `dir`.
pub fn write_hf_files(gguf: &Path, cfg: &ModelConfig, dir: &Path) -> Result<()> {
    let tok = TextTokenizer::open(gguf)?;
    let tj = dir.join("tokenizer.json");
    tok.save_json(&tj)?;
    let write = |name: &str, v: &J| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap())
            .map_err(|e| Error::file(&p, format!("write failed: {e}")))
    };
    let mut tc = json!({"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                        "model_max_length": cfg.max_position_embeddings});
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = json!(t);
    }
    write("tokenizer_config.json", &tc)?;
    let eos = if tok.eos_ids.is_empty() {
        cfg.eos_token_ids.clone()
    } else {
        tok.eos_ids.clone()
    };
    write(
        "generation_config.json",
        &json!({"bos_token_id": tok.bos_id, "eos_token_id": eos}),
    )?;
    let mut c = cfg.clone();
    c.eos_token_ids = eos;
    c.bos_token_id = tok.bos_id.or(c.bos_token_id);
    write("config.json", &c.to_hf_json("float32"))
}
