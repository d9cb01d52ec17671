//! Text in and out: the model's `tokenizer.json`, the BOS rule from `tokenizer_config.json`, the
//! EOS ids from `generation_config.json`, and the chat template.

use std::path::Path;

use serde_json::Value;

use crate::config::token_ids;
use crate::error::{Error, Result};

pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    /// `add_bos_token` from tokenizer_config.json, where it applies.
    add_bos: Option<bool>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

/// Special tokens are written as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// The tokenizer of a model folder or a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        if crate::weights::is_gguf(path) {
            Self::from_gguf(&crate::weights::gguf::GgufFile::open(path)?)
        } else {
            Self::from_dir(path)
        }
    }

    /// Built from the file's `tokenizer.ggml.*` metadata; the template from
    /// `tokenizer.chat_template`.
    pub fn from_gguf(g: &crate::weights::gguf::GgufFile) -> Result<Self> {
        use crate::weights::gguf::Value as V;
        let tok = crate::weights::gguf_tokenizer::from_gguf(g)?;
        // Building a large vocabulary leaves hundreds of thousands of small freed allocations;
        // hand the freed heap back so it does not count against the process for its life.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::malloc_trim(0);
        }
        let piece = |k: &str| {
            g.get(k)
                .and_then(V::as_u64)
                .and_then(|id| tok.id_to_token(id as u32))
        };
        Ok(TextTokenizer {
            bos_token: piece("tokenizer.ggml.bos_token_id"),
            eos_token: piece("tokenizer.ggml.eos_token_id"),
            bos_id: g
                .get("tokenizer.ggml.bos_token_id")
                .and_then(V::as_u64)
                .map(|v| v as u32),
            eos_ids: crate::weights::gguf_tokenizer::stop_ids(g),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(V::as_str)
                .map(str::to_string)
                .or_else(|| builtin_template(g.arch().ok()?)),
            add_bos: None,
            tok,
        })
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::file(
                &path,
                "missing (the model folder needs a tokenizer.json)",
            ));
        }
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::file(&path, format!("cannot load tokenizer: {e}")))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);

        let bos_token = token_text(tc.get("bos_token"));
        let eos_token = token_text(tc.get("eos_token"));
        let bos_id = token_ids(gen.get("bos_token_id"))
            .first()
            .copied()
            .or_else(|| token_ids(cfg.get("bos_token_id")).first().copied())
            .or_else(|| bos_token.as_deref().and_then(|t| tok.token_to_id(t)));
        let mut eos_ids = token_ids(gen.get("eos_token_id"));
        if eos_ids.is_empty() {
            eos_ids = token_ids(cfg.get("eos_token_id"));
        }
        if eos_ids.is_empty() {
            eos_ids.extend(eos_token.as_deref().and_then(|t| tok.token_to_id(t)));
        }
        // transformers 5 writes the template to its own file; older versions inline it, either
        // as a string or as a list of named templates.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| Error::file(&jinja, format!("cannot read: {e}")))?,
            )
        } else {
            match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        // transformers 5 takes BOS from tokenizer.json's post-processor and ignores
        // `add_bos_token` when one exists; with none, the flag decides, as it did in 4.x.
        let add_bos = if tok.get_post_processor().is_none() {
            tc.get("add_bos_token").and_then(|b| b.as_bool())
        } else {
            None
        };
        Ok(TextTokenizer {
            tok,
            add_bos,
            bos_token,
            eos_token,
            bos_id,
            eos_ids,
            chat_template,
        })
    }

    /// Tokenizes a plain prompt. The tokenizer's post-processor adds BOS where the model wants it;
    /// `add_bos_token: true` in tokenizer_config.json adds it where tokenizer.json has none.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text, true)?;
        if self.add_bos == Some(true) {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Tokenizes text that already holds its special tokens (a rendered chat template).
    pub fn encode_special(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_raw(text, false)
    }

    fn encode_raw(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tok
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Decodes with special tokens kept as text, as transformers' `decode` does by default.
    pub fn decode_special(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Writes the tokenizer as a `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.tok
            .save(path, false)
            .map_err(|e| Error::file(path, format!("cannot write tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The id of a token given by its text (a special token's, say).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// How `other` differs from this tokenizer, if it does: the vocabulary (every token's
    /// text and id) and the special ids generation depends on. A draft model must match, or
    /// its guesses would mean other text.
    pub fn difference(&self, other: &TextTokenizer) -> Option<String> {
        let (a, b) = (self.tok.get_vocab(true), other.tok.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens against {}", b.len(), a.len()));
        }
        let mut diff: Vec<(&String, &u32)> =
            a.iter().filter(|(t, id)| b.get(*t) != Some(id)).collect();
        diff.sort_by_key(|(_, id)| **id);
        if let Some((t, id)) = diff.first() {
            return Some(match b.get(*t) {
                Some(other) => format!("token {t:?} is id {other}, not {id}"),
                None => format!("it lacks token {t:?} (id {id})"),
            });
        }
        if self.eos_ids != other.eos_ids {
            return Some(format!(
                "its end-of-sequence ids are {:?}, not {:?}",
                other.eos_ids, self.eos_ids
            ));
        }
        if self.bos_id != other.bos_id {
            return Some(format!(
                "its beginning-of-sequence id is {:?}, not {:?}",
                other.bos_id, self.bos_id
            ));
        }
        None
    }
}

/// Templates for files that carry none, as llama.cpp has built in. Gemma has no system role, so a
/// system message is sent as a user turn.
fn builtin_template(arch: &str) -> Option<String> {
    match arch {
        "gemma3" => Some(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}\
             {% else %}{% set role = 'user' %}{% endif %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}\
             <end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
                .to_string(),
        ),
        _ => None,
    }
}
