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

use candle_core::quantized::GgmlDType;
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

    /// Reads a whole matrix into a buffer of its own.
    fn load_mat(&self, name: &str) -> Result<Mat> {
        let rows = self
            .meta(name)
            .ok_or_else(|| Error::tensor(self.path(), name, "missing from the checkpoint"))?
            .shape[0];
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
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            set: SafetensorsSet::open_dir(dir)?,
            io: io::Io::default(),
            f16: false,
            keep_f32: Default::default(),
        })
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
        }
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
        Ok(self.held(name, self.get(name)?.0))
    }

    fn read_rows(&self, name: &str, start: usize, len: usize, mut buf: AlignedBuf) -> Result<Mat> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        check_range(&shard.path, name, start, len, info.shape[0])?;
        let es = info.dtype.size();
        let at = info.offset + (start * cols * es) as u64;
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
        let form = self.held(name, info);
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

fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
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
        if self.dequantize && !is_float(t.dtype) {
            Form::F32
        } else {
            Form::of_ggml(t.dtype)
        }
    }

    /// `rows` whole rows of `t` starting at `start`, widened to f32.
    fn rows_f32(&self, name: &str, t: &GgufTensor, start: usize, rows: usize) -> Result<Vec<f32>> {
        let rb = t.row_bytes();
        let bytes = self
            .file
            .read(name, t.offset + (start * rb) as u64, rows * rb)?;
        MatView {
            form: Form::of_ggml(t.dtype),
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
            dtype: gguf::type_name(t.dtype),
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
        if form != Form::of_ggml(t.dtype) {
            // Dequantized for reference checks: widened once, into a buffer of its own.
            let v = Mat::new(Form::of_ggml(t.dtype), len, cols, buf, off)?
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
