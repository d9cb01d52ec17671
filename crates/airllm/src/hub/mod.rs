//! Finding a model: a local folder, or a repo id such as `Qwen/Qwen3-8B` in the Hugging Face
//! cache, downloaded into it when missing ([`pull`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub mod pull;
pub use pull::{HubEnv, RepoSpec};

/// File name of the default model, Gemma 3 270M in Q4_K_M.
pub const DEFAULT_MODEL: &str = "gemma-3-270m-q4_k_m.gguf";

/// Where `scripts/fetch_default_model.sh` stores models: `$AIRLLM_MODELS`, else
/// `${XDG_CACHE_HOME:-~/.cache}/airllm/models`.
pub fn models_dir() -> PathBuf {
    if let Ok(p) = std::env::var("AIRLLM_MODELS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache"));
    cache.join("airllm/models")
}

/// The default model's path, if it has been fetched.
pub fn default_model() -> Result<PathBuf> {
    let p = models_dir().join(DEFAULT_MODEL);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::ModelNotFound(
            DEFAULT_MODEL.to_string(),
            format!(
                "no {} (fetch it with scripts/fetch_default_model.sh, or name a model)",
                p.display()
            ),
        ))
    }
}

/// Cache folders to search, in the order huggingface_hub uses: `HF_HUB_CACHE`, then
/// `HF_HOME/hub`, then `~/.cache/huggingface/hub`. Downloads go to the first.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![HubEnv::from_env().cache];
    if let Ok(h) = std::env::var("HOME") {
        dirs.push(Path::new(&h).join(".cache/huggingface/hub"));
    }
    dirs.dedup();
    dirs
}

/// Resolves a `.gguf` file, a folder, or a model on the hub (`ORG/NAME`, `ORG/NAME:QUANT`,
/// `ORG/NAME/FILE.gguf`) to the path to open. A hub model comes from the cache when a snapshot
/// of `revision` (default `main`) holds every file it needs, and is downloaded otherwise, with a
/// progress bar per file when `progress` is set.
pub fn resolve(spec: &str, revision: Option<&str>, progress: bool) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() || p.is_file() {
        return Ok(p.to_path_buf()); // a GGUF file's magic is checked when it is opened
    }
    let Some(repo) = RepoSpec::parse(spec) else {
        return Err(Error::ModelNotFound(
            spec.to_string(),
            "no such file or folder (nor a repo id: ORG/NAME)".to_string(),
        ));
    };
    let revision = revision.unwrap_or("main");
    if let Some(found) = pull::cached(&repo, revision, &cache_dirs()) {
        return Ok(found);
    }
    pull::pull(&repo, revision, &HubEnv::from_env(), progress)
}

/// Brings a hub model up to date with `revision` (default `main`): asks the hub which commit
/// that is and fetches what its snapshot lacks. With `HF_HUB_OFFLINE` set, the cache must hold
/// it already.
pub fn update(spec: &str, revision: Option<&str>, progress: bool) -> Result<PathBuf> {
    let repo = RepoSpec::parse(spec).ok_or_else(|| {
        Error::Invalid(format!(
            "`{spec}` is not a repo id (ORG/NAME, ORG/NAME:QUANT or ORG/NAME/FILE.gguf)"
        ))
    })?;
    let revision = revision.unwrap_or("main");
    let env = HubEnv::from_env();
    if env.offline {
        if let Some(found) = pull::cached(&repo, revision, &cache_dirs()) {
            return Ok(found);
        }
    }
    pull::pull(&repo, revision, &env, progress)
}
