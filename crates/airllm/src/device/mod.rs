//! The compute device behind one trait. A [`Backend`] answers what the rest of the engine asks
//! of a device: its free memory, a [`Link`] to copy host rows over, loading a matrix to hold
//! there, the split half-precision product, and its memory figures. There are three: the CPU
//! (no device tier), a simulated device (the CPU with memory and slots of its own, to test the
//! tiers without a GPU), and CUDA. `cfg(feature = "cuda")` appears in this module only: the
//! engine and `stream/` depend on it, and it depends on neither (it takes plain numbers).

#[cfg(feature = "cuda")]
mod cuda;
mod link;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::mat::AlignedBuf;
use crate::weights::WeightSource;

pub use link::{dense_matmul, float_dtype, DevMat, HostRows, Link, ReadRows, SimLink};

/// The compute device `cpu`, `cuda` or `cuda:N` names.
pub fn parse(s: &str) -> Result<Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
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
        return Err(Error::Device(format!(
            "`{s}`: this build has no CUDA; build one with scripts/build_cuda.sh (the `cuda` feature)"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// What the engine asks of a compute device. The defaults are the host's answers: no memory
/// of its own, matrices held in host memory, no memory figures.
pub trait Backend: Sync {
    /// Free memory a device budget may take by default; `None` where the device has no memory
    /// of its own to measure.
    fn free_memory(&self, _device: &Device) -> Result<Option<u64>> {
        Ok(None)
    }
    /// A link with `slots` staging slots of `slot_bytes` each.
    fn link(&self, device: &Device, slots: usize, slot_bytes: u64) -> Result<Box<dyn Link>>;
    /// Matrix `name` held on `device` in its own form, read `chunk_bytes` of rows at a time
    /// through `scratch`.
    fn load_matrix(
        &self,
        src: &dyn WeightSource,
        name: &str,
        _device: &Device,
        _chunk_bytes: u64,
        _scratch: &mut AlignedBuf,
    ) -> Result<DevMat> {
        Ok(DevMat::Host(src.load_mat(name)?))
    }
    /// `x Wᵀ` for f32 `x` and a half-precision `W` on the device, near f32 accuracy.
    fn split_matmul(&self, _x: &Tensor, _w: &Tensor) -> Result<Tensor> {
        Err(Error::Internal("the split product on the CPU".into()))
    }
    /// Bytes in use on the device (the whole process's); `None` where not measured.
    fn memory_used(&self, _device: &Device) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The most bytes the device's allocator reserved since the last reset; `reset` starts a
    /// new high-water mark.
    fn pool_peak(&self, _device: &Device, _reset: bool) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Host→device bandwidth from pinned memory, bytes per second.
    fn h2d_bandwidth(&self, _device: &Device, _bytes: usize) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// The CPU: weights and compute in host memory, nothing to copy.
struct Cpu;

/// The CPU posing as a device with memory of its own: the host in all but its link.
struct Simulated;

impl Backend for Cpu {
    fn link(&self, _: &Device, _: usize, _: u64) -> Result<Box<dyn Link>> {
        Err(Error::Internal(
            "a link on the CPU without a simulated device".into(),
        ))
    }
}

impl Backend for Simulated {
    fn link(&self, _: &Device, slots: usize, slot_bytes: u64) -> Result<Box<dyn Link>> {
        Ok(Box::new(SimLink::new(slots, slot_bytes)))
    }
}

/// A GPU in a build without CUDA: every request says so.
#[cfg(not(feature = "cuda"))]
struct NoCuda;

#[cfg(not(feature = "cuda"))]
impl NoCuda {
    fn refuse<T>(&self) -> Result<T> {
        Err(Error::Device(
            "this build has no GPU support; build with the `cuda` feature (scripts/build_cuda.sh)"
                .into(),
        ))
    }
}

#[cfg(not(feature = "cuda"))]
impl Backend for NoCuda {
    fn free_memory(&self, _: &Device) -> Result<Option<u64>> {
        self.refuse()
    }
    fn link(&self, _: &Device, _: usize, _: u64) -> Result<Box<dyn Link>> {
        self.refuse()
    }
    fn load_matrix(
        &self,
        _: &dyn WeightSource,
        _: &str,
        _: &Device,
        _: u64,
        _: &mut AlignedBuf,
    ) -> Result<DevMat> {
        self.refuse()
    }
    fn split_matmul(&self, _: &Tensor, _: &Tensor) -> Result<Tensor> {
        self.refuse()
    }
    fn memory_used(&self, _: &Device) -> Result<Option<u64>> {
        self.refuse()
    }
    fn pool_peak(&self, _: &Device, _: bool) -> Result<Option<u64>> {
        self.refuse()
    }
    fn h2d_bandwidth(&self, _: &Device, _: usize) -> Result<Option<f64>> {
        self.refuse()
    }
}

/// The backend of `device`: the CPU's, or the GPU's.
pub fn of(device: &Device) -> &'static dyn Backend {
    if device.is_cpu() {
        return &Cpu;
    }
    #[cfg(feature = "cuda")]
    {
        &cuda::Cuda
    }
    #[cfg(not(feature = "cuda"))]
    {
        &NoCuda
    }
}

/// The backend of a device tier on `device`: the simulated one on the CPU.
pub fn tier(device: &Device) -> &'static dyn Backend {
    if device.is_cpu() {
        &Simulated
    } else {
        of(device)
    }
}
