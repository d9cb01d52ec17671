//! Which form multiplies fastest on this CPU: 1, 8 and 64 rows of activations times a 5632×2048
//! weight held as bf16, f16 or f32 (our kernels: GEMV for few rows, widened tiles and gemm for
//! many), as Q8_0/Q4_K blocks, and candle's f32 matmul for comparison.
//! Run: cargo run --release --example matmul_forms
use std::time::Instant;

use airllm::kernels::matmul::{matmul_into, Kernel};
use airllm::weights::mat::{Form, MatView};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

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

fn main() -> airllm::Result<()> {
    let dev = Device::Cpu;
    let (n, k) = (5632, 2048);
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let f32b: Vec<u8> = wv.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f16b: Vec<u8> = wv
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect();
    let bf16b: Vec<u8> = wv
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    let q8 = QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?.into_owned();
    let q4 = QTensor::quantize(&w, GgmlDType::Q4K)?.data()?.into_owned();
    println!("kernel: {:?}", Kernel::get());
    for rows in [1usize, 8, 64] {
        println!("rows = {rows}");
        let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; rows * n];
        for (name, form, data) in [
            ("bf16", Form::BF16, &bf16b),
            ("f16", Form::F16, &f16b),
            ("f32", Form::F32, &f32b),
            ("Q8_0 blocks", Form::Q(GgmlDType::Q8_0), &q8),
            ("Q4_K blocks", Form::Q(GgmlDType::Q4K), &q4),
        ] {
            let v = MatView {
                form,
                rows: n,
                cols: k,
                data,
            };
            time(name, data.len(), || {
                matmul_into(&xv, rows, v, &mut y, n, 0).unwrap()
            });
        }
        time("candle f32 matmul", n * k * 4, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
    }
    Ok(())
}
