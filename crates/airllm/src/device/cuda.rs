//! The GPU link: pinned host buffers, a copy stream of its own, and device slots reused for the
//! engine's life.
//!
//! Each slice is copied into the next slot on the copy stream, and the product waits for that
//! copy with an event, so slice i+1 crosses PCIe while slice i is multiplied. A slot is not
//! overwritten before the product that read it has run (another event), and a read buffer goes
//! back to the reader's pool only once its copy has finished.

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaStream, DevicePtr,
};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul};
use candle_core::{DType, Device, Module, Storage, Tensor};

use super::link::{dense_matmul, float_dtype, DevMat, HostRows, Link, ReadRows};
use crate::error::{Error, Result};
use crate::weights::mat::{set_host_pinning, AlignedBuf, Form, HostPin, MatView};
use crate::weights::WeightSource;

/// A float matrix's rows as a tensor on `device` (a copy).
fn view_tensor(v: MatView<'_>, dt: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_raw_buffer(
        &v.data[..v.rows * v.form.row_bytes(v.cols)],
        dt,
        &[v.rows, v.cols],
        device,
    )?)
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("CUDA: {what}: {e:?}"))
}

fn cuda_device(device: &Device) -> Result<&candle_core::CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(Error::Internal("the CUDA link needs a CUDA device".into())),
    }
}

/// Free and total memory of the GPU behind `device`.
pub fn memory_info(device: &Device) -> Result<(u64, u64)> {
    let d = cuda_device(device)?;
    let (free, total) = d
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| cuda_err("reading free memory", e))?;
    Ok((free as u64, total as u64))
}

pub fn free_memory(device: &Device) -> Result<u64> {
    memory_info(device).map(|(f, _)| f)
}

/// Page-locks host buffers through the driver.
struct DriverPin {
    ctx: Arc<CudaContext>,
}

impl HostPin for DriverPin {
    fn pin(&self, ptr: *mut u8, len: usize) -> bool {
        if self.ctx.bind_to_thread().is_err() {
            return false;
        }
        // SAFETY: `ptr` owns `len` bytes until `unpin` is called before it is freed.
        unsafe {
            sys::cuMemHostRegister_v2(ptr as *mut _, len, sys::CU_MEMHOSTREGISTER_PORTABLE)
                .result()
                .is_ok()
        }
    }
    fn unpin(&self, ptr: *mut u8) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: registered by `pin`; an error (context gone) leaves nothing to undo.
            let _ = unsafe { sys::cuMemHostUnregister(ptr as *mut _) };
        }
    }
}

/// A device buffer slices are copied into, typed for the model's float matrices.
struct Slot {
    t: Tensor,
    ptr: sys::CUdeviceptr,
    bytes: usize,
    /// Recorded on the compute stream after the last product that read the slot.
    free: Option<CudaEvent>,
}

pub struct CudaLink {
    device: Device,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    slot_bytes: u64,
    /// Allocated at the first float slice, in its type (a model's matrices share one).
    slots: Vec<Slot>,
    nslots: usize,
    next: usize,
    /// Read buffers whose copy may still be running, with the event that ends it.
    pending: VecDeque<(CudaEvent, Box<dyn ReadRows>)>,
}

// SAFETY: the link is used by one thread at a time (the engine's); the raw device pointers it
// keeps are owned by its slot tensors.
unsafe impl Send for CudaLink {}

impl CudaLink {
    pub fn new(device: &Device, slots: usize, slot_bytes: u64) -> Result<Self> {
        let d = cuda_device(device)?;
        let compute = d.cuda_stream();
        let ctx = compute.context().clone();
        set_host_pinning(Box::new(DriverPin { ctx: ctx.clone() }));
        let copy = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the copy stream", e))?;
        Ok(CudaLink {
            device: device.clone(),
            compute,
            copy,
            slot_bytes,
            slots: Vec::new(),
            nslots: slots.max(2),
            next: 0,
            pending: VecDeque::new(),
        })
    }

    fn make_slots(&mut self, dt: DType) -> Result<()> {
        let elems = self.slot_bytes as usize / dt.size_in_bytes();
        for _ in 0..self.nslots {
            let t = Tensor::zeros(elems, dt, &self.device)?;
            let ptr = {
                let (st, _) = t.storage_and_layout();
                let Storage::Cuda(cs) = &*st else {
                    return Err(Error::Internal("slot not on the GPU".into()));
                };
                let p = match dt {
                    DType::BF16 => {
                        cs.as_cuda_slice::<half::bf16>()?
                            .device_ptr(&self.compute)
                            .0
                    }
                    DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&self.compute).0,
                    _ => cs.as_cuda_slice::<f32>()?.device_ptr(&self.compute).0,
                };
                p
            };
            self.slots.push(Slot {
                t,
                ptr,
                bytes: elems * dt.size_in_bytes(),
                free: None,
            });
        }
        // The slots are allocated and zeroed on the compute stream: the first copy into each
        // (on the copy stream) must wait for that.
        for slot in &mut self.slots {
            slot.free = Some(
                self.compute
                    .record_event(None)
                    .map_err(|e| cuda_err("recording the slots' allocation", e))?,
            );
        }
        Ok(())
    }

    /// Waits for the copies of the read buffers still held, so at most one (the newest) is
    /// held between products; `finish` returns that one too.
    fn settle(&mut self) -> Result<()> {
        while let Some((ev, _)) = self.pending.front() {
            ev.synchronize()
                .map_err(|e| cuda_err("waiting for a copy", e))?;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Copies `w` into the next slot on the copy stream and multiplies it on the compute
    /// stream once the copy is done. Returns the product and the copy's event.
    fn staged(
        &mut self,
        v: crate::weights::mat::MatView<'_>,
        dt: DType,
        x: &Tensor,
    ) -> Result<(Tensor, CudaEvent)> {
        // The raw copy below does not make the context current itself.
        self.copy
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        if self.slots.is_empty() {
            self.make_slots(dt)?;
        }
        let i = self.next;
        self.next = (i + 1) % self.slots.len();
        let slot = &mut self.slots[i];
        let len = v.rows * v.form.row_bytes(v.cols);
        if len > slot.bytes {
            return Err(Error::Internal(format!(
                "a slice of {len} bytes does not fit a staging slot of {}",
                slot.bytes
            )));
        }
        if let Some(ev) = &slot.free {
            self.copy
                .wait(ev)
                .map_err(|e| cuda_err("ordering a copy", e))?;
        }
        // SAFETY: the slot holds `slot.bytes >= len` bytes and lives as long as the link; the
        // source stays alive until the copy's event completes (see `pending` and `finish`).
        unsafe { result::memcpy_htod_async(slot.ptr, &v.data[..len], self.copy.cu_stream()) }
            .map_err(|e| cuda_err("copying a slice to the GPU", e))?;
        let ready = self
            .copy
            .record_event(None)
            .map_err(|e| cuda_err("recording a copy", e))?;
        self.compute
            .wait(&ready)
            .map_err(|e| cuda_err("ordering a product", e))?;
        let w = slot
            .t
            .narrow(0, 0, v.rows * v.cols)?
            .reshape((v.rows, v.cols))?;
        let y = dense_matmul(x, &w)?;
        slot.free = Some(
            self.compute
                .record_event(None)
                .map_err(|e| cuda_err("recording a product", e))?,
        );
        Ok((y, ready))
    }
}

impl Link for CudaLink {
    fn matmul(&mut self, w: HostRows<'_>, x: &Tensor) -> Result<Tensor> {
        let v = w.view();
        let slot_dt = self.slots.first().map(|s| s.t.dtype());
        let (y, done) = match float_dtype(v.form) {
            Some(dt) if slot_dt.is_none_or(|s| s == dt) => self.staged(v, dt, x)?,
            // Quantized slices (and a float type other than the slots'): a device copy of
            // their own, made on the compute stream, in candle's own types.
            dt => {
                let y = match (dt, v.form) {
                    (Some(dt), _) => dense_matmul(x, &view_tensor(v, dt, &self.device)?)?,
                    (None, Form::Q(t)) => {
                        let q = qtensor_from_ggml(t, v.data, vec![v.rows, v.cols], &self.device)?;
                        QMatMul::from_qtensor(q)?.forward(x)?
                    }
                    (None, f) => {
                        return Err(Error::Device(format!(
                            "{} weights are multiplied on the CPU only in this version",
                            f.name()
                        )))
                    }
                };
                let ev = self
                    .compute
                    .record_event(None)
                    .map_err(|e| cuda_err("recording a product", e))?;
                (y, ev)
            }
        };
        self.settle()?;
        if let HostRows::Read(s) = w {
            self.pending.push_back((done, s));
        }
        Ok(y)
    }

    fn finish(&mut self) -> Result<()> {
        self.settle()?;
        self.copy
            .synchronize()
            .map_err(|e| cuda_err("finishing copies", e))
    }
}

impl Drop for CudaLink {
    fn drop(&mut self) {
        // Host buffers may be freed after this: no copy may still read them.
        let _ = self.finish();
    }
}

/// The default memory pool of the GPU behind `device`, from which candle's stream-ordered
/// allocations come.
fn default_pool(device: &Device) -> Result<sys::CUmemoryPool> {
    let d = cuda_device(device)?;
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(|e| cuda_err("binding the context", e))?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes one handle into `pool`.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| cuda_err("reading the memory pool", e))?;
    Ok(pool)
}

/// The most bytes the allocator has reserved on the device since the last reset; `reset`
/// starts a new high-water mark from what is reserved now.
pub fn pool_peak(device: &Device, reset: bool) -> Result<u64> {
    let pool = default_pool(device)?;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH;
    let mut v: u64 = 0;
    // SAFETY: the attribute is a u64 (cuuint64_t), read or (reset) written as zero.
    unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut _) }
        .result()
        .map_err(|e| cuda_err("reading the pool's peak", e))?;
    if reset {
        let mut zero: u64 = 0;
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut _) }
            .result()
            .map_err(|e| cuda_err("resetting the pool's peak", e))?;
    }
    Ok(v)
}

/// Host-to-device bandwidth from pinned memory, in bytes per second: `bytes` copied a few
/// times on a stream of its own.
pub fn h2d_bandwidth(device: &Device, bytes: usize) -> Result<f64> {
    let d = cuda_device(device)?;
    let ctx = d.cuda_stream().context().clone();
    set_host_pinning(Box::new(DriverPin { ctx: ctx.clone() }));
    let host = crate::weights::mat::AlignedBuf::with_capacity(bytes);
    if !host.is_pinned() {
        return Err(Error::Device(
            "CUDA: could not pin a host buffer to measure the link".into(),
        ));
    }
    let dst = Tensor::zeros(bytes, DType::U8, device)?;
    let stream = ctx
        .new_stream()
        .map_err(|e| cuda_err("creating a stream", e))?;
    let ptr = {
        let (st, _) = dst.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Internal("buffer not on the GPU".into()));
        };
        let p = cs.as_cuda_slice::<u8>()?.device_ptr(&stream).0;
        p
    };
    d.cuda_stream()
        .synchronize()
        .map_err(|e| cuda_err("synchronizing", e))?;
    let src = host.bytes(bytes);
    let copy = |n: usize| -> Result<std::time::Duration> {
        let t = std::time::Instant::now();
        for _ in 0..n {
            // SAFETY: both buffers hold `bytes` bytes and outlive the synchronize below.
            unsafe { result::memcpy_htod_async(ptr, src, stream.cu_stream()) }
                .map_err(|e| cuda_err("copying", e))?;
        }
        stream
            .synchronize()
            .map_err(|e| cuda_err("synchronizing", e))?;
        Ok(t.elapsed())
    };
    copy(2)?;
    let n = 8;
    let t = copy(n)?;
    // Freed, and the allocator's pool trimmed (it releases at a synchronization), so the
    // measurement leaves nothing behind in device memory figures taken after it.
    drop(dst);
    ctx.synchronize()
        .map_err(|e| cuda_err("synchronizing", e))?;
    Ok((n * bytes) as f64 / t.as_secs_f64().max(1e-9))
}

/// A tensor's device address on `stream`, at its first element.
fn tensor_ptr(t: &Tensor, stream: &CudaStream) -> Result<sys::CUdeviceptr> {
    let (st, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(Error::Internal("a tensor not on the GPU".into()));
    };
    let off = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    let p = match t.dtype() {
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        other => return Err(Error::Internal(format!("no GPU product for {other:?}"))),
    };
    Ok(p + off)
}

/// `x Wᵀ` for an f32 `x` `[n, k]` and a bf16/f16 `W` `[r, k]`, with f32 accuracy: `x` is split
/// into its half-precision value and the remainder (`x = hi + lo`), and both products run on
/// the tensor cores in W's own type, accumulating into one f32 result. Nothing is widened, and
/// the error is near that of the f32 product (bf16: 2⁻¹⁶ relative, f16: 2⁻²² relative to the
/// row's largest value), not that of rounding `x` to W's type (2⁻⁹ for bf16).
pub fn split_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let d = cuda_device(x.device())?;
    let dt = w.dtype();
    let (r, k) = w.dims2()?;
    let x = x.contiguous()?;
    let n = x.elem_count() / k.max(1);
    let w = w.contiguous()?;
    // f16 tops out at 65504: each row of x is scaled to at most 1 first, and its product
    // scaled back (row n of x scales only row n of the result). bf16 has f32's range.
    let scale = if dt == DType::F16 {
        Some(
            x.abs()?
                .max_keepdim(candle_core::D::Minus1)?
                .clamp(1e-30f32, f32::MAX)?,
        )
    } else {
        None
    };
    let xs = match &scale {
        Some(s) => x.broadcast_div(s)?,
        None => x.clone(),
    };
    let hi = xs.to_dtype(dt)?;
    let lo = (&xs - hi.to_dtype(DType::F32)?)?.to_dtype(dt)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = r;
    let y = Tensor::zeros(out_dims, DType::F32, x.device())?;
    let stream = d.cuda_stream();
    let blas = d.cublas_handle();
    let ty = match dt {
        DType::BF16 => candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
        _ => candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType::CUDA_R_16F,
    };
    use candle_core::cuda_backend::cudarc::cublas::sys as cb;
    let (wp, yp) = (tensor_ptr(&w, &stream)?, tensor_ptr(&y, &stream)?);
    for (part, beta) in [(&hi, 0f32), (&lo, 1f32)] {
        let xp = tensor_ptr(part, &stream)?;
        let alpha = 1f32;
        // Row-major y[n, r] = x[n, k] · W[r, k]ᵀ is column-major Y[r, n] = Wᵀ[r, k] · X[k, n].
        // SAFETY: the pointers address live tensors of the sizes given; the handle runs on
        // candle's stream, which owns them.
        let status = unsafe {
            cb::cublasGemmEx(
                *blas.handle(),
                cb::cublasOperation_t::CUBLAS_OP_T,
                cb::cublasOperation_t::CUBLAS_OP_N,
                r as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                wp as *const _,
                ty,
                k as i32,
                xp as *const _,
                ty,
                k as i32,
                &beta as *const f32 as *const _,
                yp as *mut _,
                cb::cudaDataType::CUDA_R_32F,
                r as i32,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cuda_err("a half-precision product", status));
        }
    }
    Ok(match scale {
        Some(s) => y.broadcast_mul(&s)?,
        None => y,
    })
}

/// Reads matrix `name` into device memory in its own form, `chunk_bytes` of rows at a time
/// through `scratch`, so the host never holds more than one chunk of it.
pub fn load_matrix(
    src: &dyn WeightSource,
    name: &str,
    device: &Device,
    chunk_bytes: u64,
    scratch: &mut AlignedBuf,
) -> Result<DevMat> {
    let d = cuda_device(device)?;
    let compute = d.cuda_stream();
    let meta = src
        .meta(name)
        .ok_or_else(|| Error::tensor(src.path(), name, "missing from the checkpoint"))?;
    let [rows, cols] = meta.shape[..] else {
        return Err(Error::tensor(
            src.path(),
            name,
            format!("expected a 2-D tensor, got shape {:?}", meta.shape),
        ));
    };
    let form = src.form(name)?;
    let row_bytes = form.row_bytes(cols);
    let (dst, mat) = match (float_dtype(form), form) {
        (Some(dt), _) => {
            let t = Tensor::zeros((rows, cols), dt, device)?;
            (tensor_ptr(&t, &compute)?, DevMat::Dense(t))
        }
        (None, Form::Q(q)) => {
            let st = candle_core::quantized::cuda::QCudaStorage::zeros(d, rows * cols, q)?;
            let ptr = st.device_ptr()? as sys::CUdeviceptr;
            let qt = candle_core::quantized::QTensor::new(
                candle_core::quantized::QStorage::Cuda(st),
                (rows, cols),
            )?;
            (
                ptr,
                DevMat::Quant(QMatMul::from_qtensor(qt)?, (rows * row_bytes) as u64),
            )
        }
        (None, f) => {
            return Err(Error::Device(format!(
                "{name}: {} weights are held on the CPU only in this version",
                f.name()
            )))
        }
    };
    let per = ((chunk_bytes / row_bytes.max(1) as u64) as usize).clamp(1, rows.max(1));
    let mut start = 0;
    while start < rows {
        let n = per.min(rows - start);
        let m = src.read_rows(name, start, n, std::mem::take(scratch))?;
        let len = n * row_bytes;
        // SAFETY: the destination holds rows × row_bytes bytes; the source lives until the
        // synchronize below, before its buffer is reused.
        unsafe {
            result::memcpy_htod_async(
                dst + (start * row_bytes) as u64,
                &m.view().data[..len],
                compute.cu_stream(),
            )
        }
        .map_err(|e| cuda_err("copying a matrix to the GPU", e))?;
        compute
            .synchronize()
            .map_err(|e| cuda_err("copying a matrix to the GPU", e))?;
        *scratch = m.into_buf();
        start += n;
    }
    Ok(mat)
}

/// The CUDA backend.
pub(super) struct Cuda;

impl super::Backend for Cuda {
    fn free_memory(&self, device: &Device) -> Result<Option<u64>> {
        free_memory(device).map(Some)
    }
    fn link(&self, device: &Device, slots: usize, slot_bytes: u64) -> Result<Box<dyn Link>> {
        Ok(Box::new(CudaLink::new(device, slots, slot_bytes)?))
    }
    fn load_matrix(
        &self,
        src: &dyn WeightSource,
        name: &str,
        device: &Device,
        chunk_bytes: u64,
        scratch: &mut AlignedBuf,
    ) -> Result<DevMat> {
        load_matrix(src, name, device, chunk_bytes, scratch)
    }
    fn split_matmul(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        split_matmul(x, w)
    }
    fn memory_used(&self, device: &Device) -> Result<Option<u64>> {
        let (free, total) = memory_info(device)?;
        Ok(Some(total - free))
    }
    fn pool_peak(&self, device: &Device, reset: bool) -> Result<Option<u64>> {
        pool_peak(device, reset).map(Some)
    }
    fn h2d_bandwidth(&self, device: &Device, bytes: usize) -> Result<Option<f64>> {
        h2d_bandwidth(device, bytes).map(Some)
    }
}
