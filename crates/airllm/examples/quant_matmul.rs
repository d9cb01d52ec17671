//! Which path multiplies a quantized matrix fastest at each row count: integer dot products
//! on the blocks, or dequantized tiles and gemm (`airllm::kernels::qmatmul`), with candle's
//! `k_quants::matmul` (what the engine called before) for comparison. Picks
//! `qmatmul::gemm_rows`. Shapes: Gemma 3 270M's MLP (2048×640) and a 7B's (11008×4096, k
//! whole 256-value blocks).
//! Run: [SHAPES=NxK,...] cargo run --release --example quant_matmul [ROWS...]
use std::time::Instant;

use airllm::kernels::qmatmul::quant_with;
use airllm::weights::mat::{Form, MatView};
use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn secs(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while n < 3 || t.elapsed().as_secs_f64() < 0.3 {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn candle<T: GgmlType>(m: usize, k: usize, n: usize, x: &[f32], data: &[u8], y: &mut [f32]) {
    // SAFETY: `data` is u64-aligned storage of whole blocks of T.
    let b = unsafe {
        std::slice::from_raw_parts(
            data.as_ptr() as *const T,
            data.len() / std::mem::size_of::<T>(),
        )
    };
    kq::matmul((m, k, n), x, b, y).unwrap();
}

fn main() -> airllm::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("row counts"))
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 2, 4, 8, 16, 64, 400]
    } else {
        rows
    };
    let dev = Device::Cpu;
    println!("| type | shape (n×k) | rows | dots ms | gemm ms | candle ms | best |");
    println!("|---|---|---|---|---|---|---|");
    // SHAPES=NxK,... measures other shapes (e.g. 262144x640, Gemma 3's head).
    let shapes: Vec<(usize, usize)> = match std::env::var("SHAPES") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                let (n, k) = s.split_once('x').expect("SHAPES=NxK,...");
                (n.parse().expect("N"), k.parse().expect("K"))
            })
            .collect(),
        Err(_) => vec![(2048, 640), (11008, 4096)],
    };
    for (n, k) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        for t in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            if !k.is_multiple_of(t.block_size()) {
                continue;
            }
            let bytes = QTensor::quantize(&w, t)?.data()?.into_owned();
            let mut store = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut store)[..bytes.len()].copy_from_slice(&bytes);
            let data = &bytemuck::cast_slice::<u64, u8>(&store)[..bytes.len()];
            let view = MatView {
                form: Form::Q(t),
                rows: n,
                cols: k,
                data,
            };
            for &m in &rows {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut y = vec![0f32; m * n];
                let dots = secs(|| quant_with(&x, m, view, t, &mut y, n, 0, false).unwrap());
                let gemm = secs(|| quant_with(&x, m, view, t, &mut y, n, 0, true).unwrap());
                let old = secs(|| match t {
                    GgmlDType::Q4_0 => candle::<kq::BlockQ4_0>(m, k, n, &x, data, &mut y),
                    GgmlDType::Q5_0 => candle::<kq::BlockQ5_0>(m, k, n, &x, data, &mut y),
                    GgmlDType::Q8_0 => candle::<kq::BlockQ8_0>(m, k, n, &x, data, &mut y),
                    GgmlDType::Q4K => candle::<kq::BlockQ4K>(m, k, n, &x, data, &mut y),
                    GgmlDType::Q5K => candle::<kq::BlockQ5K>(m, k, n, &x, data, &mut y),
                    _ => candle::<kq::BlockQ6K>(m, k, n, &x, data, &mut y),
                });
                let best = if dots <= gemm { "dots" } else { "gemm" };
                println!(
                    "| {} | {n}×{k} | {m} | {:.3} | {:.3} | {:.3} | {best} |",
                    Form::Q(t).name(),
                    dots * 1e3,
                    gemm * 1e3,
                    old * 1e3
                );
            }
        }
    }
    Ok(())
}
