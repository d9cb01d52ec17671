//! Weight sources: where tensors come from, independent of how they are held or computed.
//! The engine asks a source for one tensor (or a range of rows of one) at a time, so a layer is
//! only ever as resident as the streamer decides.
//!
//! Matrices are held in the file's form (bf16, f16, f32, GGUF blocks), read straight into
//! aligned buffers; norms and biases, which are small, are read as f32.

pub mod buf;
pub mod gguf;
mod gguf_config;
pub mod gguf_keys;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod io;
pub mod mat;
pub mod model;
pub mod safetensors;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use gguf::{GgufFile, GgufTensor};
use mat::{AlignedBuf, Form, Mat, MatView};
use safetensors::{read_f32, SafetensorsSet, TensorInfo};
pub use schema::{LayerSchema, Naming, Role};

/// What the planner needs to know about one stored tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    /// Bytes on disk.
    pub file_bytes: u64,
    /// Bytes once held for compute: a matrix in its held form, anything else as f32.
    pub compute_bytes: u64,
    pub dtype: &'static str,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes a matrix holds once read whole and kept: its held form, and the slack of an
    /// O_DIRECT read.
    pub fn buffer_bytes(&self) -> u64 {
        io::read_capacity(self.compute_bytes as usize) as u64
    }
    /// Bytes a read buffer needs per row of this matrix: its file bytes land there first, and
    /// its held form (which may be larger, as for `dequantize`) replaces them.
    pub fn buffer_row_bytes(&self) -> u64 {
        let rows = flat_rows(&self.shape).1.max(1) as u64;
        self.file_bytes.max(self.compute_bytes).div_ceil(rows)
    }
}

/// A checkpoint on disk that tensors can be read from by name. Implementations must be usable
/// from the background reader thread.
pub trait WeightSource: Send + Sync {
    /// The file or folder, for messages.
    fn path(&self) -> &Path;
    fn naming(&self) -> Naming;
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    /// Reads a whole small tensor (a norm, a bias) as f32.
    fn load(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// Reads rows `ids` of a 2-D tensor (embedding lookup) as f32 `[ids.len(), cols]`.
    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor>;
    /// The form a matrix is held in.
    fn form(&self, name: &str) -> Result<Form>;
    /// Reads rows `start..start+len` of a matrix into `buf` (grown when too small), in the
    /// held form, with no intermediate copy (except in GGUF `dequantize` mode, a reference
    /// check that widens into a buffer of its own, outside the pool and the budget).
    fn read_rows(&self, name: &str, start: usize, len: usize, buf: AlignedBuf) -> Result<Mat>;
    /// Read accounting and page-cache policy.
    fn io(&self) -> &io::Io;
    /// The files the weights live in, for measuring raw read bandwidth.
    fn files(&self) -> Vec<PathBuf>;

    /// Reads a whole matrix into a buffer of its own; a stack of matrices (GGUF's per-head
    /// `attn_k_b`) as its rows laid end to end.
    fn load_mat(&self, name: &str) -> Result<Mat> {
        let shape = self
            .meta(name)
            .ok_or_else(|| Error::tensor(self.path(), name, "missing from the checkpoint"))?
            .shape;
        let rows = flat_rows(&shape).1;
        Ok(self
            .read_rows(name, 0, rows, AlignedBuf::default())?
            .compact())
    }
}

fn check_range(path: &Path, name: &str, start: usize, len: usize, rows: usize) -> Result<()> {
    if start.checked_add(len).is_none_or(|e| e > rows) {
        return Err(Error::tensor(
            path,
            name,
            format!(
                "rows {start}..{} are outside its {rows} rows",
                start.saturating_add(len)
            ),
        ));
    }
    Ok(())
}

/// Opens a model: a `.gguf` file, or a Hugging Face folder of safetensors.
pub fn open_source(path: &Path) -> Result<Arc<dyn WeightSource>> {
    if is_gguf(path) {
        Ok(Arc::new(GgufSource::open(path)?))
    } else {
        Ok(Arc::new(SafetensorsSource::open(path)?))
    }
}

/// A file is taken as GGUF (its magic is checked on open); a folder as Hugging Face.
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
}

/// A Hugging Face folder of safetensors shards, read in place.
pub struct SafetensorsSource {
    dir: PathBuf,
    set: SafetensorsSet,
    io: io::Io,
    /// Hold f32 matrices as f16: resident ones take half the memory, with weights rounded to
    /// f16 (opt-in, not exact); streamed ones are still read as f32. 16-bit checkpoints are held
    /// in their own form either way.
    pub f16: bool,
    /// Matrices `f16` leaves in f32: MoE routers, which are small and whose top-k choice a
    /// rounding can flip.
    pub keep_f32: std::collections::HashSet<String>,
    /// Rows and columns of an FP8 checkpoint's scale blocks (`weight_block_size`).
    fp8_block: [usize; 2],
}

/// A stack of experts stored under one name (GPT-OSS), and how.
struct Stacked<'a> {
    /// `[experts, rows, cols]` as served.
    shape: [usize; 3],
    kind: StackedKind<'a>,
}

enum StackedKind<'a> {
    Mxfp4 {
        blocks: &'a TensorInfo,
        scales: &'a TensorInfo,
    },
    Transposed(&'a TensorInfo),
}

/// The scale tensor of an FP8 matrix: `weight` → `weight_scale_inv`.
pub fn fp8_scale_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let set = SafetensorsSet::open_dir(dir)?;
        let fp8_block = if set.tensors.values().any(|t| t.dtype.is_f8()) {
            fp8_block_size(dir)?
        } else {
            [0, 0]
        };
        let src = SafetensorsSource {
            dir: dir.to_path_buf(),
            set,
            io: io::Io::default(),
            f16: false,
            keep_f32: Default::default(),
            fp8_block,
        };
        src.check_fp8_scales()?;
        src.check_mxfp4()?;
        Ok(src)
    }

    /// Every MXFP4 stack has blocks and scales of shapes that go together.
    fn check_mxfp4(&self) -> Result<()> {
        for (name, t) in &self.set.tensors {
            let base = name
                .strip_suffix("_blocks")
                .or_else(|| name.strip_suffix("_scales"));
            if let (Some(base), safetensors::DType::U8) = (base, t.dtype) {
                if self.stacked(base)?.is_none() {
                    let other = if name.ends_with("_blocks") {
                        "scales"
                    } else {
                        "blocks"
                    };
                    return Err(Error::tensor(
                        &self.set.shards[t.shard].path,
                        name,
                        format!("MXFP4 data without its {other} ({base}_{other})"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every FP8 matrix has a scale tensor of one value per block, in f32 or bf16.
    fn check_fp8_scales(&self) -> Result<()> {
        let [br, bc] = self.fp8_block;
        for (name, t) in self.set.tensors.iter().filter(|(_, t)| t.dtype.is_f8()) {
            let path = &self.set.shards[t.shard].path;
            let [rows, cols] = t.shape[..] else {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("an FP8 tensor must be a matrix, got shape {:?}", t.shape),
                ));
            };
            let sname = fp8_scale_name(name);
            let Some(s) = self.set.tensors.get(&sname) else {
                return Err(Error::tensor(
                    path,
                    &sname,
                    format!("missing: the FP8 matrix {name} needs its block scales"),
                ));
            };
            let want = vec![rows.div_ceil(br), cols.div_ceil(bc)];
            if s.shape != want || s.dtype.is_f8() || s.dtype == safetensors::DType::F16 {
                return Err(Error::tensor(
                    &self.set.shards[s.shard].path,
                    &sname,
                    format!(
                        "is {} {:?}, but a {rows}×{cols} matrix in blocks of {br}×{bc} (quantization_config.weight_block_size) needs F32 or BF16 {want:?}",
                        s.dtype.name(),
                        s.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<(&TensorInfo, &safetensors::Shard)> {
        let info = self
            .set
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.dir, name, "missing from the checkpoint"))?;
        Ok((info, &self.set.shards[info.shard]))
    }

    fn cols(&self, name: &str, info: &TensorInfo, shard: &safetensors::Shard) -> Result<usize> {
        match info.shape.as_slice() {
            [_, c] => Ok(*c),
            s => Err(Error::tensor(
                &shard.path,
                name,
                format!("expected a 2-D tensor, got shape {s:?}"),
            )),
        }
    }

    fn held(&self, name: &str, info: &TensorInfo) -> Form {
        match info.dtype {
            safetensors::DType::F32 if self.f16 && !self.keep_f32.contains(name) => Form::F16,
            safetensors::DType::F32 => Form::F32,
            safetensors::DType::F16 => Form::F16,
            safetensors::DType::BF16 => Form::BF16,
            safetensors::DType::F8E4M3 => Form::F8(mat::F8Kind::E4M3, self.fp8_block[1]),
            safetensors::DType::F8E5M2 => Form::F8(mat::F8Kind::E5M2, self.fp8_block[1]),
            // Only MXFP4's blocks and scales are bytes; they are read through `stacked`.
            safetensors::DType::U8 => Form::Mxfp4 { q8: false },
        }
    }

    /// A stack of experts under one name (GPT-OSS): MXFP4 as `{name}_blocks`
    /// `[experts, rows, cols / 32, 16]` and `{name}_scales` `[experts, rows, cols / 32]`, or a
    /// float tensor `[experts, cols, rows]` (transformers keeps each expert's matrix
    /// transposed). Either is served as `[experts, rows, cols]`.
    fn stacked(&self, name: &str) -> Result<Option<Stacked<'_>>> {
        if let Some(t) = self.set.tensors.get(name) {
            return Ok(match t.shape[..] {
                [e, c, r] => Some(Stacked {
                    shape: [e, r, c],
                    kind: StackedKind::Transposed(t),
                }),
                _ => None,
            });
        }
        let (Some(b), Some(sc)) = (
            self.set.tensors.get(&format!("{name}_blocks")),
            self.set.tensors.get(&format!("{name}_scales")),
        ) else {
            return Ok(None);
        };
        let path = &self.set.shards[b.shard].path;
        let bad = |which: &str, t: &TensorInfo, why: String| {
            Error::tensor(
                path,
                &format!("{name}_{which}"),
                format!("is {} {:?}: {why}", t.dtype.name(), t.shape),
            )
        };
        let [e, r, g, 16] = b.shape[..] else {
            return Err(bad(
                "blocks",
                b,
                "MXFP4 blocks must be U8 [experts, rows, blocks, 16]".into(),
            ));
        };
        if b.dtype != safetensors::DType::U8 {
            return Err(bad("blocks", b, "MXFP4 blocks must be U8".into()));
        }
        if sc.dtype != safetensors::DType::U8 || sc.shape != [e, r, g] {
            return Err(bad(
                "scales",
                sc,
                format!("the blocks {:?} need U8 scales [{e}, {r}, {g}]", b.shape),
            ));
        }
        Ok(Some(Stacked {
            shape: [e, r, 32 * g],
            kind: StackedKind::Mxfp4 {
                blocks: b,
                scales: sc,
            },
        }))
    }

    /// Rows `start .. start + len` of a stack of experts (rows of all experts laid end to end).
    fn read_stacked(
        &self,
        name: &str,
        st: Stacked,
        start: usize,
        len: usize,
        mut buf: AlignedBuf,
    ) -> Result<Mat> {
        let [e, r, c] = st.shape;
        match st.kind {
            StackedKind::Mxfp4 { blocks, scales } => {
                let shard = &self.set.shards[blocks.shard];
                check_range(&shard.path, name, start, len, e * r)?;
                let g = c / 32;
                let raw = |t: &TensorInfo, per: usize| -> Result<Vec<u8>> {
                    let sh = &self.set.shards[t.shard];
                    let mut v = vec![0u8; len * per];
                    self.io
                        .read_at(&sh.file, &mut v, t.offset + (start * per) as u64)
                        .map_err(|e| Error::tensor(&sh.path, name, format!("read failed: {e}")))?;
                    Ok(v)
                };
                let (bl, sc) = (raw(blocks, 16 * g)?, raw(scales, g)?);
                let form = Form::Mxfp4 { q8: false };
                let n = form.row_bytes(c) * len;
                buf.ensure(n);
                mat::repack_hf_mxfp4(&bl, &sc, buf.bytes_mut(n));
                Mat::new(form, len, c, buf, 0)
            }
            StackedKind::Transposed(t) => {
                let shard = &self.set.shards[t.shard];
                check_range(&shard.path, name, start, len, e * r)?;
                if !start.is_multiple_of(r) || !len.is_multiple_of(r) {
                    return Err(Error::tensor(
                        &shard.path,
                        name,
                        format!(
                            "rows {start}..{} are not whole experts of {r} rows",
                            start + len
                        ),
                    ));
                }
                let form = self.held(name, t);
                let es = t.dtype.size();
                let mut raw = vec![0u8; len * c * es];
                self.io
                    .read_at(&shard.file, &mut raw, t.offset + (start * c * es) as u64)
                    .map_err(|e| Error::tensor(&shard.path, name, format!("read failed: {e}")))?;
                let n = len * c * es;
                buf.ensure(n);
                let dst = buf.bytes_mut(n);
                // Each expert's [c, r] matrix becomes [r, c].
                for x in 0..len / r {
                    let (src, out) = (&raw[x * r * c * es..], &mut dst[x * r * c * es..]);
                    for i in 0..c {
                        for j in 0..r {
                            let (a, b) = ((i * r + j) * es, (j * c + i) * es);
                            out[b..b + es].copy_from_slice(&src[a..a + es]);
                        }
                    }
                }
                if form == Form::F16 && t.dtype == safetensors::DType::F32 {
                    f32_to_f16_in_place(dst, len * c);
                }
                Mat::new(form, len, c, buf, 0)
            }
        }
    }

    /// Lays out rows `start .. start + len` of an FP8 matrix, read packed at `off`, as
    /// [`Form::F8`] holds them: each row spread to its padded width, then its block row's
    /// scales after it.
    fn spread_fp8(
        &self,
        name: &str,
        start: usize,
        len: usize,
        cols: usize,
        buf: &mut AlignedBuf,
        off: usize,
    ) -> Result<()> {
        let [br, bc] = self.fp8_block;
        let form = Form::F8(mat::F8Kind::E4M3, bc);
        let rb = form.row_bytes(cols);
        let nb = cols.div_ceil(bc);
        let sname = fp8_scale_name(name);
        let (sinfo, sshard) = self.get(&sname)?;
        let b0 = start / br;
        let b1 = (start + len).div_ceil(br);
        let scales = read_f32(&self.io, sshard, &sname, sinfo, b0 * nb, (b1 - b0) * nb)?;
        let bytes = buf.bytes_mut(off + len * rb);
        // Last row first: each row moves up (rb >= cols), over rows already moved.
        for r in (0..len).rev() {
            bytes.copy_within(off + r * cols..off + (r + 1) * cols, off + r * rb);
            let at = off + r * rb;
            bytes[at + cols..at + cols.next_multiple_of(4)].fill(0);
            let b = (start + r) / br - b0;
            let dst = &mut bytes[at + cols.next_multiple_of(4)..at + rb];
            dst.copy_from_slice(bytemuck::cast_slice(&scales[b * nb..(b + 1) * nb]));
        }
        Ok(())
    }
}

/// `quantization_config.weight_block_size` of the folder's config.json (DeepSeek's 128×128
/// when it says none).
fn fp8_block_size(dir: &Path) -> Result<[usize; 2]> {
    let path = dir.join("config.json");
    let v: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let Some(b) = v.pointer("/quantization_config/weight_block_size") else {
        return Ok([128, 128]);
    };
    match b
        .as_array()
        .map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>())
    {
        Some(a) if a.len() == 2 && a.iter().all(|x| x.is_some_and(|n| n > 0)) => {
            Ok([a[0].unwrap_or(1) as usize, a[1].unwrap_or(1) as usize])
        }
        _ => Err(Error::config(
            &path,
            "quantization_config.weight_block_size",
            format!("expected two positive integers, got {b}"),
        )),
    }
}

/// Rewrites `n` little-endian f32 values at the start of `b` as f16, in place (each write lands
/// at or before the bytes already read).
fn f32_to_f16_in_place(b: &mut [u8], n: usize) {
    let mut tmp = [0f32; 1024];
    let mut out = [half::f16::ZERO; 1024];
    let mut i = 0;
    while i < n {
        let c = (n - i).min(1024);
        for (j, t) in tmp[..c].iter_mut().enumerate() {
            let p = 4 * (i + j);
            *t = f32::from_le_bytes([b[p], b[p + 1], b[p + 2], b[p + 3]]);
        }
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut out[..c], &tmp[..c]);
        b[2 * i..2 * (i + c)].copy_from_slice(bytemuck::cast_slice(&out[..c]));
        i += c;
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn naming(&self) -> Naming {
        Naming::Hf
    }

    fn io(&self) -> &io::Io {
        &self.io
    }

    fn files(&self) -> Vec<PathBuf> {
        self.set.shards.iter().map(|s| s.path.clone()).collect()
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        if let Ok(Some(st)) = self.stacked(name) {
            let [e, r, c] = st.shape;
            let (form, file_bytes, dtype) = match st.kind {
                StackedKind::Mxfp4 { blocks, scales } => (
                    Form::Mxfp4 { q8: false },
                    blocks.nbytes + scales.nbytes,
                    "MXFP4",
                ),
                StackedKind::Transposed(t) => (self.held(name, t), t.nbytes, t.dtype.name()),
            };
            return Some(TensorMeta {
                shape: st.shape.to_vec(),
                file_bytes,
                compute_bytes: (form.row_bytes(c) * e * r) as u64,
                dtype,
            });
        }
        self.set.tensors.get(name).map(|i| TensorMeta {
            shape: i.shape.clone(),
            file_bytes: i.nbytes,
            compute_bytes: match i.shape.as_slice() {
                [r, c] => (self.held(name, i).row_bytes(*c) * r) as u64,
                _ => i.numel() as u64 * 4,
            },
            dtype: i.dtype.name(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let data = read_f32(&self.io, shard, name, info, 0, info.numel())?;
        Ok(Tensor::from_vec(data, info.shape.as_slice(), device)?)
    }

    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            check_row(id, info.shape[0])?;
            out.extend(read_f32(
                &self.io,
                shard,
                name,
                info,
                id as usize * cols,
                cols,
            )?);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), device)?)
    }

    fn form(&self, name: &str) -> Result<Form> {
        if let Some(st) = self.stacked(name)? {
            return Ok(match st.kind {
                StackedKind::Mxfp4 { .. } => Form::Mxfp4 { q8: false },
                StackedKind::Transposed(t) => self.held(name, t),
            });
        }
        Ok(self.held(name, self.get(name)?.0))
    }

    fn read_rows(&self, name: &str, start: usize, len: usize, mut buf: AlignedBuf) -> Result<Mat> {
        if let Some(st) = self.stacked(name)? {
            return self.read_stacked(name, st, start, len, buf);
        }
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        check_range(&shard.path, name, start, len, info.shape[0])?;
        let es = info.dtype.size();
        let at = info.offset + (start * cols * es) as u64;
        let form = self.held(name, info);
        // Room for the held form first: FP8 rows grow by their scales once read.
        buf.ensure(io::read_capacity(form.row_bytes(cols) * len));
        let off = self
            .io
            .read_into(
                &shard.file,
                shard.direct.as_ref(),
                at,
                len * cols * es,
                &mut buf,
            )
            .map_err(|e| Error::tensor(&shard.path, name, format!("read failed: {e}")))?;
        if info.dtype.is_f8() {
            self.spread_fp8(name, start, len, cols, &mut buf, off)?;
        }
        if form == Form::F16 && info.dtype == safetensors::DType::F32 {
            let n = len * cols;
            f32_to_f16_in_place(&mut buf.bytes_mut(off + 4 * n)[off..], n);
        }
        Mat::new(form, len, cols, buf, off)
    }
}

/// Columns, and rows laid end to end, of a tensor of two or more dimensions.
fn flat_rows(shape: &[usize]) -> (usize, usize) {
    let cols = *shape.last().unwrap_or(&1);
    (
        cols,
        shape[..shape.len().saturating_sub(1)].iter().product(),
    )
}

fn check_row(id: u32, rows: usize) -> Result<()> {
    if id as usize >= rows {
        return Err(Error::Invalid(format!(
            "token id {id} is outside the embedding table of {rows} rows"
        )));
    }
    Ok(())
}

/// A llama.cpp GGUF file, read in place. Every type is held as stored.
pub struct GgufSource {
    pub file: GgufFile,
    /// Widen quantized matrices to f32 at load: the exact function of the file computed in
    /// f32, as llama.cpp computes a dequantized copy. For reference checks; slower and larger.
    pub dequantize: bool,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(GgufSource {
            file: GgufFile::open(path)?,
            dequantize: false,
        })
    }

    fn get(&self, name: &str) -> Result<&GgufTensor> {
        self.file
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.file.path, name, "missing from the file"))
    }

    fn held(&self, t: &GgufTensor) -> Form {
        if self.dequantize && t.form.is_quantized() {
            Form::F32
        } else {
            t.form
        }
    }

    /// `rows` whole rows of `t` starting at `start`, widened to f32.
    fn rows_f32(&self, name: &str, t: &GgufTensor, start: usize, rows: usize) -> Result<Vec<f32>> {
        let rb = t.row_bytes();
        let bytes = self
            .file
            .read(name, t.offset + (start * rb) as u64, rows * rb)?;
        MatView {
            form: t.form,
            rows,
            cols: *t.shape.last().unwrap_or(&1),
            data: &bytes,
        }
        .to_f32()
        .map_err(|e| Error::tensor(&self.file.path, name, e.to_string()))
    }
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn naming(&self) -> Naming {
        Naming::Gguf
    }

    fn io(&self) -> &io::Io {
        &self.file.io
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.file.path.clone()]
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.file.tensors.get(name).map(|t| TensorMeta {
            shape: t.shape.clone(),
            file_bytes: t.nbytes,
            // Matrices and stacks of them (a layer's experts) are held in the file's form.
            compute_bytes: if t.shape.len() >= 2 {
                let (cols, rows) = flat_rows(&t.shape);
                (self.held(t).row_bytes(cols) * rows) as u64
            } else {
                t.numel() as u64 * 4
            },
            dtype: t.form.name(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.get(name)?;
        let rows = t.numel() / t.shape.last().copied().unwrap_or(1).max(1);
        let v = self.rows_f32(name, t, 0, rows)?;
        Ok(Tensor::from_vec(v, t.shape.as_slice(), device)?)
    }

    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor> {
        let t = self.get(name)?;
        let cols = *t.shape.last().unwrap_or(&1);
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            check_row(id, t.shape[0])?;
            out.extend(self.rows_f32(name, t, id as usize, 1)?);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), device)?)
    }

    fn form(&self, name: &str) -> Result<Form> {
        Ok(self.held(self.get(name)?))
    }

    fn read_rows(&self, name: &str, start: usize, len: usize, mut buf: AlignedBuf) -> Result<Mat> {
        let t = self.get(name)?;
        let path = &self.file.path;
        // A stack of matrices (a layer's experts) is read as its rows laid end to end.
        if t.shape.len() < 2 {
            return Err(Error::tensor(
                path,
                name,
                format!("expected a matrix, got shape {:?}", t.shape),
            ));
        }
        let (cols, rows) = flat_rows(&t.shape);
        check_range(path, name, start, len, rows)?;
        let rb = t.row_bytes();
        let f = &self.file;
        let off =
            f.io.read_into(
                &f.file,
                f.direct.as_ref(),
                t.offset + (start * rb) as u64,
                len * rb,
                &mut buf,
            )
            .map_err(|e| Error::tensor(path, name, format!("read failed: {e}")))?;
        let form = self.held(t);
        if form != t.form {
            // Dequantized for reference checks: widened once, into a buffer of its own.
            let v = Mat::new(t.form, len, cols, buf, off)?
                .view()
                .to_f32()
                .map_err(|e| Error::tensor(path, name, e.to_string()))?;
            let mut wide = AlignedBuf::with_capacity(4 * v.len());
            wide.bytes_mut(4 * v.len())
                .copy_from_slice(bytemuck::cast_slice(&v));
            return Mat::new(Form::F32, len, cols, wide, 0);
        }
        Mat::new(form, len, cols, buf, off)
    }
}
