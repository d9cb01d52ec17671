//! A safetensors reader that reads tensors in place with positioned reads.
//!
//! We parse the header ourselves rather than memory-map the file: a mapping would let the page
//! cache grow with the model and hide the bytes we hold from the budget, and parsing here lets us
//! validate every offset against the file size and name the file in each error.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Element types found in checkpoints that we can compute with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// FP8 matrices, read with their `_scale_inv` block scales.
    F8E4M3,
    F8E5M2,
    /// Bytes: MXFP4's packed values and e8m0 scales (`*_blocks`, `*_scales`).
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::U8 => "U8",
        }
    }
    pub fn is_f8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }
}

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index of the shard file holding the tensor.
    pub shard: usize,
    /// Absolute byte offset in the shard.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One opened safetensors file.
pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    /// The same file opened for O_DIRECT, used for bulk tensor reads when available.
    pub direct: Option<File>,
    pub len: u64,
}

/// Reads the header of `path` and returns the tensors it holds, with offsets checked against the
/// file's size.
pub fn open_shard(path: &Path, shard_idx: usize) -> Result<(Shard, Vec<(String, TensorInfo)>)> {
    let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot stat: {e}")))?
        .len();
    if len < 8 {
        return Err(Error::file(
            path,
            format!(
                "truncated safetensors file: {len} bytes, shorter than the 8-byte header length"
            ),
        ));
    }
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .map_err(|e| Error::file(path, format!("cannot read header length: {e}")))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > len - 8 {
        return Err(Error::file(
            path,
            format!("truncated safetensors file: header of {header_len} bytes does not fit in a file of {len} bytes"),
        ));
    }
    if header_len > 100 << 20 {
        return Err(Error::file(
            path,
            format!("safetensors header of {header_len} bytes is implausibly large"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| Error::file(path, format!("cannot read header: {e}")))?;
    let v: Value = serde_json::from_slice(&header)
        .map_err(|e| Error::file(path, format!("invalid safetensors header JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Error::file(path, "safetensors header is not a JSON object"))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(obj.len());
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: String| Error::tensor(path, name, msg);
        let dtype = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F8_E4M3") => DType::F8E4M3,
            Some("F8_E5M2") => DType::F8E5M2,
            Some("U8") => DType::U8,
            Some(other) => {
                return Err(bad(format!(
                    "unsupported dtype `{other}` (supported: F32, F16, BF16, F8_E4M3, F8_E5M2)"
                )))
            }
            None => return Err(bad("missing dtype".into())),
        };
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of integers".into()))?;
        let offs = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets must be two integers".into()))?;
        let (begin, end) = offs;
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let expected = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        if end < begin || Some(end - begin) != expected {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {} needs {}",
                end.saturating_sub(begin),
                dtype.name(),
                expected.map_or("too many".to_string(), |e| e.to_string())
            )));
        }
        match data_start.checked_add(end) {
            Some(stop) if stop <= len => {}
            _ => {
                return Err(bad(format!(
                "data ends at byte {} but the file has {len} bytes (truncated file or bad offsets)",
                data_start as u128 + end as u128
            )))
            }
        }
        out.push((
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                shard: shard_idx,
                offset: data_start + begin,
                nbytes: end - begin,
            },
        ));
    }
    Ok((
        Shard {
            path: path.to_path_buf(),
            direct: super::io::open_direct(path),
            file,
            len,
        },
        out,
    ))
}

/// Reads `count` values starting `elem_offset` values into the tensor, widened to f32. For the
/// small tensors (norms, biases, embedding rows); matrices are held in their own form.
pub fn read_f32(
    io: &super::io::Io,
    shard: &Shard,
    name: &str,
    info: &TensorInfo,
    elem_offset: usize,
    count: usize,
) -> Result<Vec<f32>> {
    if info.dtype.is_f8() || info.dtype == DType::U8 {
        return Err(Error::tensor(
            &shard.path,
            name,
            format!(
                "is {}: it is read for layer matrices only (FP8 with its block scales, MXFP4 blocks with their scales)",
                info.dtype.name()
            ),
        ));
    }
    let es = info.dtype.size();
    let at = info.offset + (elem_offset * es) as u64;
    let mut raw = vec![0u8; count * es];
    io.read_at(&shard.file, &mut raw, at)
        .map_err(|e| Error::tensor(&shard.path, name, format!("read failed: {e}")))?;
    let mut out = vec![0f32; count];
    match info.dtype {
        DType::F32 => bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(&raw),
        _ => widen_16_bytes(&raw, &mut out, info.dtype),
    }
    Ok(out)
}

/// Widens little-endian 16-bit floats given as bytes, which may sit at any alignment.
fn widen_16_bytes(bytes: &[u8], out: &mut [f32], dtype: DType) {
    match bytemuck::try_cast_slice::<u8, u16>(bytes) {
        Ok(raw) => widen_16(raw, out, dtype),
        Err(_) => {
            let raw: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            widen_16(&raw, out, dtype)
        }
    }
}

/// Widens 16-bit floats to f32.
fn widen_16(raw: &[u16], out: &mut [f32], dtype: DType) {
    match dtype {
        DType::BF16 => {
            for (o, &r) in out.iter_mut().zip(raw) {
                *o = f32::from_bits((r as u32) << 16);
            }
        }
        _ => {
            for (o, &r) in out.iter_mut().zip(raw) {
                *o = half::f16::from_bits(r).to_f32();
            }
        }
    }
}

/// All tensors of a checkpoint, by name, across its shards.
pub struct SafetensorsSet {
    pub shards: Vec<Shard>,
    pub tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsSet {
    /// Opens a model folder: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "required field is missing"))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for n in &names {
                let p = dir.join(n);
                if !p.exists() {
                    return Err(Error::file(
                        &p,
                        format!("missing shard (listed in {})", index.display()),
                    ));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::file(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let (shard, list) = open_shard(f, i)?;
            shards.push(shard);
            tensors.extend(list);
        }
        // A multimodal release (Qwen3.5's) keeps its language model under
        // `model.language_model.`: read it by the text model's names.
        const INNER: &str = "model.language_model.";
        if tensors.keys().any(|k| k.starts_with(INNER)) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| match k.strip_prefix(INNER) {
                    Some(rest) => (format!("model.{rest}"), v),
                    None => (k, v),
                })
                .collect();
        }
        Ok(SafetensorsSet { shards, tensors })
    }
}
