//! Opening a model as every front end does: resolve what the user named (a file, a folder, a
//! model on the hub), compress it on first use when asked, and open its weights and tokenizer.

use std::path::PathBuf;

use crate::convert::Quant;
use crate::error::{Error, Result};

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
