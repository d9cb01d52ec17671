//! Downloads a model by repo id into the standard Hugging Face cache, through hf-hub. Only the
//! files a model needs are fetched; a partly downloaded file resumes from its `.part` file; a
//! snapshot that already holds them is used without the network.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The tokenizer, template and generation files a Hugging Face folder may carry that airllm
/// reads; those present are fetched.
const FOLDER_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A model named on the hub: `ORG/NAME`, `ORG/NAME:QUANT` (one GGUF file by its quantization,
/// as llama.cpp's `-hf` takes it) or `ORG/NAME/FILE.gguf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub repo: String,
    pub file: Option<GgufChoice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GgufChoice {
    /// A quantization tag such as `Q4_K_M`, matched case-insensitively in the file name.
    Quant(String),
    /// A file path inside the repo.
    File(String),
}

impl RepoSpec {
    /// Reads a spec, or `None` when `s` does not look like one.
    pub fn parse(s: &str) -> Option<RepoSpec> {
        let (base, quant) = match s.rsplit_once(':') {
            Some((b, q)) if !q.is_empty() && !q.contains('/') => (b, Some(q)),
            _ => (s, None),
        };
        let parts: Vec<&str> = base.split('/').collect();
        if parts.len() < 2 || !parts.iter().all(|p| valid_part(p)) {
            return None;
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        let file = match (quant, parts.len()) {
            (Some(q), 2) => Some(GgufChoice::Quant(q.to_string())),
            (None, 2) => None,
            (None, _) if base.ends_with(".gguf") => Some(GgufChoice::File(parts[2..].join("/"))),
            _ => return None,
        };
        Some(RepoSpec { repo, file })
    }
}

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p != "."
        && p != ".."
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Where and how to reach the hub, from the environment as huggingface_hub reads it.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file `hf auth login` writes.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use only the cache.
    pub offline: bool,
    /// Where downloads go: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
}

impl HubEnv {
    pub fn from_env() -> HubEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let truthy = |k: &str| {
            var(k).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        };
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(&var("HOME").unwrap_or_default()).join(".cache"))
                .join("huggingface")
        });
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        HubEnv {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
            cache: var("HF_HUB_CACHE")
                .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("hub")),
        }
    }
}

/// The repo's folder in a cache: `models--ORG--NAME`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot a revision names in a cache: a commit hash directly, a branch or tag through
/// `refs/`.
/// A cache without `refs/main` (copied, or filled by commit) offers its newest snapshot for
/// `main`.
fn snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let snapshots = folder.join("snapshots");
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        match std::fs::read_to_string(folder.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) if revision == "main" => {
                return std::fs::read_dir(&snapshots)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            }
            Err(_) => return None,
        }
    };
    let dir = snapshots.join(commit);
    dir.is_dir().then_some(dir)
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The GGUF files of a listing that hold a model (not a vision projector).
fn model_ggufs<'a>(files: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    files
        .filter(|f| f.ends_with(".gguf"))
        .filter(|f| {
            !f.rsplit('/')
                .next()
                .unwrap_or(f)
                .to_ascii_lowercase()
                .contains("mmproj")
        })
        .collect()
}

/// Picks the GGUF file a spec asks for among `files`; `Ok(None)` when there is none to pick.
fn pick_gguf(repo: &str, files: &[&str], choice: Option<&GgufChoice>) -> Result<Option<String>> {
    let ggufs = model_ggufs(files.iter().copied());
    let hub = |msg: String| Error::Hub {
        repo: repo.to_string(),
        msg,
    };
    let chosen: Vec<&str> = match choice {
        Some(GgufChoice::File(f)) => {
            if !files.contains(&f.as_str()) {
                return Err(hub(format!(
                    "no file `{f}`; its GGUF files: {}",
                    list(&ggufs)
                )));
            }
            vec![f.as_str()]
        }
        Some(GgufChoice::Quant(q)) => {
            let tag = q.to_ascii_uppercase();
            let m: Vec<&str> = ggufs
                .iter()
                .copied()
                .filter(|f| quant_tag_matches(f, &tag))
                .collect();
            if m.is_empty() {
                return Err(hub(format!(
                    "no GGUF file for `{q}`; its GGUF files: {}",
                    list(&ggufs)
                )));
            }
            m
        }
        None if ggufs.len() <= 1 => ggufs.clone(),
        None => {
            // llama.cpp's `-hf` default: Q4_K_M when the repo offers several.
            let m: Vec<&str> = ggufs
                .iter()
                .copied()
                .filter(|f| quant_tag_matches(f, "Q4_K_M"))
                .collect();
            if m.is_empty() {
                return Err(hub(format!(
                    "holds several GGUF files; name one as {repo}:QUANT or {repo}/FILE.gguf: {}",
                    list(&ggufs)
                )));
            }
            m
        }
    };
    match chosen.as_slice() {
        [] => Ok(None),
        [one] if is_split(one) => Err(hub(format!(
            "`{one}` is one part of a split GGUF; merge the parts into one file with llama.cpp's `llama-gguf-split --merge` and pass that file"
        ))),
        [one] => Ok(Some(one.to_string())),
        many => Err(hub(format!(
            "several GGUF files match; name one as {repo}/FILE.gguf: {}",
            list(many)
        ))),
    }
}

fn list(files: &[&str]) -> String {
    if files.is_empty() {
        "none".into()
    } else {
        files.join(", ")
    }
}

/// `Q4_K_M` matches `model-Q4_K_M.gguf` and `model.q4_k_m.gguf`, not `model-IQ4_K_M.gguf`.
fn quant_tag_matches(file: &str, tag: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_uppercase();
    let stem = name.trim_end_matches(".GGUF");
    stem.match_indices(tag).any(|(i, _)| {
        let before = stem[..i].chars().next_back();
        let after = stem[i + tag.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// `model-00001-of-00003.gguf`.
fn is_split(file: &str) -> bool {
    let stem = file.trim_end_matches(".gguf");
    let mut parts = stem.rsplitn(3, '-');
    let (total, of, idx) = (parts.next(), parts.next(), parts.next());
    of == Some("of")
        && total.is_some_and(|t| t.len() == 5 && t.chars().all(|c| c.is_ascii_digit()))
        && idx.is_some_and(|i| i.ends_with(|c: char| c.is_ascii_digit()))
}

/// The shards a `model.safetensors.index.json` maps tensors to, each once, in order.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::file(index, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "weight_map", "missing or not an object"))?;
    let mut shards: Vec<String> = Vec::new();
    for f in map.values().filter_map(|f| f.as_str()) {
        if !shards.iter().any(|s| s == f) {
            shards.push(f.to_string());
        }
    }
    Ok(shards)
}

/// What a model at `spec` needs, read from a snapshot folder: the path to open, or `None` when a
/// file is missing. Checks only presence; `.part` files never land in a snapshot.
fn complete_in(dir: &Path, spec: &RepoSpec) -> Option<PathBuf> {
    if spec.file.is_none() && dir.join("config.json").is_file() {
        let index = dir.join("model.safetensors.index.json");
        let shards = if index.is_file() {
            index_shards(&index).ok()?
        } else {
            vec!["model.safetensors".to_string()]
        };
        let all = shards
            .iter()
            .map(String::as_str)
            .chain(["tokenizer.json"])
            .all(|f| dir.join(f).is_file());
        return all.then(|| dir.to_path_buf());
    }
    if let Some(GgufChoice::File(f)) = &spec.file {
        let p = dir.join(f);
        return p.is_file().then_some(p);
    }
    let mut names = Vec::new();
    list_files(dir, "", &mut names);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // Without a choice, the cache answers only when it holds one model file: the hub may hold
    // others, and the choice among them is made against its listing.
    if spec.file.is_none() && model_ggufs(refs.iter().copied()).len() != 1 {
        return None;
    }
    let f = pick_gguf(&spec.repo, &refs, spec.file.as_ref()).ok()??;
    Some(dir.join(f))
}

/// Every file under `dir` (following the snapshot's links), as paths relative to it.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let rel = format!("{prefix}{name}");
        let path = e.path();
        if path.is_dir() {
            list_files(&path, &format!("{rel}/"), out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}

/// The model `spec` names at `revision`, if a cache already holds everything it needs.
pub fn cached(spec: &RepoSpec, revision: &str, caches: &[PathBuf]) -> Option<PathBuf> {
    caches
        .iter()
        .filter_map(|c| snapshot(c, &spec.repo, revision))
        .find_map(|dir| complete_in(&dir, spec))
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
}

impl Sibling {
    /// The name the file's blob has in the cache: the ETag the hub serves it with, which is
    /// the LFS object's SHA-256 or the git blob id.
    fn blob_name(&self) -> Option<&str> {
        self.lfs
            .as_ref()
            .map(|l| l.sha256.as_str())
            .or(self.blob_id.as_deref())
    }
}

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// Fetches what the model `spec` names needs at `revision` into `env.cache`, skipping files the
/// revision's snapshot already holds, and returns the path to open: the snapshot folder, or the
/// GGUF file in it. `progress` draws a bar per file on stderr.
pub fn pull(spec: &RepoSpec, revision: &str, env: &HubEnv, progress: bool) -> Result<PathBuf> {
    let repo_id = &spec.repo;
    let hub_err = |msg: String| Error::Hub {
        repo: repo_id.clone(),
        msg,
    };
    if env.offline {
        return Err(hub_err(format!(
            "not in the cache {} at revision `{revision}`, and HF_HUB_OFFLINE is set; unset it to download",
            env.cache.display()
        )));
    }
    // From the cache folder itself: `ApiBuilder::new` would look up a home folder first.
    let api = ApiBuilder::from_cache(hf_hub::Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(progress)
        .with_retries(5)
        .with_user_agent("airllm-rs", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| hub_err(format!("cannot start a client: {e}")))?;
    let explain = |e: ApiError, file: Option<&str>| explain(e, repo_id, revision, file, env);
    let info: RepoInfo = api
        .repo(Repo::with_revision(
            repo_id.clone(),
            RepoType::Model,
            revision.to_string(),
        ))
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| explain(ApiError::RequestError(Box::new(e)), None))?
        .into_json()
        .map_err(|e| hub_err(format!("unreadable answer from {}: {e}", env.endpoint)))?;
    // Every file comes from the commit the listing describes, even if the branch moves on.
    let repo = api.repo(Repo::with_revision(
        repo_id.clone(),
        RepoType::Model,
        info.sha.clone(),
    ));
    let folder = repo_folder(&env.cache, repo_id);
    let snap = folder.join("snapshots").join(&info.sha);
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = |f: &str| -> Result<PathBuf> {
        let local = snap.join(f);
        if local.is_file() {
            return Ok(local);
        }
        // A link left dangling (its blob deleted) would make the new link fail.
        let _ = std::fs::remove_file(&local);
        let sib = info.siblings.iter().find(|s| s.rfilename == f);
        if let Some(path) = sib.and_then(|s| link_existing_blob(&folder, &local, s)) {
            return Ok(path);
        }
        let path = repo.download(f).map_err(|e| explain(e, Some(f)));
        if progress && std::io::stderr().is_terminal() {
            eprintln!(); // hf-hub leaves its finished bar without a line end
        }
        let path = path?;
        let want = sib.and_then(|s| s.size);
        let got = std::fs::metadata(&path).map(|m| m.len()).ok();
        if let (Some(want), Some(got)) = (want, got) {
            if want != got {
                // A short blob must not pass for the file: remove it so the next run fetches it.
                let blob = std::fs::canonicalize(&path).unwrap_or(path.clone());
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(blob);
                return Err(hub_err(format!(
                    "`{f}` arrived with {got} of {want} bytes; run again to fetch it"
                )));
            }
        }
        Ok(path)
    };
    let has = |f: &str| files.contains(&f);
    let found = if spec.file.is_none()
        && has("config.json")
        && files.iter().any(|f| f.ends_with(".safetensors"))
    {
        if !has("tokenizer.json") {
            return Err(hub_err(
                "has no tokenizer.json (airllm reads tokenizers in that form; a repo with only tokenizer.model needs converting, or use a GGUF of the model)".into(),
            ));
        }
        fetch("config.json")?;
        let shards = if has("model.safetensors.index.json") {
            index_shards(&fetch("model.safetensors.index.json")?)?
        } else if has("model.safetensors") {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(hub_err(
                "has safetensors files but neither model.safetensors nor model.safetensors.index.json".into(),
            ));
        };
        for f in FOLDER_FILES.iter().copied().filter(|f| has(f)) {
            fetch(f)?;
        }
        for s in &shards {
            if !has(s) {
                return Err(hub_err(format!(
                    "model.safetensors.index.json names `{s}`, which the repo does not hold"
                )));
            }
            fetch(s)?;
        }
        snap.clone()
    } else {
        match pick_gguf(repo_id, &files, spec.file.as_ref())? {
            Some(f) => fetch(&f)?,
            None if files.iter().any(|f| f.ends_with(".bin") || f.ends_with(".pth")) => {
                return Err(hub_err(
                    "holds only PyTorch pickles (.bin/.pth); airllm reads safetensors or GGUF: pick a repo with one of those".into(),
                ))
            }
            None => {
                return Err(hub_err(
                    "holds neither safetensors weights with a config.json nor a GGUF file".into(),
                ))
            }
        }
    };
    set_ref(&folder, revision, &info.sha).map_err(|e| {
        hub_err(format!(
            "cannot write to the cache {}: {e}",
            folder.display()
        ))
    })?;
    Ok(found)
}

/// Links `local` to a blob the cache already holds for `sib` (the same file in another
/// commit), so an unchanged file is not downloaded again.
fn link_existing_blob(folder: &Path, local: &Path, sib: &Sibling) -> Option<PathBuf> {
    let name = sib.blob_name()?;
    let blob = folder.join("blobs").join(name);
    let len = std::fs::metadata(&blob).ok()?.len();
    if sib.size.is_some_and(|s| s != len) {
        return None;
    }
    std::fs::create_dir_all(local.parent()?).ok()?;
    let depth = local.strip_prefix(folder).ok()?.components().count() - 1;
    let target = Path::new(&"../".repeat(depth)).join("blobs").join(name);
    std::os::unix::fs::symlink(target, local).ok()?;
    local.is_file().then(|| local.to_path_buf())
}

/// Points `refs/REVISION` at `commit` (written whole, then renamed into place). hf-hub names
/// the ref after the revision it downloaded by, here the commit itself; that stray ref goes.
fn set_ref(folder: &Path, revision: &str, commit: &str) -> std::io::Result<()> {
    let refs = folder.join("refs");
    let _ = std::fs::remove_file(refs.join(commit));
    if !is_commit(revision) {
        let path = refs.join(revision);
        std::fs::create_dir_all(path.parent().unwrap_or(&refs))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, commit)?;
        std::fs::rename(tmp, path)?;
    }
    Ok(())
}

/// One line for a failed hub request: what went wrong and what to do.
fn explain(e: ApiError, repo: &str, revision: &str, file: Option<&str>, env: &HubEnv) -> Error {
    let what = match file {
        Some(f) => format!("`{f}`"),
        None => "the file list".to_string(),
    };
    let msg = match e {
        ApiError::RequestError(e) => match *e {
            ureq::Error::Status(code, resp) => {
                let kind = resp.header("x-error-code").unwrap_or("").to_string();
                let url = format!("{}/{repo}", env.endpoint);
                match (kind.as_str(), code) {
                    ("", 403) => format!(
                        "access to {what} was refused (HTTP 403): if the repo is gated, accept its terms at {url} and set HF_TOKEN to a token of that account"
                    ),
                    ("GatedRepo", _) => format!(
                        "is gated: accept its terms at {url} while logged in, then set HF_TOKEN to a token of that account{}",
                        if env.token.is_some() { " (the token in use has no access yet)" } else { "" }
                    ),
                    ("RevisionNotFound", _) => format!("has no revision `{revision}`"),
                    ("EntryNotFound", _) => format!("has no {what} at revision `{revision}`"),
                    ("RepoNotFound", _) | ("", 401) | ("", 404) if file.is_none() || kind == "RepoNotFound" => format!(
                        "no such model at {} (check the id{})",
                        env.endpoint,
                        if env.token.is_some() { "" } else { "; a private repo needs HF_TOKEN" }
                    ),
                    (_, 401) => "needs a token: set HF_TOKEN to one with access to it".to_string(),
                    (_, 404) => format!("has no {what} at revision `{revision}`"),
                    _ => format!("HTTP {code} for {what} from {}", env.endpoint),
                }
            }
            ureq::Error::Transport(t) => format!(
                "cannot reach {}: {t} (set HF_HUB_OFFLINE=1 to use only the cache)",
                env.endpoint
            ),
        },
        ApiError::IoError(io) => format!(
            "{what}: cannot write to the cache {}: {io}",
            env.cache.display()
        ),
        ApiError::TooManyRetries(inner) => {
            format!("{what}: download failed after retries ({inner}); run again to resume")
        }
        other => format!("{what}: {other}"),
    };
    Error::Hub {
        repo: repo.to_string(),
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = RepoSpec::parse("Qwen/Qwen3-8B").unwrap();
        assert_eq!((s.repo.as_str(), s.file), ("Qwen/Qwen3-8B", None));
        let s = RepoSpec::parse("unsloth/gemma-3-GGUF:q4_k_m").unwrap();
        assert_eq!(s.file, Some(GgufChoice::Quant("q4_k_m".into())));
        let s = RepoSpec::parse("a/b/sub/m.gguf").unwrap();
        assert_eq!(
            (s.repo.as_str(), s.file),
            ("a/b", Some(GgufChoice::File("sub/m.gguf".into())))
        );
        for bad in [
            "model",
            "./x",
            "a/b/c",
            "a//b",
            "/abs/path",
            "a/..",
            "a/b:x/y",
        ] {
            assert_eq!(RepoSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn gguf_choice() {
        let files = [
            "README.md",
            "m-Q4_K_M.gguf",
            "m-IQ4_K_M.gguf",
            "m-Q4_K_M_L.gguf",
            "m.Q8_0.gguf",
            "mmproj-m-f16.gguf",
        ];
        let pick = |c: Option<GgufChoice>| pick_gguf("a/b", &files, c.as_ref());
        assert_eq!(pick(None).unwrap().as_deref(), Some("m-Q4_K_M.gguf"));
        let q8 = pick(Some(GgufChoice::Quant("q8_0".into()))).unwrap();
        assert_eq!(q8.as_deref(), Some("m.Q8_0.gguf"));
        let e = pick(Some(GgufChoice::Quant("Q2_K".into())))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a/b: no GGUF file for `Q2_K`"), "{e}");
        let split = ["x-00001-of-00002.gguf", "x-00002-of-00002.gguf"];
        let e = pick_gguf("a/b", &split, Some(&GgufChoice::File(split[0].into()))).unwrap_err();
        assert!(e.to_string().contains("split GGUF"), "{e}");
        assert_eq!(pick_gguf("a/b", &["config.json"], None).unwrap(), None);
    }
}
