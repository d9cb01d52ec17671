//! Which in-memory form multiplies fastest on this CPU: one decode row (and a batch of 8) times a
//! 2048×5632 weight held as f32, f16, bf16 (candle's dense kernels) or Q8_0/Q4_K blocks.
//! Run: cargo run --release --example matmul_forms
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

fn time(label: &str, bytes: usize, mut f: impl FnMut()) {
    f();
    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{label:<28} {:>8.3} ms  ({:.1} GB/s of weights)",
        s * 1e3,
        bytes as f64 / s / 1e9
    );
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (n, k) = (5632, 2048);
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    for rows in [1usize, 8] {
        println!("rows = {rows}");
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let wt = w.t()?;
        time("f32", n * k * 4, || {
            x.matmul(&wt).unwrap();
        });
        let w16 = w.to_dtype(DType::F16)?;
        let w16t = w16.t()?;
        time("f16 (x cast to f16)", n * k * 2, || {
            x.to_dtype(DType::F16).unwrap().matmul(&w16t).unwrap();
        });
        let wb = w.to_dtype(DType::BF16)?;
        let wbt = wb.t()?;
        time("bf16 (x cast to bf16)", n * k * 2, || {
            x.to_dtype(DType::BF16).unwrap().matmul(&wbt).unwrap();
        });
        for q in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let qt = QTensor::quantize(&w, q)?;
            let b = qt.storage_size_in_bytes();
            let mm = QMatMul::from_qtensor(qt)?;
            time(&format!("{q:?} (QMatMul)"), b, || {
                mm.forward(&x).unwrap();
            });
        }
    }
    Ok(())
}
