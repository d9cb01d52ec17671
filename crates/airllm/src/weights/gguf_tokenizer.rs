//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata, reproducing
//! llama.cpp's tokenization.
//!
//! - `llama` (SentencePiece): llama.cpp merges adjacent pieces by the score of the merged piece,
//!   with byte fallback. That is a BPE whose merges are every split of every vocabulary piece
//!   into two vocabulary pieces, ranked by the merged piece's score, applied to the whole text
//!   with spaces written as `▁`.
//! - `gpt2` (byte-level BPE): the stored merges, with the pre-tokenizer regex llama.cpp uses for
//!   the file's `tokenizer.ggml.pre`.
//!
//! Control and user-defined tokens become special added tokens, matched in the text as llama.cpp
//! does when it parses special tokens.

use serde_json::{json, Value as J};

use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, Value};

const NORMAL: u64 = 1;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The pre-tokenizer regexes llama.cpp uses for a `gpt2` file's `tokenizer.ggml.pre`, applied
/// one after another (each splits the pieces the one before left, keeping both sides), as
/// llama.cpp's `unicode_regex_split` does.
fn gpt2_regexes(pre: &str) -> Option<&'static [&'static str]> {
    Some(match pre {
        "gpt2" | "default" | "gpt-2" => {
            &[r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]
        }
        "qwen2" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "llama-bpe" | "llama3" => &[
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        // DeepSeek-V2 and the first DeepSeek LLMs (the character classes are DeepSeek's).
        "deepseek-llm" => DSLLM,
        // DeepSeek-V3/R1.
        "deepseek-v3" => DSV3,
        // GLM-4 and GLM-4.5.
        "glm4" | "glm5" | "chatglm-bpe" => GLM4,
        // Kimi K2 (tiktoken's pattern; Han runs apart from other letters).
        "kimi-k2" => &[
            r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        // GPT-OSS's o200k_harmony and GPT-4o's o200k (tokenizer.json's pattern).
        "gpt-4o" | "minimax-m2" => &[
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        _ => return None,
    })
}

const DSLLM: &[&str] = &[
            "[\r\n]",
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
            "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
            "\\s+$",
            "[一-龥ࠀ-一가-퟿]+",
            "\\p{N}+",
        ];
const DSV3: &[&str] = &[
            "\\p{N}{1,3}",
            "[一-龥぀-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ];
const GLM4: &[&str] = &[
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        ];

/// Builds the tokenizer, and returns it with the BOS and EOS/EOT ids llama.cpp would use.
pub fn from_gguf(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let path = &g.path;
    let field = |k: &str| {
        Error::config(
            path,
            k,
            "required tokenizer metadata is missing or malformed",
        )
    };
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| field("tokenizer.ggml.model"))?;
    let tokens: Vec<&str> = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| field("tokenizer.ggml.tokens"))?
        .iter()
        .map(|t| t.as_str())
        .collect::<Option<_>>()
        .ok_or_else(|| field("tokenizer.ggml.tokens"))?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|t| t.as_u64().unwrap_or(NORMAL)).collect(),
        None => vec![NORMAL; tokens.len()],
    };
    let id_of = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let flag = |k: &str| g.get(k).and_then(Value::as_bool);

    // The BPE model is built directly rather than through JSON: deserialising a 262k vocabulary
    // and 500k merges goes through serde's buffered representation and left ~300 MB resident.
    let mut vocab: ahash::AHashMap<String, u32> = ahash::AHashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // Keep the first id of a duplicated piece, as llama.cpp's lookup does.
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    let added: Vec<tokenizers::AddedToken> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match types.get(i) {
            // Control tokens are skipped when decoding; user-defined ones (Gemma's runs of
            // newlines and tabs, say) are text.
            Some(&CONTROL) => Some(tokenizers::AddedToken::from(t.to_string(), true)),
            Some(&USER_DEFINED) => Some(tokenizers::AddedToken::from(t.to_string(), false)),
            _ => None,
        })
        .collect();

    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let bos = id_of("tokenizer.ggml.bos_token_id").filter(|&b| b < tokens.len());
    let eos = id_of("tokenizer.ggml.eos_token_id").filter(|&b| b < tokens.len());
    let mut single = vec![];
    let mut special_tokens = serde_json::Map::new();
    if let (true, Some(b)) = (add_bos, bos) {
        single.push(json!({"SpecialToken": {"id": tokens[b], "type_id": 0}}));
        special_tokens.insert(
            tokens[b].to_string(),
            json!({"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}),
        );
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let (true, Some(e)) = (add_eos, eos) {
        single.push(json!({"SpecialToken": {"id": tokens[e], "type_id": 0}}));
        special_tokens.insert(
            tokens[e].to_string(),
            json!({"id": tokens[e], "ids": [e], "tokens": [tokens[e]]}),
        );
    }
    let post = json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special_tokens});

    let (spec, merges, unk, byte_fallback): (J, Vec<(String, String)>, Option<String>, bool) =
        match model {
            "llama" => {
                let scores: Vec<f64> =
                    match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                        Some(a) => a.iter().map(|s| s.as_f64().unwrap_or(0.0)).collect(),
                        None => return Err(field("tokenizer.ggml.scores")),
                    };
                // Candidate merges as (score, piece, split point): 16 bytes each, since there
                // are half a million of them for a 262k vocabulary.
                let mut cand: Vec<(f64, u32, u32)> = Vec::new();
                for (i, piece) in tokens.iter().enumerate() {
                    if types.get(i) != Some(&NORMAL) {
                        continue;
                    }
                    for (k, _) in piece.char_indices().skip(1) {
                        let (l, r) = piece.split_at(k);
                        if vocab.contains_key(l) && vocab.contains_key(r) {
                            cand.push((scores.get(i).copied().unwrap_or(0.0), i as u32, k as u32));
                        }
                    }
                }
                drop(scores);
                // Higher score merges first; for the same merged piece, the split llama.cpp would
                // reach first (the left piece longest) goes first.
                cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.2.cmp(&a.2)));
                let merges: Vec<(String, String)> = cand
                    .iter()
                    .map(|&(_, i, k)| {
                        let (l, r) = tokens[i as usize].split_at(k as usize);
                        (l.to_string(), r.to_string())
                    })
                    .collect();
                drop(cand);
                let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut norm = vec![];
                if space_prefix {
                    norm.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if space_prefix {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let unk = id_of("tokenizer.ggml.unknown_token_id")
                    .and_then(|u| tokens.get(u))
                    .map(|s| s.to_string());
                (
                    json!({
                        "version": "1.0", "truncation": null, "padding": null,
                        "added_tokens": [],
                        "normalizer": {"type": "Sequence", "normalizers": norm},
                        "pre_tokenizer": null,
                        "post_processor": post,
                        "decoder": {"type": "Sequence", "decoders": dec},
                        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                                  "ignore_merges": false, "vocab": {}, "merges": []}
                    }),
                    merges,
                    unk,
                    true,
                )
            }
            "gpt2" => {
                let pre = g
                    .get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let regexes = gpt2_regexes(pre).ok_or_else(|| {
                    Error::config(
                        path,
                        "tokenizer.ggml.pre",
                        format!(
                            "`{pre}` is not supported (supported: gpt2, default, qwen2, llama-bpe, deepseek-llm, deepseek-v3, glm4, kimi-k2)"
                        ),
                    )
                })?;
                let mut pretokenizers: Vec<J> = regexes
                    .iter()
                    .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
                    .collect();
                pretokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
                let merges: Vec<(String, String)> = g
                    .get("tokenizer.ggml.merges")
                    .and_then(Value::as_array)
                    .ok_or_else(|| field("tokenizer.ggml.merges"))?
                    .iter()
                    .map(|m| {
                        let m = m.as_str().unwrap_or("");
                        let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                        (a.to_string(), b.to_string())
                    })
                    .collect();
                (
                    json!({
                        "version": "1.0", "truncation": null, "padding": null,
                        "added_tokens": [],
                        "normalizer": null,
                        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
                        "post_processor": post,
                        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
                        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                                  "ignore_merges": false, "vocab": {}, "merges": []}
                    }),
                    merges,
                    None,
                    false,
                )
            }
            other => {
                return Err(Error::config(
                    path,
                    "tokenizer.ggml.model",
                    format!("`{other}` is not supported (supported: llama, gpt2)"),
                ))
            }
        };
    let mut builder = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(byte_fallback)
        .fuse_unk(byte_fallback);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(|e| {
        Error::file(
            path,
            format!("cannot build the tokenizer from metadata: {e}"),
        )
    })?;
    let text = serde_json::to_string(&spec).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = text.parse::<tokenizers::Tokenizer>().map_err(|e| {
        Error::file(
            path,
            format!("cannot build the tokenizer from metadata: {e}"),
        )
    })?;
    tok.with_model(bpe);
    // Added after the model is in place, so each takes its vocabulary id.
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
    tok.add_tokens(plain)
        .map_err(|e| Error::file(path, format!("cannot add tokens: {e}")))?;
    tok.add_special_tokens(special)
        .map_err(|e| Error::file(path, format!("cannot add special tokens: {e}")))?;
    Ok(tok)
}

/// Ids that end generation: EOS, EOT, and the end-of-turn pieces llama.cpp also stops on.
pub fn stop_ids(g: &GgufFile) -> Vec<u32> {
    let mut ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| g.get(k).and_then(Value::as_u64).map(|v| v as u32))
        .collect();
    if let Some(tokens) = g.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        // In GPT-OSS's harmony vocabulary `<|end|>` closes a message (the reasoning, say) and
        // the turn goes on; `<|return|>` and `<|call|>` end it, as llama.cpp has it.
        let harmony = tokens.iter().any(|t| t.as_str() == Some("<|return|>"));
        for (i, t) in tokens.iter().enumerate() {
            match t.as_str() {
                Some("<end_of_turn>" | "<|eot_id|>" | "<|im_end|>" | "<|endoftext|>") => {}
                Some("<|end|>") if !harmony => {}
                Some("<|return|>" | "<|call|>") => {}
                _ => continue,
            }
            ids.push(i as u32);
        }
        if harmony {
            ids.retain(|&i| tokens.get(i as usize).and_then(Value::as_str) != Some("<|end|>"));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}
