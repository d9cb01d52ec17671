//! What crosses to the compute device, and what lives there: [`Link`] copies host rows into
//! device slots and multiplies them; [`DevMat`] is a matrix held on the device for the
//! engine's life. [`SimLink`] is a CPU "device" with slots of its own, which lets the tier plan
//! and the staging pipeline be tested without a GPU.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::matmul::mat_tensor;
use crate::weights::mat::{AlignedBuf, Form, Mat, MatView};
use crate::weights::WeightSource;

/// Rows the reader delivered, in a buffer that goes back to its pool when dropped.
pub trait ReadRows: Send {
    fn view(&self) -> MatView<'_>;
}

/// Rows of a matrix that live on the host, on their way to the device.
pub enum HostRows<'a> {
    /// Part of a matrix held in host memory for the engine's life.
    Held(MatView<'a>),
    /// A slice the reader just read; its buffer goes back to the pool once copied.
    Read(Box<dyn ReadRows>),
}

impl HostRows<'_> {
    pub fn view(&self) -> MatView<'_> {
        match self {
            HostRows::Held(v) => *v,
            HostRows::Read(s) => s.view(),
        }
    }
}

/// Host-to-device transfer and the product on the device.
pub trait Link: Send {
    /// `x Wᵀ` for rows `w` that live on the host, with `x` on the device.
    fn matmul(&mut self, w: HostRows<'_>, x: &Tensor) -> Result<Tensor>;
    /// Waits for every copy in flight, so host buffers may be reused or freed.
    fn finish(&mut self) -> Result<()>;
}

/// A CPU "device" with memory of its own: each slice is copied into one of its slots and
/// multiplied from there, as a GPU link would. It exists to test the tiers and the staging
/// pipeline without a GPU; its results must equal a plain CPU run's.
pub struct SimLink {
    slots: Vec<AlignedBuf>,
    next: usize,
}

impl SimLink {
    pub fn new(slots: usize, slot_bytes: u64) -> Self {
        SimLink {
            slots: (0..slots.max(1))
                .map(|_| AlignedBuf::with_capacity(slot_bytes as usize))
                .collect(),
            next: 0,
        }
    }
}

impl Link for SimLink {
    fn matmul(&mut self, w: HostRows<'_>, x: &Tensor) -> Result<Tensor> {
        let v = w.view();
        let (form, rows, cols, len) = (v.form, v.rows, v.cols, v.data.len());
        let i = self.next;
        self.next = (i + 1) % self.slots.len();
        let mut buf = std::mem::take(&mut self.slots[i]);
        if v.data.len() > buf.capacity() {
            self.slots[i] = buf;
            return Err(Error::Internal(format!(
                "a slice of {} bytes does not fit a staging slot of {}",
                v.data.len(),
                self.slots[i].capacity()
            )));
        }
        buf.bytes_mut(len).copy_from_slice(v.data);
        drop(w); // the copy is done: a read slice's buffer goes back to the pool now
        let m = Mat::new(form, rows, cols, buf, 0)?;
        let y = mat_tensor(x, m.view());
        self.slots[i] = m.into_buf();
        y
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A matrix held on the compute device for the engine's life.
pub enum DevMat {
    /// In host memory, in the file's form, multiplied by our CPU kernels.
    Host(Mat),
    /// bf16, f16 or f32 on a GPU, multiplied in its own type.
    Dense(Tensor),
    /// Quantized blocks on a GPU, multiplied by candle's quantized kernels.
    Quant(QMatMul, u64),
}

impl DevMat {
    /// Reads matrix `name` onto `device` in its own form: whole into host memory for the CPU;
    /// for a GPU `chunk_bytes` of rows at a time through `scratch`, so the host never holds
    /// more than a chunk of a device-resident matrix.
    pub fn load(
        src: &dyn WeightSource,
        name: &str,
        device: &Device,
        chunk_bytes: u64,
        scratch: &mut AlignedBuf,
    ) -> Result<DevMat> {
        if device.is_cpu() {
            return Ok(DevMat::Host(src.load_mat(name)?));
        }
        super::of(device).load_matrix(src, name, device, chunk_bytes, scratch)
    }

    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            DevMat::Host(m) => mat_tensor(x, m.view()),
            DevMat::Dense(w) => dense_matmul(x, w),
            DevMat::Quant(q, _) => Ok(q.forward(x)?),
        }
    }

    pub fn bytes(&self) -> u64 {
        match self {
            DevMat::Host(m) => m.bytes(),
            DevMat::Dense(w) => (w.elem_count() * w.dtype().size_in_bytes()) as u64,
            DevMat::Quant(_, b) => *b,
        }
    }
}

/// The candle type of a float form; `None` for quantized blocks.
pub fn float_dtype(f: Form) -> Option<DType> {
    match f {
        Form::F32 => Some(DType::F32),
        Form::F16 => Some(DType::F16),
        Form::BF16 => Some(DType::BF16),
        Form::Q(_) | Form::F8(..) | Form::Mxfp4 { .. } => None,
    }
}

/// `x Wᵀ` with `x` f32 and `W` in its own float type, with an f32 result. On a GPU a half-
/// precision `W` is multiplied on the tensor cores in its own type, near f32 accuracy (see
/// `cuda::split_matmul`); elsewhere `x` is rounded to W's type.
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dt = w.dtype();
    if !x.device().is_cpu() && dt != DType::F32 {
        return super::of(x.device()).split_matmul(x, w);
    }
    let xs = if dt == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(dt)?
    };
    let y = xs.matmul(&w.t()?)?;
    Ok(if dt == DType::F32 {
        y
    } else {
        y.to_dtype(DType::F32)?
    })
}
