//! Finding a model: a local folder, or a repo id such as `Qwen/Qwen3-8B` in the Hugging Face
//! cache. Nothing is downloaded here.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
                "{} (fetch it with scripts/fetch_default_model.sh, or pass --model)",
                p.display()
            ),
        ))
    }
}

/// Cache folders to search,, in the order huggingface_hub uses: `HF_HUB_CACHE`, then
/// `HF_HOME/hub`, then `~/.cache/huggingface/hub`.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        dirs.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        dirs.push(Path::new(&p).join("hub"));
    }
    if let Ok(h) = std::env::var("HOME") {
        dirs.push(Path::new(&h).join(".cache/huggingface/hub"));
    }
    dirs.dedup();
    dirs
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && *p != "."
                && *p != ".."
        })
}

/// Resolves a `.gguf` file, a folder, or a cached repo id to the model's path.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.is_file() {
        return Ok(p.to_path_buf()); // a GGUF file; its magic is checked when it is opened
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::ModelNotFound(
            spec.to_string(),
            "no such folder".to_string(),
        ));
    }
    let mut looked = Vec::new();
    for dir in cache_dirs() {
        let repo = hf_hub::Repo::model(spec.to_string());
        let cache = hf_hub::Cache::new(dir.clone()).repo(repo);
        if let Some(cfg) = cache.get("config.json") {
            if let Some(parent) = cfg.parent() {
                return Ok(parent.to_path_buf());
            }
        }
        // Without refs/main (a copied or partial cache), take the newest snapshot with a config.
        let snapshots = dir
            .join(format!("models--{}", spec.replace('/', "--")))
            .join("snapshots");
        if let Ok(entries) = std::fs::read_dir(&snapshots) {
            let newest = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("config.json").exists())
                .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            if let Some(p) = newest {
                return Ok(p);
            }
        }
        looked.push(snapshots.display().to_string());
    }
    Err(Error::ModelNotFound(
        spec.to_string(),
        format!(
            "{} (download it with `hf download {spec}` or pass a folder)",
            looked.join(", ")
        ),
    ))
}
