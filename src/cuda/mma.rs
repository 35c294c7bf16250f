//! Launcher for `kernels/mma.cu`: whether the device's tensor cores hold `mma.sync`'s fragments
//! as `kernels/common.cuh` lays them out, the layout every tensor-core kernel here relies on
//! ([`super::adapter::SplitForward::TensorCores`]). cuda-sim executes `mma.sync` with the same
//! layout (docs/CUDA_SIM.md), so there the check tests the executor; on a GPU it tests our
//! reading of the PTX ISA against the hardware, before any result depends on it.

use cudarc::driver::LaunchConfig;

use super::gpu::{Gpu, KernelArg};
use super::registry::mma::MMA_LAYOUT_CHECK;
use crate::error::{Error, Result};

/// Tiles (warps) of the check.
const WARPS: usize = 4;

/// Runs `mma_layout_check` in bf16 and in f16 on integer operands whose products and sums are
/// exact in f32 (A, B in [-8, 8], C in [-64, 64]), and compares D with the host's product
/// exactly. `Error::Unsupported` names the first element that differs.
pub fn check_tensor_core_layout(gpu: &Gpu) -> Result<()> {
    // A fixed, deterministic fill (an LCG): the check is the same on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |span: i32| -> f32 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % (2 * span as u64 + 1)) as f32 - span as f32
    };
    let a: Vec<f32> = (0..WARPS * 16 * 32).map(|_| next(8)).collect();
    let b: Vec<f32> = (0..WARPS * 32 * 8).map(|_| next(8)).collect();
    let c: Vec<f32> = (0..WARPS * 16 * 8).map(|_| next(64)).collect();
    let mut want = c.clone();
    for w in 0..WARPS {
        for i in 0..16 {
            for j in 0..8 {
                want[w * 128 + i * 8 + j] += (0..32).map(|k| a[w * 512 + i * 32 + k] * b[w * 256 + k * 8 + j]).sum::<f32>();
            }
        }
    }
    for (name, f16) in [("bf16", false), ("f16", true)] {
        // Small integers are exact in both types.
        let bits = |x: f32| if f16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() };
        let a16: Vec<u16> = a.iter().map(|&x| bits(x)).collect();
        // B's columns, each contiguous in k.
        let bt16: Vec<u16> = (0..WARPS * 8 * 32).map(|i| bits(b[(i / 256) * 256 + (i % 32) * 8 + (i % 256) / 32])).collect();
        let (a_dev, bt_dev, c_dev) = (gpu.upload(&a16)?, gpu.upload(&bt16)?, gpu.upload(&c)?);
        let mut d_dev = gpu.upload(&vec![f32::NAN; WARPS * 128])?;
        let args = [a_dev.view().arg(), bt_dev.view().arg(), c_dev.view().arg(), d_dev.view_mut().arg(), KernelArg::I32(i32::from(f16))];
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: ((32 * WARPS) as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: warp w of the one block reads a[w·512..], bt[w·256..], c[w·128..] and writes
        // d[w·128..], within the uploaded lengths (WARPS tiles each).
        unsafe { gpu.launch(MMA_LAYOUT_CHECK, cfg, &args)? };
        let d = gpu.download(&d_dev.view())?;
        if let Some(o) = (0..d.len()).find(|&o| d[o] != want[o]) {
            return Err(Error::Unsupported(format!(
                "the tensor cores' {name} mma.sync (m16n8k16) does not hold its fragments as kernels/common.cuh lays them out: D[{}][{}] of tile {} is {} where the product is {} ({}); the tensor-core kernels would compute wrong values here (BERT_ADAPTERS_SPLIT_FORWARD=gemm does without them)",
                (o % 128) / 8,
                o % 8,
                o / 128,
                d[o],
                want[o],
                gpu.describe()
            )));
        }
    }
    Ok(())
}
