//! MXFP4 against Q4_0 at decode: bytes of weights per second through `matmul_into` for one to
//! a few rows of activations, on GPT-OSS's expert shape (5760×2880 gate/up, 2880×2880 down)
//! and a 7B's MLP (11008×4096). MXFP4 in llama.cpp's arithmetic (`q8`, GGUF files) and in
//! exact f32 (transformers' checkpoints). Issue 26's target: MXFP4 (q8) at least Q4_0's rate.
//! Run: cargo run --release --example mxfp4_gemv [ROWS...]
use std::time::Instant;

use airllm::kernels::matmul::matmul_into;
use airllm::weights::mat::{quantize_mxfp4, Form, MatView};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn secs(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while n < 5 || t.elapsed().as_secs_f64() < 0.5 {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// `bytes` in u64-aligned storage (block types need their alignment).
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut store = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut store)[..bytes.len()].copy_from_slice(bytes);
    store
}

fn main() -> airllm::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("row counts"))
        .collect();
    let rows = if rows.is_empty() { vec![1, 4] } else { rows };
    let dev = Device::Cpu;
    println!("| shape (n×k) | rows | Q4_0 GB/s | MXFP4 q8 GB/s | MXFP4 f32 GB/s |");
    println!("|---|---|---|---|---|");
    for (n, k) in [(5760, 2880), (2880, 2880), (11008, 4096)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let q4 = aligned(&QTensor::quantize(&w, GgmlDType::Q4_0)?.data()?);
        let mx = aligned(&quantize_mxfp4(&wv));
        let forms = [
            (Form::Q(GgmlDType::Q4_0), &q4),
            (Form::Mxfp4 { q8: true }, &mx),
            (Form::Mxfp4 { q8: false }, &mx),
        ];
        for &m in &rows {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                .collect();
            let mut y = vec![0f32; m * n];
            let rates: Vec<String> = forms
                .iter()
                .map(|(form, store)| {
                    let bytes = form.row_bytes(k) * n;
                    let view = MatView {
                        form: *form,
                        rows: n,
                        cols: k,
                        data: &bytemuck::cast_slice::<u64, u8>(store)[..bytes],
                    };
                    let s = secs(|| matmul_into(&x, m, view, &mut y, n, 0).unwrap());
                    format!("{:.1}", bytes as f64 / s / 1e9)
                })
                .collect();
            println!("| {n}×{k} | {m} | {} |", rates.join(" | "));
        }
    }
    Ok(())
}
