//! NICE additive coupling (the invertible adapter, spec §5.1) on a [`Gpu`]: forward and inverse
//! in one launcher, [`nice_forward`]. The spec is `cpu::nice::nice` (the CPU backend's `nice`).
//!
//! With `x: [rows, H]`, `s1 = H/2`, `s2 = H − s1`, `x = [x1 | x2]`:
//!
//! ```text
//! forward:  y1 = x1 + F(x2),  y2 = x2 + G(y1)        F(z) = act(z·F0ᵀ + f0)·F2ᵀ + f2   (s2 → s1)
//! inverse:  x2 = y2 − G(y1),  x1 = y1 − F(x2)        G(z) = act(z·G0ᵀ + g0)·G2ᵀ + g2   (s1 → s2)
//! ```
//!
//! Each Linear is one [`Gpu::gemm`] on contiguous row-major halves: `Z[rows, in]·Wᵀ` with `W`
//! `[out, in]` is the column-major product `Zᵀ' = W·Zᵀ`, i.e. `Gemm::new(Transpose::Yes,
//! Transpose::No, out, rows, in)` over the same bytes (see [`super::gemm`]). The first Linear's
//! bias and the activation run as one pass of `bias_act_forward_f32` in place (every
//! [`Activation`], erf GELU included, which cuBLASLt's tanh GELU epilogue is not); the second
//! Linear's bias is the GEMM's `Bias` epilogue. `kernels/nice.cu` copies the subnet's input half
//! out of `x` and adds (or subtracts) each subnet's output into `out`, writing the concatenation
//! in place. Nine launches in all: the split, then per subnet GEMM, bias + activation, GEMM and
//! couple (the first couple also writes the second subnet's input half).
//!
//! `x` and `out` are activations of an [`ActivationScalar`] `A`: f32 (`nice_split_f32`,
//! `nice_couple_f32`) or bf16 (`nice_split_bf16io`, `nice_couple_bf16io`). The subnets are the
//! adapter's own, f32 weights, so they run in f32 either way: the split widens a bf16 half
//! exactly into the f32 scratch, and a couple rounds `out` once (nearest even) and hands the next
//! subnet that stored value, so G reads exactly the bf16 `y1` the output holds (the inverse, which
//! reads `y1` from a bf16 `out`, then recomputes the same `G(y1)`). The first coupled half is the
//! f32 computation rounded once; the second is computed from the rounded first. f16 activations
//! are the same with `nice_split_f16io` / `nice_couple_f16io`.
//!
//! Scratch lives in a [`NiceWorkspace`]; [`nice_forward`] allocates one per call, and
//! [`nice_forward_with_workspace`] reuses one sized for at most `rows` rows (the model's way: no
//! allocation per step). Every length is checked before anything is enqueued ([`Error::Shape`]
//! naming the parameter and the numbers), and an `out` sharing a byte with `x` is
//! [`Error::Input`]; a rejected call writes nothing.

use super::elementwise::{bias_act_in_place, check_disjoint_bytes, checked_matrix, expect_len, pick_activation_kernel, row_launch};
use super::gemm::{Epilogue, Gemm, Transpose};
use super::gpu::{ActivationScalar, DeviceBuffer, DeviceView, DeviceViewMut, Gpu, KernelArg};
use super::registry::nice::{NICE_COUPLE_BF16IO, NICE_COUPLE_F16IO, NICE_COUPLE_F32, NICE_SPLIT_BF16IO, NICE_SPLIT_F16IO, NICE_SPLIT_F32};
use crate::backend::Activation;
use crate::error::{Error, Result};

const OP: &str = "cuda::nice_forward";

/// One NICE block's weights on the device (`invertible_adapters.<name>.{F,G}.{0,2}`), HF layout.
#[derive(Clone, Copy)]
pub struct NiceDeviceParams<'a> {
    /// `F.0`: weight `[kf, s2]`, bias `[kf]`.
    pub f0: (DeviceView<'a, f32>, DeviceView<'a, f32>),
    /// `F.2`: weight `[s1, kf]`, bias `[s1]`.
    pub f2: (DeviceView<'a, f32>, DeviceView<'a, f32>),
    /// `G.0`: weight `[kg, s1]`, bias `[kg]`.
    pub g0: (DeviceView<'a, f32>, DeviceView<'a, f32>),
    /// `G.2`: weight `[s2, kg]`, bias `[s2]`.
    pub g2: (DeviceView<'a, f32>, DeviceView<'a, f32>),
    /// The adapter's `non_linearity` (`F.1` / `G.1`).
    pub activation: Activation,
}

/// The widths of a NICE block, read from its bias lengths and checked against its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NiceDims {
    /// `H / 2` and `H − s1`.
    pub s1: usize,
    pub s2: usize,
    /// Hidden widths of F and G (`int(s2 // rf)`, `int(s1 // rf)`); may be 0.
    pub kf: usize,
    pub kg: usize,
}

impl NiceDims {
    /// Reads the widths from `F.2`/`G.2`/`F.0`/`G.0` biases and checks every weight's length.
    pub fn of(p: &NiceDeviceParams<'_>) -> Result<NiceDims> {
        NiceDims::from_lengths([p.f0.0.len(), p.f0.1.len(), p.f2.0.len(), p.f2.1.len(), p.g0.0.len(), p.g0.1.len(), p.g2.0.len(), p.g2.1.len()])
    }

    /// The same from the eight lengths, in the order F.0 (weight, bias), F.2, G.0, G.2.
    pub fn from_lengths([f0w, f0b, f2w, f2b, g0w, g0b, g2w, g2b]: [usize; 8]) -> Result<NiceDims> {
        let d = NiceDims { s1: f2b, s2: g2b, kf: f0b, kg: g0b };
        let h = d.s1.checked_add(d.s2).ok_or_else(|| Error::shape(OP, "s1 + s2 overflows".to_string()))?;
        if d.s1 == 0 || d.s1 != h / 2 {
            return Err(Error::shape(OP, format!("F.2.bias has {} elements and G.2.bias {}: they must be s1 = H/2 >= 1 and s2 = H - s1 of one width H", d.s1, d.s2)));
        }
        let weight = |name: &str, got: usize, rows: usize, cols: usize| -> Result<()> {
            if rows.checked_mul(cols) != Some(got) {
                return Err(Error::shape(OP, format!("{name} has {got} elements, expected {rows}·{cols}")));
            }
            Ok(())
        };
        weight("F.0.weight", f0w, d.kf, d.s2)?;
        weight("F.2.weight", f2w, d.s1, d.kf)?;
        weight("G.0.weight", g0w, d.kg, d.s1)?;
        weight("G.2.weight", g2w, d.s2, d.kg)?;
        Ok(d)
    }

    /// `H = s1 + s2`.
    pub fn hidden(&self) -> usize {
        self.s1 + self.s2
    }
}

/// Scratch for [`nice_forward_with_workspace`], for up to `rows` rows of one block's widths. It is
/// f32 whatever the activations' storage (the subnets compute in f32).
pub struct NiceWorkspace {
    rows: usize,
    dims: NiceDims,
    /// `[rows, s1]`: the first half (subnet input).
    lo: DeviceBuffer<f32>,
    /// `[rows, s2]`: the second half.
    hi: DeviceBuffer<f32>,
    /// `[rows, max(kf, kg)]`: a subnet's hidden layer.
    inner: DeviceBuffer<f32>,
    /// `[rows, max(s1, s2)]`: a subnet's output.
    delta: DeviceBuffer<f32>,
}

impl NiceWorkspace {
    pub fn new(gpu: &Gpu, rows: usize, dims: NiceDims) -> Result<NiceWorkspace> {
        let n = |w: usize| rows.checked_mul(w).ok_or_else(|| Error::shape(OP, format!("workspace of {rows} rows x {w} overflows usize")));
        Ok(NiceWorkspace {
            rows,
            dims,
            lo: gpu.alloc(n(dims.s1)?)?,
            hi: gpu.alloc(n(dims.s2)?)?,
            inner: gpu.alloc(n(dims.kf.max(dims.kg))?)?,
            delta: gpu.alloc(n(dims.s1.max(dims.s2))?)?,
        })
    }

    /// The most rows it serves.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dims(&self) -> NiceDims {
        self.dims
    }
}

/// NICE forward (`inverse == false`) or inverse over `x: [rows, H]` into `out` (same length, not
/// overlapping `x`), both of `A` (f32 or bf16), allocating its scratch; see the module docs.
pub fn nice_forward<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, params: &NiceDeviceParams<'_>, inverse: bool, out: &mut DeviceViewMut<'_, A>) -> Result<()> {
    let dims = NiceDims::of(params)?;
    let rows = check_io(x, out, dims)?;
    if rows == 0 {
        return Ok(());
    }
    let mut ws = NiceWorkspace::new(gpu, rows, dims)?;
    nice_forward_with_workspace(gpu, x, params, inverse, out, &mut ws)
}

/// [`nice_forward`] with caller-owned scratch (`ws` built for these widths and at least these rows).
pub fn nice_forward_with_workspace<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, params: &NiceDeviceParams<'_>, inverse: bool, out: &mut DeviceViewMut<'_, A>, ws: &mut NiceWorkspace) -> Result<()> {
    let d = NiceDims::of(params)?;
    let rows = check_io(x, out, d)?;
    if ws.dims != d {
        return Err(Error::shape(OP, format!("the workspace was built for {:?}, the parameters have {d:?}", ws.dims)));
    }
    if ws.rows < rows {
        return Err(Error::shape(OP, format!("the workspace serves {} rows, x has {rows}", ws.rows)));
    }
    if rows == 0 {
        return Ok(());
    }
    let (s1, s2) = (d.s1, d.s2);
    let act = params.activation;
    let NiceWorkspace { lo, hi, inner, delta, .. } = ws;
    if !inverse {
        // y1 = x1 + F(x2), written to out's first half and to `lo` (G's input); y2 = x2 + G(y1).
        split_columns(gpu, x, rows, s1, s2, &mut hi.slice_mut(0..rows * s2)?)?;
        let mut f = delta.slice_mut(0..rows * s1)?;
        subnet(gpu, &hi.slice(0..rows * s2)?, (params.f0, params.f2), act, rows, (s2, d.kf, s1), inner, &mut f)?;
        couple(gpu, out, Some(&mut lo.slice_mut(0..rows * s1)?), x, &f.as_view(), rows, 0, s1, 1.0)?;
        let mut g = delta.slice_mut(0..rows * s2)?;
        subnet(gpu, &lo.slice(0..rows * s1)?, (params.g0, params.g2), act, rows, (s1, d.kg, s2), inner, &mut g)?;
        couple(gpu, out, None, x, &g.as_view(), rows, s1, s2, 1.0)
    } else {
        // x2 = y2 − G(y1), written to out's second half and to `hi` (F's input); x1 = y1 − F(x2).
        split_columns(gpu, x, rows, 0, s1, &mut lo.slice_mut(0..rows * s1)?)?;
        let mut g = delta.slice_mut(0..rows * s2)?;
        subnet(gpu, &lo.slice(0..rows * s1)?, (params.g0, params.g2), act, rows, (s1, d.kg, s2), inner, &mut g)?;
        couple(gpu, out, Some(&mut hi.slice_mut(0..rows * s2)?), x, &g.as_view(), rows, s1, s2, -1.0)?;
        let mut f = delta.slice_mut(0..rows * s1)?;
        subnet(gpu, &hi.slice(0..rows * s2)?, (params.f0, params.f2), act, rows, (s2, d.kf, s1), inner, &mut f)?;
        couple(gpu, out, None, x, &f.as_view(), rows, 0, s1, -1.0)
    }
}

/// Rows of `x` (`x.len() / H`), with `out` the same length, apart from `x`, and both within the
/// kernels' `int`s; and the kernels exist for `A`.
fn check_io<A: ActivationScalar>(x: &DeviceView<'_, A>, out: &DeviceViewMut<'_, A>, d: NiceDims) -> Result<usize> {
    pick_activation_kernel::<A>(OP, [NICE_SPLIT_F32, NICE_SPLIT_BF16IO, NICE_SPLIT_F16IO])?;
    let rows = check_lens(x.len(), out.len(), d)?;
    let bytes = std::mem::size_of::<A>();
    check_disjoint_bytes(OP, &[("out", out.device_ptr(), out.len() * bytes)], &[("x", x.device_ptr(), x.len() * bytes)])?;
    Ok(rows)
}

/// Rows of `x` (`x_len / H`), with `out` the same length and both within the kernels' `int`s.
fn check_lens(x_len: usize, out_len: usize, d: NiceDims) -> Result<usize> {
    let h = d.hidden();
    if !x_len.is_multiple_of(h) {
        return Err(Error::shape(OP, format!("x has {x_len} elements, not a whole number of rows of H = {h} (s1 {} from F.2.bias + s2 {} from G.2.bias)", d.s1, d.s2)));
    }
    let rows = x_len / h;
    checked_matrix(OP, rows, h)?;
    checked_matrix(OP, rows, d.kf.max(d.kg))?;
    expect_len(OP, "out", out_len, x_len, "x's length")?;
    Ok(rows)
}

/// `half = x[:, col0 .. col0 + width]`, `x` of `A` (f32 or bf16, widened exactly), `half` f32.
pub fn split_columns<A: ActivationScalar>(gpu: &Gpu, x: &DeviceView<'_, A>, rows: usize, col0: usize, width: usize, half: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    const OP: &str = "cuda::split_columns";
    let kernel = pick_activation_kernel::<A>(OP, [NICE_SPLIT_F32, NICE_SPLIT_BF16IO, NICE_SPLIT_F16IO])?;
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let hidden = x.len() / rows;
    if !x.len().is_multiple_of(rows) || col0.checked_add(width).is_none_or(|end| end > hidden) || half.len() != rows * width || hidden > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::shape(OP, format!("columns {col0}..{} of {rows} rows of x ({} elements) into {} elements", col0 + width, x.len(), half.len())));
    }
    let bytes = std::mem::size_of::<A>();
    check_disjoint_bytes(OP, &[("half", half.device_ptr(), 4 * half.len())], &[("x", x.device_ptr(), bytes * x.len())])?;
    let args = [half.arg(), A::act_arg(x), KernelArg::I32(rows as i32), KernelArg::I32(hidden as i32), KernelArg::I32(col0 as i32), KernelArg::I32(width as i32)];
    // SAFETY: x is [rows, hidden] with col0 + width <= hidden, half is [rows, width] and apart
    // from x (checked above).
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
}

/// `out[:, col0..col0+width] = x[:, same] + sign·delta` (rounded once to `A`), the stored value
/// copied to `half_out` when given.
#[allow(clippy::too_many_arguments)] // the kernel's operands and the half's position
fn couple<A: ActivationScalar>(gpu: &Gpu, out: &mut DeviceViewMut<'_, A>, half_out: Option<&mut DeviceViewMut<'_, f32>>, x: &DeviceView<'_, A>, delta: &DeviceView<'_, f32>, rows: usize, col0: usize, width: usize, sign: f32) -> Result<()> {
    let kernel = pick_activation_kernel::<A>(OP, [NICE_COUPLE_F32, NICE_COUPLE_BF16IO, NICE_COUPLE_F16IO])?;
    let hidden = x.len() / rows;
    let args = [
        A::act_arg_mut(out),
        half_out.as_ref().map_or(KernelArg::Null, |h| h.arg()),
        A::act_arg(x),
        delta.arg(),
        KernelArg::I32(rows as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(col0 as i32),
        KernelArg::I32(width as i32),
        KernelArg::F32(sign),
    ];
    // SAFETY: out and x are [rows, hidden] with col0 + width <= hidden and apart; delta and
    // half_out are [rows, width] slices of the workspace's separate buffers (the caller's checks
    // and slices).
    unsafe { gpu.launch(kernel, row_launch(rows), &args) }
}

type Linear<'a> = (DeviceView<'a, f32>, DeviceView<'a, f32>);

/// `o = act(z·W0ᵀ + b0)·W2ᵀ + b2` for `z: [rows, d_in]`, its hidden layer `[rows, k]` in the
/// front of `inner`.
#[allow(clippy::too_many_arguments)] // the two Linears, their widths and the two destinations
fn subnet(gpu: &Gpu, z: &DeviceView<'_, f32>, (l0, l2): (Linear<'_>, Linear<'_>), act: Activation, rows: usize, (d_in, k, d_out): (usize, usize, usize), inner: &mut DeviceBuffer<f32>, o: &mut DeviceViewMut<'_, f32>) -> Result<()> {
    let mut hid = inner.slice_mut(0..rows * k)?;
    if k > 0 {
        gpu.gemm(&Gemm::new(Transpose::Yes, Transpose::No, k, rows, d_in), &l0.0, z, &mut hid, None)?;
        bias_act_in_place(gpu, &mut hid, Some(&l0.1), Some(act), k)?;
    }
    // k == 0 is a legal empty sum: the GEMM then writes the bias alone.
    let g = Gemm::new(Transpose::Yes, Transpose::No, d_out, rows, k).with_epilogue(Epilogue::Bias);
    gpu.gemm(&g, &l2.0, &hid.as_view(), o, Some(&l2.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_come_from_the_biases_and_weights_are_checked() {
        // H = 41, rf 2: s1 20, s2 21, kf 10, kg 10.
        let ok = [10 * 21, 10, 20 * 10, 20, 10 * 20, 10, 21 * 10, 21];
        assert_eq!(NiceDims::from_lengths(ok).unwrap(), NiceDims { s1: 20, s2: 21, kf: 10, kg: 10 });
        // Empty subnets (k = 0) are legal.
        assert_eq!(NiceDims::from_lengths([0, 0, 0, 3, 0, 0, 0, 3]).unwrap().kf, 0);
        for i in [0, 2, 4, 6] {
            let mut bad = ok;
            bad[i] += 1;
            assert!(matches!(NiceDims::from_lengths(bad), Err(Error::Shape { .. })), "length {i}");
        }
        // s2 must be s1 or s1 + 1.
        let swapped = [10 * 20, 10, 21 * 10, 21, 10 * 21, 10, 20 * 10, 20];
        assert!(NiceDims::from_lengths(swapped).is_err());
        assert!(NiceDims::from_lengths([0, 0, 0, 0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn rows_must_be_whole_and_out_match() {
        let d = NiceDims { s1: 20, s2: 21, kf: 10, kg: 10 };
        assert_eq!(check_lens(41 * 3, 41 * 3, d).unwrap(), 3);
        assert!(check_lens(41 * 3 + 1, 41 * 3 + 1, d).is_err());
        assert!(check_lens(41 * 3, 41 * 2, d).is_err());
    }
}
