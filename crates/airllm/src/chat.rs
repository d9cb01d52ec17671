//! Chat templates: the model's Jinja template rendered with minijinja, with the Python string
//! methods and helpers that Hugging Face templates rely on.

use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's reasoning, which templates that keep it apart (GPT-OSS's harmony
    /// `analysis` channel) read as `thinking`; absent from the template's view when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            thinking: None,
        }
    }
    /// The same message with its reasoning.
    pub fn with_thinking(mut self, thinking: Option<String>) -> Self {
        self.thinking = thinking.filter(|t| !t.is_empty());
        self
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    /// The date `strftime_now` gives, when fixed (for reproducible prompts); else today's.
    today: Option<(i64, u32, u32)>,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_on(&fmt, today())
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.unwrap_or_default().to_string(),
            today: None,
        })
    }

    /// Fixes the date templates print (`strftime_now`), as (year, month, day).
    pub fn set_today(&mut self, date: (i64, u32, u32)) {
        self.today = Some(date);
    }

    /// Renders the conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        self.render_with(messages, &serde_json::Map::new())
    }

    /// [`Self::render`] with more variables for the template, as transformers'
    /// `apply_chat_template(**kwargs)` passes them (`reasoning_effort` for GPT-OSS,
    /// `enable_thinking` for Qwen3).
    pub fn render_with(
        &self,
        messages: &[Message],
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let extra = minijinja::Value::from_serialize(kwargs);
        // A fixed date shadows the global `strftime_now`.
        let fixed = match self.today {
            Some(d) => minijinja::context! {
                strftime_now => minijinja::Value::from_function(move |fmt: String| -> String {
                    strftime_on(&fmt, d)
                })
            },
            None => minijinja::context! {},
        };
        let base = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        };
        t.render(minijinja::value::merge_maps([base, fixed, extra]))
            .map_err(|e| Error::Template(e.to_string()))
    }
}

impl ChatTemplate {
    /// The template of a model's tokenizer, with its BOS and EOS texts.
    pub fn of(tok: &crate::tokenizer::TextTokenizer) -> Result<Self> {
        let src = tok.chat_template.as_deref().ok_or_else(|| {
            Error::Template(
                "this model has none (no chat_template in tokenizer_config.json or chat_template.jinja, no tokenizer.chat_template in the GGUF)".into(),
            )
        })?;
        ChatTemplate::new(src, tok.bos_token.as_deref(), tok.eos_token.as_deref())
    }

    /// The conversation rendered and tokenized, the assistant's turn opened.
    pub fn prompt(
        &self,
        tok: &crate::tokenizer::TextTokenizer,
        messages: &[Message],
    ) -> Result<Vec<u32>> {
        tok.encode_special(&self.render(messages)?)
    }
}

/// GPT-OSS's harmony format on the output side: a turn is messages
/// `<|channel|>NAME<|message|>TEXT<|end|>`, each after `<|start|>assistant`, and the turn ends
/// with `<|return|>` (or `<|call|>` for a tool call). The `analysis` channel is the model's
/// reasoning; the others (`final`, `commentary`) are the answer.
pub struct Harmony {
    start: u32,
    channel: u32,
    message: u32,
    ends: [u32; 3],
}

/// Generated text split into the reasoning and the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Harmony {
    /// The format's tokens in this vocabulary, if it has them all.
    pub fn of(tok: &crate::tokenizer::TextTokenizer) -> Option<Self> {
        let id = |t: &str| tok.token_id(t);
        Some(Harmony {
            start: id("<|start|>")?,
            channel: id("<|channel|>")?,
            message: id("<|message|>")?,
            ends: [id("<|end|>")?, id("<|return|>")?, id("<|call|>")?],
        })
    }

    /// Splits generated ids (what follows the prompt's `<|start|>assistant`). Output with
    /// none of the format's tokens (a model that does not write it) is all answer; a header
    /// not yet closed by `<|message|>` shows nothing.
    pub fn split(&self, tok: &crate::tokenizer::TextTokenizer, ids: &[u32]) -> Result<Split> {
        let mut out = Split::default();
        if !ids
            .iter()
            .any(|t| [self.start, self.channel, self.message].contains(t))
        {
            out.content = tok.decode(ids)?;
            return Ok(out);
        }
        let mut i = 0;
        while i < ids.len() {
            // A header: up to `<|message|>`; its channel is the first word after `<|channel|>`.
            let Some(m) = ids[i..].iter().position(|&t| t == self.message) else {
                break;
            };
            let header = &ids[i..i + m];
            let channel = match header.iter().position(|&t| t == self.channel) {
                Some(c) => tok.decode(&header[c + 1..])?,
                None => String::new(),
            };
            let body0 = i + m + 1;
            let body_len = ids[body0..]
                .iter()
                .position(|t| self.ends.contains(t) || *t == self.start)
                .unwrap_or(ids.len() - body0);
            let text = tok.decode(&ids[body0..body0 + body_len])?;
            let dst = if channel.split_whitespace().next() == Some("analysis") {
                &mut out.reasoning
            } else {
                &mut out.content
            };
            dst.push_str(&text);
            i = body0 + body_len + 1;
        }
        Ok(out)
    }
}

/// Today's date (UTC).
fn today() -> (i64, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_from_days((secs / 86_400) as i64)
}

/// A date formatted with the strftime codes chat templates use (%d %m %Y %b %B %y).
fn strftime_on(fmt: &str, (y, m, d): (i64, u32, u32)) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src, Some("<s>"), None).unwrap();
        let out = t.render(&[Message::new("user", "  hi ")]).unwrap();
        assert_eq!(out, "<s><|user|>hi\n<|assistant|>");
    }

    #[test]
    fn harmony_splits_reasoning_from_the_answer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/hf/gpt-oss-mxfp4");
        let tok = crate::tokenizer::TextTokenizer::from_dir(&dir).unwrap();
        let h = Harmony::of(&tok).unwrap();
        let text = "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>";
        let ids = tok.encode_special(text).unwrap();
        let want = Split {
            reasoning: "Two and two.".into(),
            content: "It is 4.".into(),
        };
        assert_eq!(h.split(&tok, &ids).unwrap(), want);
        // Every prefix splits into prefixes of the whole (what streaming relies on).
        for n in 0..ids.len() {
            let s = h.split(&tok, &ids[..n]).unwrap();
            assert!(want.reasoning.starts_with(&s.reasoning), "{n}: {s:?}");
            assert!(want.content.starts_with(&s.content), "{n}: {s:?}");
        }
        // A model that ignores the format: all of it is the answer.
        let plain = tok.encode_special("just text").unwrap();
        assert_eq!(h.split(&tok, &plain).unwrap().content, "just text");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        assert!(t
            .render(&[])
            .unwrap_err()
            .to_string()
            .contains("no system role"));
    }
}
