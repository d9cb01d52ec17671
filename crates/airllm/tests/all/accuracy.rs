//! What compression costs in accuracy, on the default model (Gemma 3 270M): its GGUF is
//! dequantized to an f32 transformers folder, that folder is converted to Q8_0 and Q4_K_M, and
//! perplexity on a public-domain text must stay within 0.5% (Q8_0) and 5% (Q4_K_M) of the
//! folder's (the figures of docs/accuracy.md).

use std::path::Path;

use airllm::convert::{to_gguf, to_hf, Quant};
use airllm::tokenizer::TextTokenizer;
use airllm::{Engine, EngineOptions, Session};

/// The protocol of docs/accuracy.md: all six 512-token windows of the text.
const CTX: usize = 512;
const WINDOWS: usize = 6;

fn text() -> String {
    let p = crate::common::fixture("text/alice-ch1-2.txt");
    std::fs::read_to_string(p).unwrap()
}

fn ppl(model: &Path, tok: &TextTokenizer) -> f64 {
    let mut tokens = tok.encode(&text()).unwrap();
    let bos = tok.bos_id.filter(|b| tokens.first() == Some(b));
    tokens.truncate(CTX * WINDOWS);
    let opts = EngineOptions {
        max_memory: Some(4 << 30),
        context: CTX,
        max_step_tokens: CTX,
        max_logit_rows: CTX,
        ..Default::default()
    };
    let mut s = Session::new(Engine::open(model, opts).unwrap(), None, None);
    s.perplexity(&tokens, CTX, bos, |_, _, _| {}).unwrap().ppl
}

#[test]
fn q8_0_and_q4_k_m_stay_close_to_full_precision() {
    let gguf = airllm::hub::default_model().expect("run scripts/fetch_default_model.sh first");
    let tmp = tempfile::tempdir().unwrap();
    let f32_dir = tmp.path().join("gemma-f32");
    to_hf(&gguf, &f32_dir, &mut |_, _| {}).unwrap();
    // One tokenizer for all three, so every model scores the same tokens.
    let tok = TextTokenizer::open(&f32_dir).unwrap();
    let base = ppl(&f32_dir, &tok);
    for (q, tolerance) in [(Quant::Q8_0, 0.005), (Quant::Q4KM, 0.05)] {
        let out = tmp.path().join(format!("gemma-{}.gguf", q.name()));
        to_gguf(&f32_dir, q, &out, &[], &mut |_, _| {}).unwrap();
        let p = ppl(&out, &tok);
        let rel = p / base - 1.0;
        eprintln!(
            "{}: perplexity {p:.4} vs f32 {base:.4} ({:+.2}%)",
            q.name(),
            100.0 * rel
        );
        assert!(
            rel.abs() <= tolerance,
            "{}: perplexity {p:.4} is {:+.2}% from f32 {base:.4}",
            q.name(),
            100.0 * rel
        );
        std::fs::remove_file(&out).unwrap();
    }
}
