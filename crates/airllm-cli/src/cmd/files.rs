//! The commands that write or fetch model files: `synth`, `convert` and `pull`.

use std::time::Instant;

use airllm::util::parse_size;
use anyhow::{bail, Context, Result};

use crate::args::{ConvertArgs, PullArgs, SynthArgs};

pub fn synth(a: SynthArgs) -> Result<()> {
    use airllm::synth::{preset, write_hf_as, PRESETS};
    use airllm::weights::safetensors::DType;
    let mut shape = preset(&a.shape)
        .with_context(|| format!("--shape `{}` is not one of {}", a.shape, PRESETS.join(", ")))?;
    shape.layers = a.layers.unwrap_or(shape.layers);
    shape.hidden = a.hidden.unwrap_or(shape.hidden);
    shape.intermediate = a.intermediate.unwrap_or(shape.intermediate);
    shape.heads = a.heads.unwrap_or(shape.heads);
    shape.kv_heads = a.kv_heads.unwrap_or(shape.kv_heads);
    shape.vocab = a.vocab.unwrap_or(shape.vocab);
    match (&mut shape.moe, a.experts, a.top_k) {
        (Some(m), e, k) => {
            m.experts = e.unwrap_or(m.experts);
            m.top_k = k.unwrap_or(m.top_k);
            if shape.arch == airllm::config::Arch::Mixtral {
                m.expert_size = shape.intermediate;
            }
        }
        (None, None, None) => {}
        (None, _, _) => bail!(
            "--experts and --top-k apply to mixture-of-experts shapes (mixtral-8x7b, qwen3-30b-a3b, tiny-moe, deepseek-v3, kimi-k2, deepseek-v2-lite, glm-4.5-air, glm-4.5, gpt-oss-20b, gpt-oss-120b, qwen3-next-80b-a3b, qwen3.5-35b-a3b)"
        ),
    }
    shape.routing = match (a.routing.as_str(), a.routing_strength) {
        ("random", None) => airllm::synth::SynthRouting::Random,
        ("random", Some(_)) => bail!("--routing-strength applies to --routing correlated"),
        ("correlated", s) => {
            let strength = s.unwrap_or(airllm::synth::CORRELATED_STRENGTH);
            if !(strength.is_finite() && strength >= 0.0) {
                bail!("--routing-strength {strength}: expected a number of 0 or more");
            }
            if shape.moe.is_none() {
                bail!("--routing correlated applies to mixture-of-experts shapes");
            }
            airllm::synth::SynthRouting::Correlated { strength }
        }
        (other, _) => bail!("--routing `{other}`: expected random or correlated"),
    };
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        "fp8" | "f8" | "e4m3" | "float8_e4m3fn" => DType::F8E4M3,
        other => bail!("--dtype `{other}`: expected bf16, f16, f32 or fp8"),
    };
    let shard = parse_size(&a.shard_size).context("--shard-size")?;
    let bar = airllm::load::byte_bar();
    if a.sparse && a.gguf.is_some() {
        bail!("--sparse writes no weights, so it cannot also write --gguf");
    }
    write_hf_as(
        &shape,
        dtype,
        a.seed,
        shard,
        &a.out,
        a.sparse,
        |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({}: {} layers, hidden {}, {} heads, vocab {}; {})",
        a.out.display(),
        a.shape,
        shape.layers,
        shape.hidden,
        shape.heads,
        shape.vocab,
        dtype.name()
    );
    if let Some(g) = &a.gguf {
        let quant = match dtype {
            // FP8 is not a GGUF type: its weights are written widened to bf16.
            DType::BF16 | DType::F8E4M3 | DType::F8E5M2 | DType::U8 => airllm::convert::Quant::BF16,
            DType::F16 => airllm::convert::Quant::F16,
            DType::F32 => airllm::convert::Quant::F32,
        };
        let bar = airllm::load::byte_bar();
        airllm::convert::to_gguf(&a.out, quant, g, &[], &mut |d, t| {
            bar.set_length(t);
            bar.set_position(d);
        })?;
        bar.finish_and_clear();
        eprintln!("wrote {}", g.display());
    }
    Ok(())
}

pub fn pull(a: PullArgs) -> Result<()> {
    let path = airllm::hub::update(&a.model, a.revision.as_deref(), !a.quiet)?;
    println!("{}", path.display());
    Ok(())
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let src = airllm::hub::resolve(&a.model, a.revision.as_deref(), true)?;
    let bar = airllm::load::byte_bar();
    let mut progress = |d: u64, t: u64| {
        bar.set_length(t);
        bar.set_position(d);
    };
    let t = Instant::now();
    if a.dequantize {
        airllm::convert::to_hf(&src, &a.out, &mut progress)?;
    } else {
        let quant: airllm::convert::Quant = a.quantize.parse().context("--quantize")?;
        airllm::convert::to_gguf(&src, quant, &a.out, &[], &mut progress)?;
    }
    bar.finish_and_clear();
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
