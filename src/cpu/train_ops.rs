//! The training tail on the CPU: dtype casts, fills, in-place accumulation, the objectives,
//! gradient-norm clipping and AdamW over a flat arena. Each op is the host reference of its
//! device kernel (`crate::train::loss::reference`, `crate::train::optim`), run where the tensors
//! live, so the only host transfers are the ones a caller asks for.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::train::loss::{self, LossOp};
use crate::train::optim::{adamw_arena_reference, clip_in_place, join_f64, AdamWLaunch};

/// `t` as `dtype`: narrowing rounds to nearest even through `half` (bit-exact with it by
/// construction), widening is exact. U32 converts only to and from U32.
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    if !t.dtype().is_float() || !dtype.is_float() {
        return Err(Error::Unsupported(format!("cast from {} to {}: only float dtypes convert", t.dtype(), dtype)));
    }
    let x = t.f32_data()?;
    match dtype {
        DType::F32 => Tensor::from_vec(x.into_vec(), t.shape()),
        DType::BF16 => Tensor::from_elems(x.iter().map(|&v| bf16::from_f32(v)).collect(), t.shape()),
        DType::F16 => Tensor::from_elems(x.iter().map(|&v| f16::from_f32(v)).collect(), t.shape()),
        DType::U32 => unreachable!("refused above"),
    }
}

pub(crate) fn fill(t: &Tensor, value: f32) -> Result<()> {
    match t.dtype() {
        DType::F32 => t.cpu_slice_mut::<f32>()?.fill(value),
        DType::BF16 => t.cpu_slice_mut::<bf16>()?.fill(bf16::from_f32(value)),
        DType::F16 => t.cpu_slice_mut::<f16>()?.fill(f16::from_f32(value)),
        DType::U32 => {
            if !(value >= 0.0 && value.fract() == 0.0 && value <= u32::MAX as f32) {
                return Err(Error::Input(format!("fill of a u32 tensor with {value}")));
            }
            t.cpu_slice_mut::<u32>()?.fill(value as u32)
        }
    }
    Ok(())
}

pub(crate) fn add_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        return Err(Error::shape("add_into", format!("destination {:?}, source {:?}", dst.shape(), src.shape())));
    }
    if dst.overlaps(src) {
        return Err(Error::Internal("add_into: source and destination overlap".into()));
    }
    if dst.shares_storage(src) {
        // Disjoint views of one storage: one lock covers both, so copy the source first.
        let s = src.cpu_data()?.to_vec();
        dst.cpu_data_mut()?.iter_mut().zip(&s).for_each(|(d, s)| *d += s);
        return Ok(());
    }
    let s = src.f32_data()?;
    dst.cpu_data_mut()?.iter_mut().zip(s.iter()).for_each(|(d, s)| *d += s);
    Ok(())
}

pub(crate) fn loss(op: &LossOp, dlogits: &Tensor, loss_out: &Tensor) -> Result<()> {
    let (_, c) = op.validate(dlogits, loss_out)?;
    let labels = op.labels.cpu_slice::<u32>()?;
    let trained = op.trained.f32_data()?;
    let other = op.other.map(|o| o.f32_data()).transpose()?;
    let v = loss::reference(op.objective, &trained, other.as_deref(), &labels, c)?;
    drop((trained, other));
    dlogits.cpu_data_mut()?.copy_from_slice(&v.dlogits);
    loss_out.cpu_data_mut()?.copy_from_slice(&[v.total as f32, v.ce as f32]);
    Ok(())
}

/// torch's `clip_grad_norm_` (`train::optim::clip_in_place`), the norm written to `norm_out`.
pub(crate) fn clip_grad_norm(grads: &[Tensor], max_norm: f32, norm_out: &Tensor) -> Result<()> {
    // +inf measures the norm without clipping.
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::Input(format!("clip_grad_norm: max_norm {max_norm} must be >= 0")));
    }
    if norm_out.shape() != [1] {
        return Err(Error::shape("clip_grad_norm", format!("norm output {:?}, expected [1]", norm_out.shape())));
    }
    let total = clip_in_place(grads, max_norm)?;
    norm_out.cpu_data_mut()?[0] = total;
    Ok(())
}

pub(crate) fn adamw(l: &AdamWLaunch) -> Result<()> {
    if let Some(norm) = l.skip_unless_finite {
        if !norm.cpu_data()?.iter().all(|v| v.is_finite()) {
            return Ok(());
        }
    }
    let lr = join_f64(&l.lr.cpu_data()?);
    let grads = l.grads.cpu_data()?;
    let (mut p, mut m, mut v) = (l.params.cpu_data_mut()?, l.exp_avg.cpu_data_mut()?, l.exp_avg_sq.cpu_data_mut()?);
    let mut steps = l.steps.cpu_slice_mut::<u32>()?;
    adamw_arena_reference(&l.config, lr, &mut p, &grads, &mut m, &mut v, l.segments, &mut steps)
}
