//! The compute device, named once: `cpu`, `cuda` or `cuda:N`.

use candle_core::Device;

use crate::error::{Error, Result};

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

/// Free memory on a GPU.
#[cfg(feature = "cuda")]
pub fn free_memory(device: &Device) -> Result<u64> {
    crate::stream::cuda::free_memory(device)
}

#[cfg(not(feature = "cuda"))]
pub fn free_memory(_device: &Device) -> Result<u64> {
    Err(Error::Device(
        "this build has no GPU support; build with the `cuda` feature (scripts/build_cuda.sh)"
            .into(),
    ))
}
