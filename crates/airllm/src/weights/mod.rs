//! Weight sources: where tensors come from, independent of how they are held or computed.
//! The engine asks a source for one tensor (or a few rows of one) at a time, widened to the
//! compute dtype, so a layer is only ever as resident as the streamer decides.

pub mod names;
pub mod safetensors;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
pub use names::Role;
use safetensors::{read_f32, SafetensorsSet, TensorInfo};

/// What the planner needs to know about one stored tensor.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    /// Bytes on disk.
    pub file_bytes: u64,
    pub dtype: &'static str,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checkpoint on disk that tensors can be read from by name. Implementations must be usable
/// from the background reader thread.
pub trait WeightSource: Send + Sync {
    /// The file or folder, for messages.
    fn path(&self) -> &Path;
    fn meta(&self, name: &str) -> Option<TensorMeta>;
    /// Reads a whole tensor as f32.
    fn load(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// Reads rows `ids` of a 2-D tensor (embedding lookup) as f32 `[ids.len(), cols]`.
    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor>;
    /// Reads rows `start..start+len` of a 2-D tensor as f32.
    fn load_row_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Tensor>;
}

/// A Hugging Face folder of safetensors shards, read in place.
pub struct SafetensorsSource {
    dir: PathBuf,
    set: SafetensorsSet,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(SafetensorsSource {
            dir: dir.to_path_buf(),
            set: SafetensorsSet::open_dir(dir)?,
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

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.set.tensors.get(name).map(|i| TensorMeta {
            shape: i.shape.clone(),
            file_bytes: i.nbytes,
            dtype: i.dtype.name(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let data = read_f32(shard, name, info, 0, info.numel())?;
        Ok(Tensor::from_vec(data, info.shape.as_slice(), device)?)
    }

    fn load_rows(&self, name: &str, ids: &[u32], device: &Device) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            if id as usize >= info.shape[0] {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the embedding table of {} rows",
                    info.shape[0]
                )));
            }
            out.extend(read_f32(shard, name, info, id as usize * cols, cols)?);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), device)?)
    }

    fn load_row_range(
        &self,
        name: &str,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let (info, shard) = self.get(name)?;
        let cols = self.cols(name, info, shard)?;
        let data = read_f32(shard, name, info, start * cols, len * cols)?;
        Ok(Tensor::from_vec(data, (len, cols), device)?)
    }
}
