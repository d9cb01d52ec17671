//! Opening a model as every front end does: resolve what the user named (a file, a folder, a
//! model on the hub), compress it on first use when asked, and open its weights and tokenizer.

use std::path::PathBuf;

use crate::convert::Quant;
use crate::engine::ModelInfo;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The hub revision (branch, tag or commit) for a repo id; `main` when `None`.
    pub revision: Option<String>,
    /// Run a Hugging Face checkpoint through a cached GGUF conversion of this type.
    pub compress: Option<Quant>,
    /// Where conversions are kept; [`crate::convert::default_cache_dir`] when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Hold an f32 checkpoint's resident matrices as f16.
    pub f16: bool,
    /// Draw download and conversion progress bars on stderr.
    pub progress: bool,
}

/// An opened model, ready for [`crate::Engine::from_info`].
pub struct Loaded {
    pub info: ModelInfo,
    pub tok: TextTokenizer,
    /// What building the tokenizer took from the process (over 100 MiB for a 262k vocabulary),
    /// to count against a budget.
    pub tok_bytes: u64,
    /// With compression: the conversion used, and whether this call built it.
    pub compressed: Option<(PathBuf, bool)>,
}

/// The compression types a model can be run through: the ones with fast kernels.
pub fn compress_type(name: &str) -> Result<Quant> {
    match name.parse::<Quant>() {
        Ok(q @ (Quant::Q8_0 | Quant::Q4K | Quant::Q4KM)) => Ok(q),
        _ => Err(Error::Invalid(format!(
            "compression `{name}`: expected q8_0, q4_k or q4_k_m"
        ))),
    }
}

/// A progress bar counting bytes, on stderr (hidden when stderr is not a terminal).
pub fn byte_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    bar
}

/// Where a model's files are.
pub struct Located {
    /// What the engine opens: the model, or its compressed conversion.
    pub weights: PathBuf,
    /// The model as named (its tokenizer is read from here).
    pub source: PathBuf,
    /// With compression: the conversion used, and whether this call built it.
    pub compressed: Option<(PathBuf, bool)>,
}

/// Finds (downloading if needed) the model `spec` names, or the default model when `None`,
/// and its compressed conversion when one is asked for (building it on first use).
pub fn locate(spec: Option<&str>, o: &LoadOptions) -> Result<Located> {
    let source = match spec {
        Some(s) => crate::hub::resolve(s, o.revision.as_deref(), o.progress)?,
        None => crate::hub::default_model()?,
    };
    let Some(quant) = o.compress else {
        return Ok(Located {
            weights: source.clone(),
            source,
            compressed: None,
        });
    };
    let cache = o
        .cache_dir
        .clone()
        .unwrap_or_else(crate::convert::default_cache_dir);
    let bar = if o.progress {
        byte_bar()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (file, built) = crate::convert::cached(&source, quant, &cache, &mut |d, t| {
        bar.set_length(t);
        bar.set_position(d);
    })?;
    bar.finish_and_clear();
    Ok(Located {
        weights: file.clone(),
        source,
        compressed: Some((file, built)),
    })
}

/// Opens the model `spec` names (see [`locate`]) and its tokenizer.
pub fn load(spec: Option<&str>, o: &LoadOptions) -> Result<Loaded> {
    let at = locate(spec, o)?;
    let info = ModelInfo::open_opts(&at.weights, false, o.f16)?;
    let before = crate::util::rss().unwrap_or(0);
    // The tokenizer stays the original's: a conversion keeps only what GGUF metadata can hold.
    let tok = TextTokenizer::open(&at.source)?;
    let tok_bytes = crate::util::rss().unwrap_or(0).saturating_sub(before);
    Ok(Loaded {
        info,
        tok,
        tok_bytes,
        compressed: at.compressed,
    })
}

/// The context of a front end that does not know its prompts in advance (chat, a server, the
/// Python API): min(2048, the model's maximum).
pub fn default_context(cfg: &crate::ModelConfig) -> usize {
    cfg.max_position_embeddings.min(2048)
}

/// The compute device `cpu`, `cuda` or `cuda:N` names.
pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let bad = || Error::Invalid(format!("device `{s}`: expected cpu, cuda or cuda:N"));
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(bad)?,
        None => return Err(bad()),
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(format!(
            "device `{s}`: this build has no CUDA; build one with scripts/build_cuda.sh (the `cuda` feature)"
        )));
    }
    Ok(candle_core::Device::new_cuda(ordinal)?)
}
