//! Weight sources: where tensors come from, independent of how they are held or computed.
//! The engine asks a source for one tensor (or a few rows of one) at a time, in compute form,
//! so a layer is only ever as resident as the streamer decides.
//!
//! Compute form is f32 for f32/f16/bf16 data (exact, and what the CPU multiplies fastest), and the
//! file's own blocks for quantized GGUF data, multiplied with candle's quantized kernels.

pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod io;
pub mod names;
pub mod safetensors;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use gguf::{GgufFile, GgufTensor};
pub use names::{Naming, Role};
use safetensors::{read_as, SafetensorsSet, TensorInfo};

/// What the planner needs to know about one stored tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    /// Bytes on disk.
    pub file_bytes: u64,
    /// Bytes once loaded for compute.
    pub compute_bytes: u64,
    pub dtype: &'static str,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A matrix ready to multiply: dense f32, or quantized blocks.
pub enum Weight {
    Dense(Tensor),
    Quant(QMatMul, u64),
}

impl Weight {
    /// `x Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // f16 weights multiply in f16 (widening the weight per call costs more than
            // candle's f16 kernel loses to f32 at prefill sizes).
            Weight::Dense(w) if w.dtype() == candle_core::DType::F16 => x
                .to_dtype(candle_core::DType::F16)?
                .matmul(&w.t()?)?
                .to_dtype(candle_core::DType::F32)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Quant(QMatMul::QTensor(q), _)
                if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 =>
            {
                match blocks_matmul(q, x)? {
                    Some(y) => y,
                    None => Module::forward(&QMatMul::QTensor(q.clone()), x)?,
                }
            }
            Weight::Quant(q, _) => q.forward(x)?,
        })
    }
    pub fn bytes(&self) -> u64 {
        match self {
            Weight::Dense(w) => (w.elem_count() * w.dtype().size_in_bytes()) as u64,
            Weight::Quant(_, b) => *b,
        }
    }
}

/// `x Wᵀ` on the CPU straight from the stored blocks, with candle's block kernels.
///
/// candle's `QMatMul` would repack Q4_K (and Q6_K for several rows) into a wider tile layout on
/// first use and keep both copies: about 2.3× the weight's memory, outside our budget, and, for
/// a streamed layer, a repacking pass on every token. Returns `None` for types without a kernel
/// here, which go through `QMatMul`.
fn blocks_matmul(q: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    use candle_core::quantized::k_quants::{self as kq, GgmlType};
    fn go<T: GgmlType>(
        mkn: (usize, usize, usize),
        lhs: &[f32],
        bytes: &[u8],
        dst: &mut [f32],
    ) -> Result<()> {
        let size = std::mem::size_of::<T>();
        assert!(
            bytes.len().is_multiple_of(size)
                && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
            "block storage is whole, aligned blocks"
        );
        // SAFETY: the bytes are the tensor's own block storage (a `Vec<T>` on the CPU), checked
        // above to be whole and aligned; block types are plain data.
        let blocks =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) };
        kq::matmul(mkn, lhs, blocks, dst)?;
        Ok(())
    }
    let (n, k) = q.shape().dims2()?;
    let x = x.contiguous()?;
    let m = x.elem_count() / k;
    // The activations are read in place, without a copy.
    let (guard, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*guard else {
        return Ok(None);
    };
    let off = layout.start_offset();
    let lhs = &cpu.as_slice::<f32>()?[off..off + m * k];
    let data = q.data()?;
    let mut dst = vec![0f32; m * n];
    let mkn = (m, k, n);
    match q.dtype() {
        GgmlDType::Q4_0 => go::<kq::BlockQ4_0>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q4_1 => go::<kq::BlockQ4_1>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q5_0 => go::<kq::BlockQ5_0>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q5_1 => go::<kq::BlockQ5_1>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q8_0 => go::<kq::BlockQ8_0>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q2K => go::<kq::BlockQ2K>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q3K => go::<kq::BlockQ3K>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q4K => go::<kq::BlockQ4K>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q5K => go::<kq::BlockQ5K>(mkn, lhs, &data, &mut dst)?,
        GgmlDType::Q6K => go::<kq::BlockQ6K>(mkn, lhs, &data, &mut dst)?,
        _ => return Ok(None),
    }
    drop(guard);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = n;
    Ok(Some(Tensor::from_vec(dst, dims, x.device())?))
}

/// A checkpoint on disk that tensors can be read from by name. Implementations must be usable
/// from the background reader thread.
pub trait WeightSource: Send + Sync {
    /// The file or folder, for messages.
    fn path(&self) -> &Path;
    fn naming(&self) -> Naming;
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    /// Reads a whole tensor as f32 (norms, biases).
    fn load(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// Reads a matrix in compute form.
    fn load_weight(&self, name: &str, device: &Device) -> Result<Weight>;
    /// Reads rows `ids` of a 2-D tensor (embedding lookup) as f32 `[ids.len(), cols]`.
    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor>;
    /// Reads rows `start..start+len` of a matrix in compute form (an output-head chunk).
    fn load_row_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Weight>;
    /// Read accounting and page-cache policy.
    fn io(&self) -> &io::Io;
    /// The files the weights live in, for measuring raw read bandwidth.
    fn files(&self) -> Vec<PathBuf>;
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
    /// Hold matrices as f16 instead of f32: half the memory and, for one row, about 1.8× the
    /// matmul speed on this class of CPU, at the cost of f16 rounding (opt-in, not exact).
    pub f16: bool,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            set: SafetensorsSet::open_dir(dir)?,
            io: io::Io::default(),
            f16: false,
        })
    }

    /// Reads rows `start..start+rows` of a matrix in the matrix compute form.
    fn read_matrix(
        &self,
        name: &str,
        start: usize,
        rows: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        let (at, n) = (start * cols, rows * cols);
        Ok(if self.f16 {
            let v: Vec<half::f16> = read_as(&self.io, shard, name, info, at, n)?;
            Tensor::from_vec(v, (rows, cols), device)?
        } else {
            let v: Vec<f32> = read_as(&self.io, shard, name, info, at, n)?;
            Tensor::from_vec(v, (rows, cols), device)?
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
            compute_bytes: i.numel() as u64 * if self.f16 && i.shape.len() == 2 { 2 } else { 4 },
            dtype: i.dtype.name(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let data = read_as::<f32>(&self.io, shard, name, info, 0, info.numel())?;
        Ok(Tensor::from_vec(data, info.shape.as_slice(), device)?)
    }

    fn load_weight(&self, name: &str, device: &Device) -> Result<Weight> {
        let rows = self.get(name)?.0.shape[0];
        Ok(Weight::Dense(self.read_matrix(name, 0, rows, device)?))
    }

    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            check_row(id, info.shape[0])?;
            out.extend(read_as::<f32>(
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

    fn load_row_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Weight> {
        Ok(Weight::Dense(self.read_matrix(name, start, len, device)?))
    }
}

fn check_row(id: u32, rows: usize) -> Result<()> {
    if id as usize >= rows {
        return Err(Error::Invalid(format!(
            "token id {id} is outside the embedding table of {rows} rows"
        )));
    }
    Ok(())
}

/// A llama.cpp GGUF file, read in place. Quantized matrices stay quantized.
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

    /// Reads whole rows `start..start+len` of a tensor as a quantized tensor.
    fn rows_q(
        &self,
        name: &str,
        t: &GgufTensor,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<QTensor> {
        let rb = t.row_bytes();
        let mut shape = t.shape.clone();
        shape[0] = len;
        self.read_q(
            name,
            t.dtype,
            t.offset + (start * rb) as u64,
            len * rb,
            shape,
            device,
        )
    }

    /// Reads `nbytes` of blocks at `at`. On the CPU the blocks are read straight into the
    /// tensor's storage, so a tensor never exists twice in memory while loading.
    fn read_q(
        &self,
        name: &str,
        dtype: GgmlDType,
        at: u64,
        nbytes: usize,
        shape: Vec<usize>,
        device: &Device,
    ) -> Result<QTensor> {
        use candle_core::quantized::k_quants::*;
        use candle_core::quantized::QStorage;
        fn blocks<T: GgmlType + Send + Sync + 'static>(
            f: &GgufFile,
            name: &str,
            at: u64,
            nbytes: usize,
        ) -> Result<QStorage> {
            let n = nbytes / std::mem::size_of::<T>();
            let mut v: Vec<T> = vec![T::zeros(); n];
            // SAFETY: block types are plain old data (integers and f16s, `repr(C)`) with no
            // invalid bit patterns, and the slice covers exactly the vector's initialised bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr() as *mut u8,
                    n * std::mem::size_of::<T>(),
                )
            };
            f.io.read_at(&f.file, bytes, at)
                .map_err(|e| Error::tensor(&f.path, name, format!("read failed: {e}")))?;
            Ok(QStorage::Cpu(Box::new(v)))
        }
        let f = &self.file;
        if !device.is_cpu() {
            return self.read_q_copy(name, dtype, at, nbytes, shape, device);
        }
        let storage = match dtype {
            GgmlDType::Q4_0 => blocks::<BlockQ4_0>(f, name, at, nbytes)?,
            GgmlDType::Q4_1 => blocks::<BlockQ4_1>(f, name, at, nbytes)?,
            GgmlDType::Q5_0 => blocks::<BlockQ5_0>(f, name, at, nbytes)?,
            GgmlDType::Q5_1 => blocks::<BlockQ5_1>(f, name, at, nbytes)?,
            GgmlDType::Q8_0 => blocks::<BlockQ8_0>(f, name, at, nbytes)?,
            GgmlDType::Q2K => blocks::<BlockQ2K>(f, name, at, nbytes)?,
            GgmlDType::Q3K => blocks::<BlockQ3K>(f, name, at, nbytes)?,
            GgmlDType::Q4K => blocks::<BlockQ4K>(f, name, at, nbytes)?,
            GgmlDType::Q5K => blocks::<BlockQ5K>(f, name, at, nbytes)?,
            GgmlDType::Q6K => blocks::<BlockQ6K>(f, name, at, nbytes)?,
            _ => return self.read_q_copy(name, dtype, at, nbytes, shape, device),
        };
        QTensor::new(storage, shape).map_err(|e| Error::tensor(&f.path, name, e.to_string()))
    }

    /// Float tensors and other devices: read the bytes, then let candle build the tensor.
    fn read_q_copy(
        &self,
        name: &str,
        dtype: GgmlDType,
        at: u64,
        nbytes: usize,
        shape: Vec<usize>,
        device: &Device,
    ) -> Result<QTensor> {
        let bytes = self.file.read(name, at, nbytes)?;
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &bytes, shape, device)
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
            compute_bytes: if is_float(t.dtype) || self.dequantize {
                t.numel() as u64 * 4
            } else {
                t.nbytes
            },
            dtype: gguf::type_name(t.dtype),
        })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.get(name)?;
        let q = self.read_q(
            name,
            t.dtype,
            t.offset,
            t.nbytes as usize,
            t.shape.clone(),
            device,
        )?;
        Ok(q.dequantize(device)?)
    }

    fn load_weight(&self, name: &str, device: &Device) -> Result<Weight> {
        let t = self.get(name)?;
        self.load_row_range(name, 0, t.shape[0], device)
    }

    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor> {
        let t = self.get(name)?;
        let mut rows = Vec::with_capacity(ids.len());
        for &id in ids {
            check_row(id, t.shape[0])?;
            rows.push(
                self.rows_q(name, t, id as usize, 1, device)?
                    .dequantize(device)?,
            );
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    fn load_row_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Weight> {
        let t = self.get(name)?;
        let q = self.rows_q(name, t, start, len, device)?;
        if is_float(t.dtype) || self.dequantize {
            return Ok(Weight::Dense(q.dequantize(device)?));
        }
        let bytes = (len * t.row_bytes()) as u64;
        Ok(Weight::Quant(QMatMul::from_qtensor(q)?, bytes))
    }
}
