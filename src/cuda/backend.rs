//! The CUDA model backend: [`Backend`] over a [`Gpu`] (a real GPU, or the `cuda-sim` executor).
//!
//! Tensors live in [`CudaStorage`] (a typed [`DeviceBuffer`] behind the crate's
//! `Storage::Device`); ops validate shapes on the host, then call the kernel launchers of this
//! module's siblings and [`Gpu::gemm`]. Row-major `[rows, in] · Wᵀ` products are the column-major
//! cuBLASLt product `Yᵀ = W · Xᵀ` on the same bytes (see [`super::gemm`]).
//!
//! # Storage types
//!
//! Activations, adapter weights and every output are f32. The frozen base may be f32 or bf16
//! (`LoadOptions { dtype: DType::BF16, .. }`), and every op that reads it takes either, computing
//! in f32 on the exactly widened values, as the CPU backend does, so the two agree at the fp32
//! tolerance on the same bf16 weights:
//! - `linear`, `linear_act`, `linear_act_only` (and `linear_dropout` in eval): a bf16 `W` or bias
//!   is widened into an f32 copy (`cast_bf16_to_f32`) for the f32 GEMM; see `linear_into` for why
//!   not a bf16 GEMM, and for the copy's lifetime. With bf16 activations as well (issue 15's
//!   pipeline), [`CudaBackend::linear_bf16io`] is the bf16 GEMM: bf16 x, W, b and y;
//! - `embedding_layernorm` (the three tables and γ/β in one dtype), `residual_layernorm` (γ/β)
//!   and `adapter_location` (the BERT LayerNorm's γ/β): the kernels' `_bf16` variants, picked by
//!   the tensors' dtype.
//!
//! An f16 base (`LoadOptions { dtype: DType::F16, .. }`) is read the same way (the `_f16`
//! variants, or widened with `cast_f16_to_f32`). A group of base tensors in mixed dtypes is
//! refused with `Error::Unsupported` naming the op, the tensor and its dtype.
//!
//! # bf16 activations
//!
//! [`CudaBackend::with_activations`]`(DType::BF16)` over a base loaded in bf16 makes
//! `embedding_layernorm` write bf16, and from there every forward op the model runs takes bf16
//! activations and returns bf16 ones, dispatching on the tensor's dtype to the `_bf16io` kernels
//! (f32 arithmetic and accumulation, each output rounded once to bf16; adapter and NICE weights,
//! LayerNorm statistics, the attention's log-sum-exp and the mask bias stay f32):
//! - `linear`, `linear_dropout`, `linear_act` and `linear_act_only`: with a bias, the bf16
//!   product with an f32 D and one `linear_epilogue_*` pass that adds the bias in f32, rounds
//!   once and applies what follows the Linear: the activation at the rounded product (as a plain
//!   bf16 model computes it, and writing that rounded pre-activation for `linear_act`), or the
//!   dropout mask over the f32 sum (`CudaBackend::linear_half_typed`); without a bias the GEMM
//!   writes bf16 itself, as it does with a bias under [`LinearEpilogue::Cublaslt`] (cuBLASLt adds
//!   the bias, PyTorch's autocast arithmetic; [`LINEAR_EPILOGUE_VAR`]), the activation or dropout
//!   then a pass of its own. W and b must be bf16 (the base); an f32 weight with bf16 activations (a
//!   classification head's: the model widens the head's input to f32 first) is refused, named.
//!   ([`CudaBackend::linear_bf16io`], the public entry point, keeps cuBLASLt's epilogue
//!   semantics: ReLU or the tanh GELU at the f32 sum, rounded once.);
//! - `residual_layernorm`, `attention_packed`, `adapter_location`, `nice`, `activation`, `add`,
//!   `first_token`, `select_rows`, `cast`: the bf16 variants; `all_finite` counts on a widened
//!   copy; `to_host` widens.
//!
//! # bf16 training
//!
//! In the same mode the training step runs too, as autocast with f32 master weights does: the
//! tape keeps bf16 activations, every activation gradient is bf16 (each op's output rounded
//! once, f32 arithmetic inside), and the parameter gradients, the adapters' and heads' weights
//! and the AdamW state stay f32:
//! - `linear_backward_input(_into)` and `linear_backward_input_act`: the bf16 tensor-core product
//!   with the bf16 base weight (an accumulation `out += dy·W`: the product with an f32 D, then
//!   `accumulate_f32_*` sums it with `out` in f32 and rounds once);
//!   `activation_backward`, `layernorm_backward_stats`, `residual_layernorm_stats`,
//!   `attention_packed_backward`, `first_token_backward_into`, `add_into`: their `_bf16io`
//!   kernels;
//! - dropout of a bf16 tensor: `dropout_bf16io` (the f32 mask and product on the widened value,
//!   rounded once); after a Linear, in its epilogue pass (above);
//! - `adapter_location_backward_into` on the fused kernel and `nice_backward_into` (f32 kernels):
//!   their bf16 inputs are widened exactly, the f32 backward runs, and the input gradients are
//!   rounded once; `linear_backward_params_into` (a head's) widens a bf16 operand.
//!
//! A bf16 gradient with an f32 activation or base tensor is refused, named
//! (`half_training_operands`).
//!
//! # f16 activations
//!
//! [`CudaBackend::with_activations`]`(DType::F16)` over a base loaded in f16 is the same pipeline
//! with IEEE f16 storage in place of bf16 (issue 15): every `_bf16io` kernel has an `_f16io` twin
//! (the same templated body over kernels/common.cuh's `f16_raw`), the GEMMs take f16 A, B and D
//! ([`CudaBackend::linear_f16io`]), and everything said above of bf16 activations, gradients and
//! their f32 statistics, weights and optimizer state holds with "bf16" read as "f16". f16 keeps 11
//! significant bits but ends at 65504: a value past it is stored as ±inf (one rounding of the f32
//! result, never a saturation), which `all_finite` then reports. bf16 and f16 never mix: an op
//! given one of each, or an f16 activation with a bf16 base (or the reverse), is refused naming
//! the operand. The attention (fused and GEMM paths) and adapter-location ops (fused and split;
//! the fused backward widens to f32 and rounds dh, dr once to f16, as for bf16) take f16 too.
//! f16 activation gradients underflow without loss scaling: the model scales the loss gradient
//! and unscales the f32 gradient arena (`BertModel::set_loss_scale`, `train::LossScaler`), here
//! one `scale_f32` launch each (`scale_in_place`).
//!
//! This is issue 13's forward in progress: an op whose kernel does not exist yet returns
//! `Error::Unsupported` naming it, never a wrong answer. The backward and the training tail are
//! issue 14.

use std::sync::Arc;

use half::{bf16, f16};

use super::adapter::{ADAPTER_PRODUCTS, ADAPTER_PRODUCTS_VAR, SPLIT_FORWARD_VAR, SplitForward, adapter_location_backward_on, adapter_location_forward_on, LocationPath, location_dropout, BranchGrads, LocationBackwardOutputs, BranchWeights, DeviceLayerNorm, DeviceScaling, DropoutSeed, LocationDescriptors, LocationInputs, LocationOutputs, LocationShape};
use super::attention::{attention_packed_backward_dropout_as, attention_packed_forward, attention_packed_forward_dropout};
use super::attention_gemm::{attention_gemm_backward, attention_gemm_forward, attention_mma_backward, attention_mma_forward, AttentionPath};
use super::elementwise;
use super::embedding::{check_flag, embedding_layernorm_forward, new_error_flag, EmbeddingInputs, EmbeddingOutputs};
use super::gemm::{linear_16io, linear_16io_with, Epilogue, Gemm, GemmScalar, OutputType, Transpose};
use super::gpu::{ActivationScalar, BaseScalar, DeviceBuffer, DeviceScalar, DeviceView, DeviceViewMut, Gpu, GpuKind};
use super::elementwise::{LinearDims, LinearParamGrads};
use super::layernorm::{layernorm_backward, residual_layernorm_forward, residual_layernorm_forward_train, LayerNormBackwardInputs, LayerNormInputs, LayerNormOutputs, LayerNormTrainOutputs};
use super::optim::{AdamWBuffers, AdamWSegments, GradViews};
use super::nice::{nice_forward, NiceDeviceParams};
use crate::backend::{AdapterLocation, Backend, BottleneckGrads, DropoutSpec, GradsOut, LayerNormParams, LocationSteps, NiceGrads, NiceParams, ScalingParam};
use crate::config::Activation;
use crate::cpu::{GemmCounts, GemmKind, GemmStats};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, DeviceStorage, Storage, Tensor};

/// A 16-bit Linear's operands checked (x, W and b all `H`, W `[out, in]` matching x, b `[out]`):
/// the output's shape and the product's dimensions.
fn half_linear_shape<H: ActivationScalar>(op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(Vec<usize>, LinearDims)> {
    let want = H::DTYPE;
    for (name, t) in [("the input x", Some(x)), ("the weight W", Some(w)), ("the bias b", b)] {
        if let Some(t) = t.filter(|t| t.dtype() != want) {
            return Err(Error::Unsupported(format!("{op}: {name} {:?} is {}; this Linear takes x, W and b in {want} (f32 activations: linear)", t.shape(), t.dtype())));
        }
    }
    let (d_out, d_in) = match w.shape() {
        [o, i] => (*o, *i),
        s => return Err(Error::shape(op, format!("weight must be [out, in], got {s:?}"))),
    };
    if x.last_dim() != d_in {
        return Err(Error::shape(op, format!("input {:?} does not end in the weight's in-features {d_in}", x.shape())));
    }
    if let Some(b) = b.filter(|b| b.shape() != [d_out]) {
        return Err(Error::shape(op, format!("bias {:?} for {d_out} out-features", b.shape())));
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = d_out;
    }
    Ok((shape, LinearDims { rows: x.rows(), d_in, d_out }))
}

/// What a 16-bit Linear's epilogue pass applies after the bias ([`CudaBackend::linear_half_typed`]).
#[derive(Clone, Copy)]
enum HalfEpilogue<'a> {
    /// An activation (`None`: the identity), taken at the rounded product; `keep_pre` also
    /// returns that rounded pre-activation (for the backward).
    Act { act: Option<Activation>, keep_pre: bool },
    /// The model's dropout after the Linear (`None`: off).
    Dropout(Option<&'a DropoutSpec>),
}

/// The environment variable that overrides [`CudaBackend::linear_epilogue`]: `staged` or `cublaslt`.
pub const LINEAR_EPILOGUE_VAR: &str = "BERT_ADAPTERS_LINEAR_EPILOGUE";

/// Where a 16-bit Linear with a bias (the frozen base's, with bf16 or f16 activations) adds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearEpilogue {
    /// The product into an f32 D, then one `linear_epilogue_*` pass adds the bias in f32, rounds
    /// once and applies the activation or dropout (the default): the most accurate rounding.
    Staged,
    /// cuBLASLt adds the bias in the product's own kernel and writes the 16-bit output, as
    /// PyTorch's autocast Linear does (`addmm` → cuBLASLt's bias epilogue); the activation or the
    /// dropout is then a pass over that output, as in PyTorch. No f32 D (half the product's
    /// output bytes) and no pass over one; on sm_90 cuBLASLt rounds before adding the bias (up
    /// to 1 ulp against the staged path's ½: [`super::gemm::Gemm::fused_half_epilogue`]), and the
    /// dropout rounds the rounded output again, both PyTorch's arithmetic.
    Cublaslt,
}

impl LinearEpilogue {
    /// `staged` or `cublaslt` (as [`LINEAR_EPILOGUE_VAR`] spells them).
    pub fn parse(v: &str) -> Result<LinearEpilogue> {
        super::probe::parse_choice(LINEAR_EPILOGUE_VAR, v, Self::NAMES)
    }

    const NAMES: &[(&str, LinearEpilogue)] = &[("staged", LinearEpilogue::Staged), ("cublaslt", LinearEpilogue::Cublaslt)];
}

/// `$body` with the type `$A` bound to the storage of activation dtype `$dtype`: bf16, f16, or
/// f32 for anything else (an f32 view then refuses another dtype, named).
macro_rules! by_activation_dtype {
    ($dtype:expr, $A:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $A = bf16;
                $body
            }
            DType::F16 => {
                type $A = f16;
                $body
            }
            _ => {
                type $A = f32;
                $body
            }
        }
    };
}

/// `$body` with `$H` bound to bf16 or f16 by `$dtype` (which the caller checked is one of them;
/// anything else is taken as bf16, whose views then refuse it, named).
macro_rules! by_half_dtype {
    ($dtype:expr, $H:ident => $body:expr) => {
        match $dtype {
            DType::F16 => {
                type $H = f16;
                $body
            }
            _ => {
                type $H = bf16;
                $body
            }
        }
    };
}

/// One device allocation of one element type.
#[derive(Debug)]
pub enum TypedBuffer {
    F32(DeviceBuffer<f32>),
    BF16(DeviceBuffer<bf16>),
    F16(DeviceBuffer<f16>),
    U32(DeviceBuffer<u32>),
}

impl TypedBuffer {
    fn dtype(&self) -> DType {
        match self {
            TypedBuffer::F32(_) => DType::F32,
            TypedBuffer::BF16(_) => DType::BF16,
            TypedBuffer::F16(_) => DType::F16,
            TypedBuffer::U32(_) => DType::U32,
        }
    }
    fn len(&self) -> usize {
        match self {
            TypedBuffer::F32(b) => b.len(),
            TypedBuffer::BF16(b) => b.len(),
            TypedBuffer::F16(b) => b.len(),
            TypedBuffer::U32(b) => b.len(),
        }
    }
}

/// A tensor's storage on a [`Gpu`].
#[derive(Debug)]
pub struct CudaStorage {
    buf: TypedBuffer,
    device: Device,
}

impl DeviceStorage for CudaStorage {
    fn device(&self) -> Device {
        self.device
    }
    fn bytes(&self) -> usize {
        self.buf.len() * self.buf.dtype().size_in_bytes()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Typed access to a [`TypedBuffer`] variant.
trait BufferElement: DeviceScalar {
    const DTYPE: DType;
    fn get(buf: &TypedBuffer) -> Option<&DeviceBuffer<Self>>;
    fn wrap(buf: DeviceBuffer<Self>) -> TypedBuffer;
}

macro_rules! buffer_elements {
    ($($t:ty => $v:ident),*) => {$(
        impl BufferElement for $t {
            const DTYPE: DType = DType::$v;
            fn get(buf: &TypedBuffer) -> Option<&DeviceBuffer<Self>> {
                match buf {
                    TypedBuffer::$v(b) => Some(b),
                    _ => None,
                }
            }
            fn wrap(buf: DeviceBuffer<Self>) -> TypedBuffer {
                TypedBuffer::$v(buf)
            }
        }
    )*};
}
buffer_elements!(f32 => F32, bf16 => BF16, f16 => F16, u32 => U32);

/// The device address and length of `t`'s elements when `t` is an f32 tensor on a CUDA GPU (not
/// cuda-sim, whose addresses are the executor's): for libraries that take device pointers, as
/// NCCL's all-reduce of the gradient arena does (`dist::nccl`). `None` for anything else. The
/// address is valid while `t`'s storage lives, on the backend's context and stream.
pub fn cuda_f32_device_ptr(t: &Tensor) -> Option<(u64, usize)> {
    let Storage::Device(d) = t.storage() else { return None };
    let st = d.as_any().downcast_ref::<CudaStorage>()?;
    if !matches!(st.device, Device::Cuda(_)) || t.dtype() != DType::F32 {
        return None;
    }
    let view = f32::get(&st.buf)?.slice(t.offset()..t.offset() + t.elem_count()).ok()?;
    Some((view.device_ptr(), view.len()))
}

/// The CUDA backend on one [`Gpu`].
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    device: Device,
    /// The Linear products run, by kind (forward, input gradient, weight gradient), as the CPU
    /// counts them: what proves that a frozen Linear never gets a weight-gradient product.
    products: GemmStats,
    /// The dtype `embedding_layernorm` writes the activations in: f32, bf16 or f16 (see the module
    /// docs). Every other op follows its inputs' dtype.
    activations: DType,
    /// How adapter locations run forward; None: [`LocationPath::auto`] at each call.
    location_path: Option<LocationPath>,
    /// How `attention_packed` and its backward run; None: [`AttentionPath::auto`] at each call.
    attention_path: Option<AttentionPath>,
    /// Whether the split path's adapter products may use TF32; None:
    /// [`CudaBackend::tf32_adapter_products`] decides at each call.
    tf32_adapter_products: Option<bool>,
    /// Where the 16-bit Linears add their bias; None: [`CudaBackend::linear_epilogue`] decides
    /// at each call.
    linear_epilogue: Option<LinearEpilogue>,
    /// How the split forward's bottleneck products run in the 16-bit pipelines; None:
    /// [`CudaBackend::split_forward`] decides at each call.
    split_forward: Option<SplitForward>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.gpu.describe())
    }
}

impl CudaBackend {
    /// The backend on `device` (`cuda:N`, or `cuda-sim` in a binary built with that feature).
    pub fn open(device: Device) -> Result<CudaBackend> {
        let gpu = Gpu::open(device)?;
        // Said now, not after a model has loaded and the first kernel fails to compile.
        if let (Device::Cuda(_), Some(why)) = (device, super::probe::gpu_libraries_missing()) {
            return Err(Error::Cuda(format!("device {device}: the GPU opens but {why}")));
        }
        Ok(CudaBackend::with_defaults(Arc::new(gpu), device))
    }

    /// A backend on `gpu` with every choice at its default (f32 activations, automatic paths).
    fn with_defaults(gpu: Arc<Gpu>, device: Device) -> CudaBackend {
        CudaBackend { gpu, device, products: GemmStats::default(), activations: DType::F32, location_path: None, attention_path: None, tf32_adapter_products: None, linear_epilogue: None, split_forward: None }
    }

    /// The backend on an already opened [`Gpu`].
    pub fn on(gpu: Gpu) -> CudaBackend {
        let device = match gpu.kind() {
            GpuKind::Sim => Device::CudaSim,
            GpuKind::Cuda => Device::Cuda(gpu.cuda_runtime().map_or(0, |rt| rt.context().ordinal())),
        };
        CudaBackend::with_defaults(Arc::new(gpu), device)
    }

    /// Another backend on the same GPU (one stream, one memory pool, the same location path)
    /// storing its activations as `dtype` (see [`CudaBackend::with_activations`]): an f32 and a
    /// bf16 model side by side, as the step benchmarks run them.
    pub fn sharing_gpu(&self, dtype: DType) -> Result<CudaBackend> {
        let choices = CudaBackend { location_path: self.location_path, attention_path: self.attention_path, tf32_adapter_products: self.tf32_adapter_products, linear_epilogue: self.linear_epilogue, split_forward: self.split_forward, ..CudaBackend::with_defaults(self.gpu.clone(), self.device) };
        choices.with_activations(dtype)
    }

    /// This backend with its activations stored as `dtype`: f32 (the default), or bf16 (f16) for
    /// the forward and the training step in bf16 (f16) over a frozen base loaded in the same dtype
    /// (`LoadOptions { dtype: DType::BF16, .. }`; `embedding_layernorm` refuses another base). See
    /// the module docs for what each op does with 16-bit activations and gradients.
    pub fn with_activations(mut self, dtype: DType) -> Result<CudaBackend> {
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                self.activations = dtype;
                Ok(self)
            }
            other => Err(Error::Unsupported(format!("activations in {other}: the CUDA backend stores activations in f32, bf16 or f16"))),
        }
    }

    /// This backend with every adapter location's forward and backward on `path` (the fused kernel, or the
    /// split path with the bottleneck products on GEMMs); without it, [`LocationPath::auto`]
    /// decides at each call (split on a GPU, fused on cuda-sim, `BERT_ADAPTERS_LOCATION_PATH`
    /// overriding).
    pub fn with_location_path(mut self, path: LocationPath) -> CudaBackend {
        self.location_path = Some(path);
        self
    }

    /// This backend with attention (`attention_packed` and its backward) on `path` (the fused
    /// flash-style kernels, batched GEMMs plus row kernels, or the GEMM path with its forward and
    /// its backward's scores in tensor-core kernels of our own); without it,
    /// [`AttentionPath::auto`] decides at each call (GEMMs on a GPU for T <= 512, fused on
    /// cuda-sim, `BERT_ADAPTERS_ATTENTION_PATH` overriding).
    pub fn with_attention_path(mut self, path: AttentionPath) -> CudaBackend {
        self.attention_path = Some(path);
        self
    }

    /// This backend with the split path's adapter products (the bottleneck's down and up
    /// projections, their input gradients and weight gradients) on TF32 tensor cores, or strict
    /// fp32; without it, [`CudaBackend::tf32_adapter_products`] decides at each call.
    pub fn with_tf32_adapter_products(mut self, on: bool) -> CudaBackend {
        self.tf32_adapter_products = Some(on);
        self
    }

    /// Whether the split path's adapter products may use TF32 (cuBLASLt's
    /// `CUBLAS_COMPUTE_32F_FAST_TF32`: operands rounded to 10 mantissa bits, f32 range and
    /// accumulation): as set by [`CudaBackend::with_tf32_adapter_products`], else as
    /// [`ADAPTER_PRODUCTS_VAR`] says, else TF32 for 16-bit activations (where PyTorch's autocast
    /// runs these products in bf16 / f16) and strict fp32 for f32 activations. The fused kernels'
    /// products are always fp32.
    pub fn tf32_adapter_products(&self) -> Result<bool> {
        if let Some(on) = self.tf32_adapter_products {
            return Ok(on);
        }
        Ok(super::probe::env_choice(ADAPTER_PRODUCTS_VAR, ADAPTER_PRODUCTS)?.unwrap_or(self.activations.is_half()))
    }

    /// This backend with its 16-bit Linears' bias added where `epilogue` says; without it,
    /// [`CudaBackend::linear_epilogue`] decides at each call.
    pub fn with_linear_epilogue(mut self, epilogue: LinearEpilogue) -> CudaBackend {
        self.linear_epilogue = Some(epilogue);
        self
    }

    /// Where the 16-bit Linears add their bias: as set by
    /// [`CudaBackend::with_linear_epilogue`], else as [`LINEAR_EPILOGUE_VAR`] says, else
    /// [`LinearEpilogue::Staged`].
    pub fn linear_epilogue(&self) -> Result<LinearEpilogue> {
        if let Some(e) = self.linear_epilogue {
            return Ok(e);
        }
        Ok(super::probe::env_choice(LINEAR_EPILOGUE_VAR, LinearEpilogue::NAMES)?.unwrap_or(LinearEpilogue::Staged))
    }

    /// This backend with the split forward's bottleneck products in the 16-bit pipelines run as
    /// `forward` says; without it, [`CudaBackend::split_forward`] decides at each call.
    pub fn with_split_forward(mut self, forward: SplitForward) -> CudaBackend {
        self.split_forward = Some(forward);
        self
    }

    /// How the split forward's bottleneck products run with 16-bit activations: as set by
    /// [`CudaBackend::with_split_forward`], else as [`SPLIT_FORWARD_VAR`] says, else
    /// [`SplitForward::Gemm`] (the tensor-core kernels have not yet run on a GPU: docs/gpu-log.md).
    pub fn split_forward(&self) -> Result<SplitForward> {
        if let Some(f) = self.split_forward {
            return Ok(f);
        }
        Ok(super::probe::env_choice(SPLIT_FORWARD_VAR, SplitForward::NAMES)?.unwrap_or(SplitForward::Gemm))
    }

    /// The descriptors of an adapter location's branches, with the product precision of
    /// [`CudaBackend::tf32_adapter_products`] and the forward products of
    /// [`CudaBackend::split_forward`].
    /// Asking for the tensor-core forward in a 16-bit pipeline first checks the device's
    /// fragment layout ([`Gpu::check_tensor_core_layout`], once): an error, not wrong values,
    /// where it differs.
    fn location_descriptors<'w>(&self, hidden: usize, steps: LocationSteps, weights: &[BranchWeights<'w>]) -> Result<LocationDescriptors<'w>> {
        let forward = self.split_forward()?;
        if forward == SplitForward::TensorCores && self.activations.is_half() {
            self.gpu.check_tensor_core_layout()?;
        }
        Ok(LocationDescriptors::new(&self.gpu, hidden, steps, weights)?.with_tf32_products(self.tf32_adapter_products()?).with_split_forward(forward))
    }

    /// `path`, after checking the device's fragment layout (once) where it is the tensor-core
    /// one in a 16-bit pipeline, as [`CudaBackend::location_descriptors`] does for the adapters.
    fn tensor_core_checked(&self, path: AttentionPath) -> Result<AttentionPath> {
        if path == AttentionPath::TensorCores && self.activations.is_half() {
            self.gpu.check_tensor_core_layout()?;
        }
        Ok(path)
    }

    /// The path attention over sequences of `seq` tokens takes.
    pub fn attention_path(&self, seq: usize) -> Result<AttentionPath> {
        self.attention_path.map_or_else(|| AttentionPath::auto(&self.gpu, seq), Ok)
    }

    /// The path the next adapter location's forward (and backward) takes.
    pub fn location_path(&self) -> Result<LocationPath> {
        self.location_path.map_or_else(|| LocationPath::auto(&self.gpu), Ok)
    }

    /// The dtype the activations are stored in (see [`CudaBackend::with_activations`]).
    pub fn activations(&self) -> DType {
        self.activations
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The Linear products this backend has run (`[forward, input gradient, weight gradient]`
    /// calls and multiply-adds). The adapter locations' own products run inside their fused
    /// backward and are counted by the kernels launched ([`Gpu::launch_counts`]).
    pub fn gemm_counts(&self) -> GemmCounts {
        self.products.snapshot()
    }

    /// `nice_backward_into` on f32 `x` and `dy`; with `stored`, G's input y1 is recomputed and
    /// rounded to that 16-bit dtype, as the 16-bit forward stored it before G read it.
    fn nice_backward_f32(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>, stored: Option<DType>) -> Result<()> {
        const OP: &str = "nice_backward";
        if dy.shape() != x.shape() {
            return Err(Error::shape(OP, format!("gradient {:?} for input {:?}", dy.shape(), x.shape())));
        }
        let (rows, hidden) = (x.rows(), x.last_dim());
        let (s1, s2) = (hidden / 2, hidden - hidden / 2);
        if rows == 0 {
            return Ok(());
        }
        // Columns [c0, c0 + w) of a [rows, hidden] tensor, as a new [rows, w] tensor.
        let columns = |t: &Tensor, c0: usize, w: usize| -> Result<Tensor> {
            let half = self.new_tensor::<f32>(&[rows, w])?;
            super::nice::split_columns::<f32>(&self.gpu, &self.view(OP, t)?, rows, c0, w, &mut self.view_mut(OP, &half)?)?;
            Ok(half)
        };
        let (x1, x2, g1, g2) = (columns(x, 0, s1)?, columns(x, s1, s2)?, columns(dy, 0, s1)?, columns(dy, s1, s2)?);
        let (act, g, acc) = (params.activation, &out.grads, out.accumulate);
        // The forward again: y1 = x1 + F(x2) is G's input (spec 5.1: y2 = x2 + G(y1)).
        let (a_f, pre_f) = self.linear_act(&x2, params.f0.0, Some(params.f0.1), act)?;
        let y1 = self.add(&x1, &self.linear(&a_f, params.f2.0, Some(params.f2.1))?)?;
        let y1 = match stored {
            Some(dtype) => self.cast(&self.cast(&y1, dtype)?, DType::F32)?,
            None => y1,
        };
        let (a_g, pre_g) = self.linear_act(&y1, params.g0.0, Some(params.g0.1), act)?;
        // G, from dy2; its input gradient joins dy1 (y1 reaches the output directly and through G).
        self.linear_backward_params_into(&g2, &a_g, &g.g2.0, Some(&g.g2.1), acc)?;
        let d_pre_g = self.linear_backward_input_act(&g2, params.g2.0, &pre_g, act)?;
        self.linear_backward_params_into(&d_pre_g, &y1, &g.g0.0, Some(&g.g0.1), acc)?;
        self.linear_backward_input_into(&d_pre_g, params.g0.0, &g1, true)?;
        // F, from dy1 (x itself is below the trainable set: no input gradient).
        self.linear_backward_params_into(&g1, &a_f, &g.f2.0, Some(&g.f2.1), acc)?;
        let d_pre_f = self.linear_backward_input_act(&g1, params.f2.0, &pre_f, act)?;
        self.linear_backward_params_into(&d_pre_f, &x2, &g.f0.0, Some(&g.f0.1), acc)
    }

    fn storage<'t>(&self, op: &str, t: &'t Tensor) -> Result<&'t CudaStorage> {
        let on_other = || Error::Unsupported(format!("{op}: a tensor {:?} on {} was given to the {} backend", t.shape(), t.device(), self.device));
        match t.storage() {
            Storage::Device(d) if d.device() == self.device => d.as_any().downcast_ref::<CudaStorage>().ok_or_else(on_other),
            _ => Err(on_other()),
        }
    }

    /// The elements of `t` (a contiguous view of its storage).
    fn view<'t, T: BufferElement>(&self, op: &str, t: &'t Tensor) -> Result<DeviceView<'t, T>> {
        if t.dtype() != T::DTYPE {
            return Err(Error::Unsupported(format!("{op}: a {} tensor {:?} was given where the CUDA backend needs {}", t.dtype(), t.shape(), T::DTYPE)));
        }
        let st = self.storage(op, t)?;
        let buf = T::get(&st.buf).ok_or_else(|| Error::Internal(format!("{op}: storage of a {} tensor holds {}", t.dtype(), st.buf.dtype())))?;
        buf.slice(t.offset()..t.offset() + t.elem_count())
    }

    /// A writable view of `t`, which the caller made (or checked) so that nothing else reads or
    /// writes these elements while the view is used.
    fn view_mut<'t, T: BufferElement>(&self, op: &str, t: &'t Tensor) -> Result<DeviceViewMut<'t, T>> {
        let v = self.view::<T>(op, t)?;
        // SAFETY: the caller's contract above; the view borrows `t`, which keeps the buffer alive.
        Ok(unsafe { v.assume_writable() })
    }

    fn view_pair<'t>(&self, op: &str, (w, b): (&'t Tensor, &'t Tensor)) -> Result<(DeviceView<'t, f32>, DeviceView<'t, f32>)> {
        Ok((self.view(op, w)?, self.view(op, b)?))
    }

    fn device_ln<'t>(&self, op: &str, ln: Option<LayerNormParams<'t>>) -> Result<Option<DeviceLayerNorm<'t>>> {
        ln.map(|l| Ok(DeviceLayerNorm { gamma: self.view(op, l.gamma)?, beta: self.view(op, l.beta)?, eps: l.eps })).transpose()
    }

    /// A location's branches as device weights (with their own dropout), its launch shape, and
    /// the seed of the branches' dropout masks (None when no branch drops out).
    fn location_parts<'t>(&self, op: &'static str, loc: &AdapterLocation<'t>) -> Result<(Vec<BranchWeights<'t>>, LocationShape, Option<DropoutSeed<'t>>)> {
        let (dropout, seed_spec) = location_dropout(loc)?;
        let seed = seed_spec
            .map(|spec| Ok::<_, Error>(DropoutSeed { buffer: spec.seed_buffer.as_ref().map(|b| self.view::<u32>(op, &b.0)).transpose()?, seed: spec.seed }))
            .transpose()?;
        let hidden = loc.h.last_dim();
        let n = loc.branches.len();
        let rows = loc.h.rows();
        let seq_len = loc.seq_len.max(1);
        let batch = if loc.replicate { rows / seq_len } else { rows / seq_len / n.max(1) };
        let mut weights = Vec::with_capacity(n);
        for (p, dropout) in loc.branches.iter().zip(dropout) {
            let scaling = match p.scaling {
                ScalingParam::Fixed(v) => DeviceScaling::Fixed(v),
                ScalingParam::Learned(t) => DeviceScaling::Learned(self.view(op, t)?),
                ScalingParam::Channel(t) => DeviceScaling::Channel(self.view(op, t)?),
            };
            weights.push(BranchWeights {
                bottleneck: p.down_w.shape().first().copied().unwrap_or(0),
                down_w: self.view(op, p.down_w)?,
                down_b: self.view(op, p.down_b)?,
                up_w: self.view(op, p.up_w)?,
                up_b: self.view(op, p.up_b)?,
                activation: p.activation,
                ln_before: self.device_ln(op, p.ln_before)?,
                ln_after: self.device_ln(op, p.ln_after)?,
                scaling,
                gate: p.gate.map(|(w, b)| self.view_pair(op, (w, b))).transpose()?,
                adapter_residual_before_ln: p.adapter_residual_before_ln,
                dropout,
            });
        }
        Ok((weights, LocationShape { batch, seq_len, hidden, branches: n, replicate: loc.replicate }, seed))
    }

    fn new_tensor<T: BufferElement>(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let buf = self.gpu.alloc::<T>(n)?;
        Ok(Tensor::from_device(Arc::new(CudaStorage { buf: T::wrap(buf), device: self.device }), T::DTYPE, shape))
    }

    /// The one dtype the frozen-base tensors of `group` (name, tensor) are stored in: f32, or bf16
    /// for a base loaded in bf16. A kernel variant reads a whole group in one type, so a mixed
    /// group is refused, naming the tensors and their dtypes.
    fn base_dtype(&self, op: &str, group: &[(&str, &Tensor)]) -> Result<DType> {
        let Some(&(first_name, first)) = group.first() else { return Ok(DType::F32) };
        let dtype = first.dtype();
        if let Some((name, t)) = group.iter().find(|(_, t)| t.dtype() != dtype) {
            return Err(Error::Unsupported(format!(
                "{op}: {name} is {} but {first_name} is {dtype}; the CUDA backend reads these frozen-base tensors in one dtype (f32, bf16 or f16)",
                t.dtype()
            )));
        }
        match dtype {
            DType::F32 | DType::BF16 | DType::F16 => Ok(dtype),
            other => Err(Error::Unsupported(format!("{op}: {first_name} is {other}; the CUDA backend reads a frozen base stored in f32, bf16 or f16 (load it in one of those, or use --device cpu)"))),
        }
    }

    /// `t` as f32 for a product: an f32 tensor's own view, or a bf16 or f16 one widened (exactly)
    /// into `scratch`, a new f32 buffer that must outlive the launch reading it.
    fn f32_operand<'t>(&self, op: &str, name: &str, t: &'t Tensor, scratch: &'t mut Option<DeviceBuffer<f32>>) -> Result<DeviceView<'t, f32>> {
        match t.dtype() {
            DType::F32 => self.view(op, t),
            DType::BF16 => {
                let wide = scratch.insert(self.gpu.alloc::<f32>(t.elem_count())?);
                elementwise::cast_bf16_to_f32(&self.gpu, &self.view(op, t)?, &mut wide.view_mut())?;
                Ok(wide.view())
            }
            DType::F16 => {
                let wide = scratch.insert(self.gpu.alloc::<f32>(t.elem_count())?);
                elementwise::cast_f16_to_f32(&self.gpu, &self.view(op, t)?, &mut wide.view_mut())?;
                Ok(wide.view())
            }
            d => Err(Error::Unsupported(format!("{op}: {name} {:?} is {d}; the CUDA backend takes it in f32, bf16 or f16", t.shape()))),
        }
    }

    /// `spec` resolved for the dropout kernels: its seed buffer (a U32 `[2]` tensor on this
    /// device) when it has one, the stream of each block and the shard's offset.
    fn device_dropout<'t>(&self, op: &str, spec: &'t DropoutSpec) -> Result<elementwise::DeviceDropout<'t>> {
        let seed_buffer = spec.seed_buffer.as_ref().map(|b| self.view::<u32>(op, &b.0)).transpose()?;
        let streams = (0..spec.blocks.len().max(1)).map(|j| spec.block_stream(j)).collect();
        Ok(elementwise::DeviceDropout { seed_buffer, seed: spec.seed, p: spec.p, streams, offset: spec.offset })
    }

    /// `spec`'s mask applied to `t` in place (a tensor this op has just made), f32, bf16 or f16
    /// (`dropout_bf16io` / `dropout_f16io`: the f32 mask and product on the widened value, rounded
    /// once).
    fn dropout_in_place(&self, op: &str, t: &Tensor, spec: &DropoutSpec) -> Result<()> {
        let d = self.device_dropout(op, spec)?;
        by_activation_dtype!(t.dtype(), A => elementwise::dropout_in_place::<A>(&self.gpu, &mut self.view_mut(op, t)?, &d))
    }

    /// `attention_packed_backward`'s launch with the activations stored as `A`.
    fn attention_backward_typed<A: BufferElement + ActivationScalar>(&self, [dctx, qkv, ctx, lse, mask_bias]: [&Tensor; 5], dqkv: &Tensor, (batch, seq, hidden, heads): (usize, usize, usize, usize), dropout: Option<&elementwise::DeviceDropout<'_>>) -> Result<()> {
        const OP: &str = "attention_packed_backward";
        attention_packed_backward_dropout_as::<A>(
            &self.gpu,
            &self.view(OP, dctx)?,
            &self.view(OP, qkv)?,
            &self.view(OP, ctx)?,
            &self.view(OP, lse)?,
            &self.view(OP, mask_bias)?,
            &mut self.view_mut(OP, dqkv)?,
            batch,
            seq,
            hidden,
            heads,
            dropout,
        )
    }

    /// `adapter_location_backward_into` for bf16 or f16 activations (`dtype`) on the fused path,
    /// whose kernel reads f32 only: `h`, `r`, `d_out` and the BERT LayerNorm's γ/β are widened
    /// exactly, the f32 backward runs, and the input gradients are rounded once to `dtype`. The
    /// weight gradients are f32 either way. (Costs three widening passes and one narrowing over
    /// `[rows, H]`.)
    fn adapter_location_backward_widened(&self, dtype: DType, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let wide = |t: &Tensor| self.cast(t, DType::F32);
        let (h, r, d) = (wide(loc.h)?, wide(loc.r)?, wide(d_out)?);
        let (gamma, beta) = (wide(loc.layer_norm.gamma)?, wide(loc.layer_norm.beta)?);
        let wide_loc = AdapterLocation {
            h: &h,
            r: &r,
            layer_norm: LayerNormParams { gamma: &gamma, beta: &beta, eps: loc.layer_norm.eps },
            steps: loc.steps,
            branches: loc.branches,
            replicate: loc.replicate,
            seq_len: loc.seq_len,
        };
        let (dh, dr) = self.adapter_location_backward_into(&wide_loc, &d, grads, need_input_grads)?;
        let narrow = |t: Option<Tensor>| t.map(|t| self.cast(&t, dtype)).transpose();
        Ok((narrow(dh)?, narrow(dr)?))
    }

    /// `adapter_location_backward_into` with the activations, their gradients and the BERT
    /// LayerNorm's γ/β stored as `A` (f32; or bf16 / f16 on the split path, over a base of `A`).
    fn adapter_backward_typed<A: BufferElement + ActivationScalar + BaseScalar>(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        const OP: &str = "adapter_location_backward";
        if grads.len() != loc.branches.len() {
            return Err(Error::shape(OP, format!("{} gradient slots for {} branches", grads.len(), loc.branches.len())));
        }
        let (weights, shape, dropout_seed) = self.location_parts(OP, loc)?;
        let descriptors = self.location_descriptors(shape.hidden, loc.steps, &weights)?;
        let input_rows = if loc.replicate { shape.batch } else { shape.batch * shape.branches };
        let (dh, dr) = if need_input_grads {
            let dims = [input_rows, shape.seq_len, shape.hidden];
            (Some(self.new_tensor::<A>(&dims)?), Some(self.new_tensor::<A>(&dims)?))
        } else {
            (None, None)
        };
        let mut branch_grads = Vec::with_capacity(grads.len());
        for g in grads {
            branch_grads.push(match g {
                None => None,
                Some(GradsOut { grads: g, accumulate }) => Some(BranchGrads {
                    down_w: self.view_mut(OP, &g.down_w)?,
                    down_b: self.view_mut(OP, &g.down_b)?,
                    up_w: self.view_mut(OP, &g.up_w)?,
                    up_b: self.view_mut(OP, &g.up_b)?,
                    ln_before: g.ln_before.as_ref().map(|(a, b)| Ok::<_, Error>((self.view_mut(OP, a)?, self.view_mut(OP, b)?))).transpose()?,
                    ln_after: g.ln_after.as_ref().map(|(a, b)| Ok::<_, Error>((self.view_mut(OP, a)?, self.view_mut(OP, b)?))).transpose()?,
                    scaling: g.scaling.as_ref().map(|t| self.view_mut(OP, t)).transpose()?,
                    gate: g.gate.as_ref().map(|(a, b)| Ok::<_, Error>((self.view_mut(OP, a)?, self.view_mut(OP, b)?))).transpose()?,
                    accumulate: *accumulate,
                }),
            });
        }
        let input_grads = match (&dh, &dr) {
            (Some(a), Some(b)) => Some((self.view_mut(OP, a)?, self.view_mut(OP, b)?)),
            _ => None,
        };
        let mut outputs = LocationBackwardOutputs { input_grads, grads: &mut branch_grads };
        let ln = &loc.layer_norm;
        let inputs = LocationInputs::<A, A> { h: self.view(OP, loc.h)?, r: self.view(OP, loc.r)?, ln_gamma: self.view(OP, ln.gamma)?, ln_beta: self.view(OP, ln.beta)?, ln_eps: ln.eps, dropout_seed };
        // The location's path picks the backward too (fused kernel, or split with GEMMs).
        adapter_location_backward_on(&self.gpu, &inputs, &self.view(OP, d_out)?, &descriptors, &mut outputs, shape, self.location_path()?)?;
        Ok((dh, dr))
    }

    fn unsupported(&self, op: &str) -> Error {
        Error::Unsupported(format!("{op} is not implemented on the CUDA backend yet ({}); use --device cpu", self.device))
    }

    /// `y[rows, out] = x[rows, in]·Wᵀ + b` as the column-major `Yᵀ = W·Xᵀ` (+ bias over columns).
    ///
    /// `x` is f32; `W` and `b` are f32, or bf16 (a frozen base loaded in bf16), which is first
    /// widened exactly into an f32 copy so the f32 GEMM computes what the CPU backend does. The
    /// bf16 tensor-core GEMM ([`CudaBackend::linear_bf16io`]) is not used here: cuBLASLt wants A
    /// and B of one type, so the f32 activations would have to be rounded to bf16, which moves the
    /// output far outside the fp32 parity bound against the CPU; it is for bf16 activations (a
    /// bf16 `x` goes there before it gets here: `linear_bf16_activations`). The copy is allocated per call, not kept in the
    /// backend: on a GPU it is a stream-ordered allocation (served from the stream's memory pool once warm)
    /// freed in stream order after the product, so at most one widened weight is alive at a time
    /// (9.4 MB for BERT-base's largest, the 3072×768 FFN weight) and the backend needs no lock
    /// around a shared buffer.
    fn linear_into(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &Tensor) -> Result<()> {
        const OP: &str = "linear";
        let (d_out, d_in) = match w.shape() {
            [o, i] => (*o, *i),
            s => return Err(Error::shape(OP, format!("weight must be [out, in], got {s:?}"))),
        };
        if x.last_dim() != d_in {
            return Err(Error::shape(OP, format!("input {:?} does not end in the weight's in-features {d_in}", x.shape())));
        }
        let rows = x.rows();
        let epilogue = if b.is_some() { Epilogue::Bias } else { Epilogue::None };
        let g = Gemm::new(Transpose::Yes, Transpose::No, d_out, rows, d_in).with_epilogue(epilogue);
        self.products.count(GemmKind::Forward, rows * d_in * d_out);
        if x.dtype() != DType::F32 {
            return Err(Error::Unsupported(format!(
                "{OP}: the input x {:?} is {}; this Linear takes f32 activations (bf16 or f16 activations with a base of their dtype: CudaBackend::linear_bf16io / linear_f16io)",
                x.shape(),
                x.dtype()
            )));
        }
        let (mut w_wide, mut b_wide) = (None, None);
        let w = self.f32_operand(OP, "weight W", w, &mut w_wide)?;
        let bias = b.map(|b| self.f32_operand(OP, "bias b", b, &mut b_wide)).transpose()?;
        self.gpu.gemm(&g, &w, &self.view(OP, x)?, &mut self.view_mut(OP, y)?, bias.as_ref())
    }

    /// `y[rows, out] = act(x[rows, in]·Wᵀ + b)` with `x`, `W: [out, in]`, `b: [out]` and the new
    /// `y` all bf16 (issue 15's bf16 activation pipeline over a base loaded in bf16): one bf16
    /// GEMM, f32 accumulation, bias and activation in its epilogue, y rounded once
    /// ([`super::gemm::linear_bf16io`]). `act` is `None`, `Relu` or `GeluNew` (the tanh GELU of
    /// cuBLASLt's epilogue); BERT's erf `Gelu` has no epilogue and is refused with
    /// `Error::Unsupported`, as is a tensor in another dtype (named).
    pub fn linear_bf16io(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
        self.linear_16io::<bf16>("linear_bf16io", x, w, b, act)
    }

    /// [`CudaBackend::linear_bf16io`] with x, W, b and y in f16 ([`super::gemm::linear_f16io`]).
    pub fn linear_f16io(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
        self.linear_16io::<f16>("linear_f16io", x, w, b, act)
    }

    /// [`CudaBackend::linear_bf16io`] and [`CudaBackend::linear_f16io`], with every tensor of `H`.
    /// cuBLASLt's epilogue semantics: the activation at the f32 sum, rounded once (the model's
    /// 16-bit Linears go through [`CudaBackend::linear_half_typed`] instead).
    fn linear_16io<H: BufferElement + GemmScalar + ActivationScalar>(&self, op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Option<Activation>) -> Result<Tensor> {
        let (shape, dims) = half_linear_shape::<H>(op, x, w, b)?;
        let y = self.new_tensor::<H>(&shape)?;
        let bias = b.map(|b| self.view::<H>(op, b)).transpose()?;
        self.products.count(GemmKind::Forward, dims.rows * dims.d_in * dims.d_out);
        linear_16io(&self.gpu, &self.view(op, x)?, &self.view(op, w)?, bias.as_ref(), dims, act, &mut self.view_mut(op, &y)?)?;
        Ok(y)
    }

    /// A Linear on 16-bit activations `H` with what follows it in the model fused into one pass.
    /// With a bias, the product runs with an f32 D and no cuBLASLt epilogue (cuBLASLt's 16-bit
    /// outputs add the bias after rounding: docs/gpu-log.md), and one `linear_epilogue_*` kernel
    /// adds the bias in f32 and rounds once, applying the activation (at the rounded
    /// pre-activation when it is kept for the backward) or the dropout on the way
    /// ([`elementwise::linear_epilogue`], [`elementwise::linear_epilogue_dropout`]): one pass over
    /// the f32 product, where staging the product and then running the activation or dropout
    /// over it took three. The activation is taken at the rounded product (bit for bit the
    /// unfused path's); the dropout's multiply at the f32 sum, rounded once (the unfused path
    /// rounded twice). Without a bias, or under [`LinearEpilogue::Cublaslt`] (cuBLASLt adds the
    /// bias, as PyTorch's autocast Linear), the GEMM writes `H` itself and the activation or
    /// dropout is its own pass over it. x, W and b must be `H` (named otherwise).
    fn linear_half_typed<H: BufferElement + GemmScalar + ActivationScalar>(&self, op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, post: HalfEpilogue<'_>) -> Result<(Tensor, Option<Tensor>)> {
        let (shape, dims) = half_linear_shape::<H>(op, x, w, b)?;
        let (d_in, d_out) = (dims.d_in, dims.d_out);
        let y = self.new_tensor::<H>(&shape)?;
        self.products.count(GemmKind::Forward, dims.rows * d_in * d_out);
        let (xv, wv) = (self.view::<H>(op, x)?, self.view::<H>(op, w)?);
        let bias = b.map(|b| self.view::<H>(op, b)).transpose()?;
        // Without a bias, or with cuBLASLt adding it: the product writes H itself, and what
        // follows the Linear is its own pass over y.
        let in_product = bias.is_none() || self.linear_epilogue()? == LinearEpilogue::Cublaslt;
        if in_product {
            linear_16io_with(&self.gpu, &xv, &wv, bias.as_ref(), dims, None, &mut self.view_mut(op, &y)?, true)?;
            return match post {
                HalfEpilogue::Act { act: None, .. } => Ok((y, None)),
                HalfEpilogue::Act { act: Some(a), keep_pre: false } => {
                    elementwise::bias_act_in_place::<H>(&self.gpu, &mut self.view_mut(op, &y)?, None, Some(a), d_out)?;
                    Ok((y, None))
                }
                HalfEpilogue::Act { act: Some(a), keep_pre: true } => {
                    let out = self.new_tensor::<H>(&shape)?;
                    elementwise::bias_act::<H>(&self.gpu, &self.view(op, &y)?, None, Some(a), d_out, &mut self.view_mut(op, &out)?, None)?;
                    Ok((out, Some(y)))
                }
                HalfEpilogue::Dropout(spec) => {
                    if let Some(spec) = spec {
                        self.dropout_in_place(op, &y, spec)?;
                    }
                    Ok((y, None))
                }
            };
        }
        let bias = bias.ok_or_else(|| Error::internal(format!("{op}: a staged epilogue without a bias")))?;
        let mut acc = self.gpu.alloc::<f32>(dims.rows * d_out)?;
        let g = Gemm::new(Transpose::Yes, Transpose::No, d_out, dims.rows, d_in).with_types(H::INPUT, OutputType::F32);
        self.gpu.gemm(&g, &wv, &xv, &mut acc.view_mut(), None)?;
        match post {
            HalfEpilogue::Act { act, keep_pre } => {
                let pre = if keep_pre { Some(self.new_tensor::<H>(&shape)?) } else { None };
                {
                    let mut pre_view = pre.as_ref().map(|p| self.view_mut(op, p)).transpose()?;
                    elementwise::linear_epilogue::<H>(&self.gpu, &acc.view(), Some(&bias), act, d_out, &mut self.view_mut(op, &y)?, pre_view.as_mut())?;
                }
                Ok((y, pre))
            }
            HalfEpilogue::Dropout(spec) => {
                match spec {
                    Some(spec) => elementwise::linear_epilogue_dropout::<H>(&self.gpu, &acc.view(), Some(&bias), d_out, &mut self.view_mut(op, &y)?, &self.device_dropout(op, spec)?)?,
                    None => elementwise::linear_epilogue::<H>(&self.gpu, &acc.view(), Some(&bias), None, d_out, &mut self.view_mut(op, &y)?, None)?,
                }
                Ok((y, None))
            }
        }
    }

    /// `act(x·Wᵀ + b)` for a bf16 or f16 `x` (the model's `linear*` ops with 16-bit activations):
    /// W and b must be the base in x's dtype (an f32 weight, a head's or an adapter's, is refused,
    /// named). Any activation, at the rounded product as in a plain bf16 (f16) model
    /// ([`CudaBackend::linear_half_typed`]).
    fn linear_half_activations(&self, op: &'static str, x: &Tensor, w: &Tensor, b: Option<&Tensor>, post: HalfEpilogue<'_>) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = x.dtype();
        for (name, t) in [("the weight W", Some(w)), ("the bias b", b)] {
            if let Some(t) = t.filter(|t| t.dtype() != dtype) {
                return Err(Error::Unsupported(format!(
                    "{op}: the input x {:?} is {dtype} but {name} {:?} is {}; a Linear on {dtype} activations takes a {dtype} weight and bias (a frozen base loaded in {dtype}; widen x to f32 for an f32 weight)",
                    x.shape(),
                    t.shape(),
                    t.dtype()
                )));
            }
        }
        by_half_dtype!(dtype, H => self.linear_half_typed::<H>(op, x, w, b, post))
    }

    #[allow(clippy::too_many_arguments)] // `residual_layernorm` plus its three outputs
    fn ln_into(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, y: &Tensor, stats: (&Tensor, &Tensor)) -> Result<()> {
        const OP: &str = "residual_layernorm";
        match (self.base_dtype(OP, &[("gamma", gamma), ("beta", beta)])?, activation_dtype(x)) {
            (DType::BF16, DType::BF16) => self.ln_typed::<bf16, bf16>(x, residual, gamma, beta, eps, y, stats),
            (DType::F16, DType::F16) => self.ln_typed::<f16, f16>(x, residual, gamma, beta, eps, y, stats),
            (_, a @ (DType::BF16 | DType::F16)) => Err(half_needs_same_base(OP, a, "LayerNorm gamma", gamma)),
            (DType::BF16, _) => self.ln_typed::<bf16, f32>(x, residual, gamma, beta, eps, y, stats),
            (DType::F16, _) => self.ln_typed::<f16, f32>(x, residual, gamma, beta, eps, y, stats),
            _ => self.ln_typed::<f32, f32>(x, residual, gamma, beta, eps, y, stats),
        }
    }

    /// The LayerNorm kernels' inputs: `x` (and `residual`) as `A`, γ and β as `P`.
    fn ln_inputs<'t, P: BufferElement + BaseScalar, A: BufferElement + ActivationScalar>(&self, op: &str, x: &'t Tensor, residual: Option<&'t Tensor>, gamma: &'t Tensor, beta: &'t Tensor, eps: f32) -> Result<LayerNormInputs<'t, P, A>> {
        Ok(LayerNormInputs {
            x: self.view(op, x)?,
            residual: residual.map(|r| self.view(op, r)).transpose()?,
            gamma: self.view(op, gamma)?,
            beta: self.view(op, beta)?,
            rows: x.rows(),
            cols: x.last_dim(),
            eps,
        })
    }

    /// [`Self::ln_into`] with γ and β stored as `P`, the activations as `A`.
    #[allow(clippy::too_many_arguments)]
    fn ln_typed<P: BufferElement + BaseScalar, A: BufferElement + ActivationScalar>(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, y: &Tensor, stats: (&Tensor, &Tensor)) -> Result<()> {
        const OP: &str = "residual_layernorm";
        let inputs = self.ln_inputs::<P, A>(OP, x, residual, gamma, beta, eps)?;
        let mut outputs = LayerNormOutputs { y: self.view_mut(OP, y)?, mean: self.view_mut(OP, stats.0)?, rstd: self.view_mut(OP, stats.1)? };
        residual_layernorm_forward(&self.gpu, &inputs, &mut outputs)
    }

    /// The training LayerNorm (`residual_layernorm_stats`) with γ/β stored as `P` and the
    /// activations `x`, `residual`, `y`, `z` as `A`; the `[rows, 2]` statistics are f32.
    #[allow(clippy::too_many_arguments)] // residual_layernorm_stats's operands plus its three outputs
    fn ln_train_typed<P: BufferElement + BaseScalar, A: BufferElement + ActivationScalar>(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, [y, z, stats]: [&Tensor; 3]) -> Result<()> {
        const OP: &str = "residual_layernorm_stats";
        let inputs = self.ln_inputs::<P, A>(OP, x, residual, gamma, beta, eps)?;
        let mut outputs = LayerNormTrainOutputs { y: self.view_mut(OP, y)?, z: self.view_mut(OP, z)?, stats: self.view_mut(OP, stats)? };
        residual_layernorm_forward_train(&self.gpu, &inputs, &mut outputs)
    }

    /// 16-bit training's operand rule, checked before a bf16 or f16 op whose gradient is of
    /// `dtype`: the other activations of the op (`activations`) are of `dtype` too, and the
    /// frozen-base tensors it reads (`base`) are of `dtype` (a base loaded with `LoadOptions {
    /// dtype, .. }`). bf16 and f16 never mix. The error names the operand.
    fn half_training_operands(&self, op: &str, dtype: DType, activations: &[(&str, &Tensor)], base: &[(&str, &Tensor)]) -> Result<()> {
        if let Some((name, t)) = activations.iter().find(|(_, t)| t.dtype() != dtype) {
            return Err(Error::Input(format!("{op}: {name} {:?} is {} but the gradient is {dtype}; a {dtype} training step keeps every activation in {dtype}", t.shape(), t.dtype())));
        }
        match base.iter().find(|(_, t)| t.dtype() != dtype) {
            Some((name, t)) => Err(half_needs_same_base(op, dtype, name, t)),
            None => Ok(()),
        }
    }

    /// Every tensor of `others` in `dtype`, the dtype of the op's first activation operand
    /// (`first`): an [`Error::Input`] naming the first that is not (a bf16 and an f16 operand, or
    /// a 16-bit and an f32 one, never meet in one kernel).
    fn same_activation_dtype(&self, op: &str, (first, dtype): (&str, DType), others: &[(&str, &Tensor)]) -> Result<()> {
        match others.iter().find(|(_, t)| t.dtype() != dtype) {
            Some((name, t)) => Err(Error::Input(format!("{op}: {name} {:?} is {} but {first} is {dtype}; the operands of one op share a dtype", t.shape(), t.dtype()))),
            None => Ok(()),
        }
    }

    /// The embedding kernel's inputs with the tables and LayerNorm stored as `T`.
    fn embedding_inputs<'t, T: BufferElement + BaseScalar>(
        &self,
        (input_ids, token_type_ids): (DeviceView<'t, u32>, DeviceView<'t, u32>),
        word: &'t Tensor,
        position: &'t Tensor,
        token_type: &'t Tensor,
        ln: &LayerNormParams<'t>,
        (batch, seq_len, hidden, eps, positions): (usize, usize, usize, f32, crate::config::Positions),
    ) -> Result<EmbeddingInputs<'t, T>> {
        const OP: &str = "embedding_layernorm";
        Ok(EmbeddingInputs {
            input_ids,
            token_type_ids,
            word: self.view(OP, word)?,
            position: self.view(OP, position)?,
            token_type: self.view(OP, token_type)?,
            gamma: self.view(OP, ln.gamma)?,
            beta: self.view(OP, ln.beta)?,
            batch,
            seq_len,
            hidden,
            positions,
            eps,
        })
    }

    /// `attention_packed` with Q, K, V and the context stored as `A` (f32, bf16 or f16; the mask
    /// bias and the log-sum-exp are f32 either way).
    fn attention_typed<A: BufferElement + ActivationScalar + GemmScalar>(&self, qkv: &Tensor, mask_bias: &Tensor, ctx: &Tensor, lse: &Tensor, (batch, seq, hidden, heads): (usize, usize, usize, usize), dropout: Option<&DropoutSpec>) -> Result<()> {
        const OP: &str = "attention_packed";
        let (q, m, mut c, mut l) = (self.view::<A>(OP, qkv)?, self.view(OP, mask_bias)?, self.view_mut::<A>(OP, ctx)?, self.view_mut(OP, lse)?);
        let path = self.tensor_core_checked(self.attention_path(seq)?)?;
        if path.gemm_backward() {
            let d = dropout.map(|spec| self.device_dropout(OP, spec)).transpose()?;
            let forward = if path == AttentionPath::TensorCores { attention_mma_forward::<A> } else { attention_gemm_forward::<A> };
            return forward(&self.gpu, &q, &m, &mut c, &mut l, batch, seq, hidden, heads, d.as_ref());
        }
        match dropout {
            None => attention_packed_forward(&self.gpu, &q, &m, &mut c, &mut l, batch, seq, hidden, heads),
            Some(spec) => attention_packed_forward_dropout(&self.gpu, &q, &m, &mut c, &mut l, batch, seq, hidden, heads, &self.device_dropout(OP, spec)?),
        }
    }

    /// `adapter_location` with 16-bit activations `A` (`h`, `r` and the output in bf16 or f16;
    /// the `_bf16io` / `_f16io` kernels): the BERT LayerNorm must be the base's `A`, the adapter
    /// weights stay f32, the gate means are f32 scratch.
    fn adapter_location_io<A: BufferElement + ActivationScalar + BaseScalar>(&self, loc: &AdapterLocation) -> Result<Tensor> {
        const OP: &str = "adapter_location";
        let ln = &loc.layer_norm;
        self.same_activation_dtype(OP, ("h", <A as ActivationScalar>::DTYPE), &[("r", loc.r)])?;
        if self.base_dtype(OP, &[("LayerNorm gamma", ln.gamma), ("LayerNorm beta", ln.beta)])? != <A as ActivationScalar>::DTYPE {
            return Err(half_needs_same_base(OP, <A as ActivationScalar>::DTYPE, "LayerNorm gamma", ln.gamma));
        }
        let (weights, shape, dropout_seed) = self.location_parts(OP, loc)?;
        let (n, batch, seq_len, hidden) = (shape.branches, shape.batch, shape.seq_len, shape.hidden);
        let descriptors = self.location_descriptors(hidden, loc.steps, &weights)?;
        let out = self.new_tensor::<A>(&[n * batch, seq_len, hidden])?;
        let gate = if descriptors.has_gate() { Some(self.new_tensor::<f32>(&[n * batch])?) } else { None };
        let inputs = LocationInputs::<A, A> { h: self.view(OP, loc.h)?, r: self.view(OP, loc.r)?, ln_gamma: self.view(OP, ln.gamma)?, ln_beta: self.view(OP, ln.beta)?, ln_eps: ln.eps, dropout_seed };
        let mut outputs = LocationOutputs { out: self.view_mut(OP, &out)?, gate: gate.as_ref().map(|g| self.view_mut(OP, g)).transpose()? };
        adapter_location_forward_on(&self.gpu, &inputs, &descriptors, &mut outputs, shape, self.location_path()?)?;
        Ok(out)
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        self.device
    }

    fn name(&self) -> String {
        let base = match self.activations {
            DType::BF16 => format!("{} (bf16 activations)", self.gpu.describe()),
            DType::F16 => format!("{} (f16 activations)", self.gpu.describe()),
            _ => self.gpu.describe(),
        };
        let base = match self.location_path {
            Some(LocationPath::Split) => format!("{base} (split adapter locations)"),
            Some(LocationPath::Fused) => format!("{base} (fused adapter locations)"),
            None => base,
        };
        // Where the split path runs (a GPU's default), say how its adapter products round.
        let base = match (self.location_path(), self.tf32_adapter_products()) {
            (Ok(LocationPath::Split), Ok(true)) => format!("{base} (TF32 adapter products)"),
            _ => base,
        };
        // The split forward's products, where the tensor-core kernels make them.
        let base = match (self.location_path(), self.split_forward()) {
            (Ok(LocationPath::Split), Ok(SplitForward::TensorCores)) if self.activations.is_half() => format!("{base} (tensor-core adapter forward)"),
            _ => base,
        };
        // The 16-bit Linears' biases, where cuBLASLt adds them.
        let base = match self.linear_epilogue() {
            Ok(LinearEpilogue::Cublaslt) if self.activations.is_half() => format!("{base} (cuBLASLt Linear epilogues)"),
            _ => base,
        };
        match self.attention_path {
            Some(AttentionPath::Gemm) => format!("{base} (GEMM attention)"),
            Some(AttentionPath::TensorCores) => format!("{base} (tensor-core attention)"),
            Some(AttentionPath::Fused) => format!("{base} (fused attention)"),
            None => base,
        }
    }

    fn gpu(&self) -> Option<&Gpu> {
        Some(&self.gpu)
    }

    fn supports_training(&self) -> bool {
        // Every op of a step, dropout included (Philox masks equal to the CPU's; tested by
        // tests/cuda_training.rs with dropout on), the adapters' own dropout too, with f32 or
        // bf16 activations (tests/cuda_bf16_training.rs).
        true
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        check_len("upload", data.len(), shape)?;
        let t = self.new_tensor::<f32>(shape)?;
        self.gpu.copy_htod(&data, &mut self.view_mut("upload", &t)?)?;
        Ok(t)
    }

    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        const OP: &str = "to_host";
        match t.dtype() {
            DType::F32 => self.gpu.download(&self.view::<f32>(OP, t)?),
            DType::BF16 => Ok(self.gpu.download(&self.view::<bf16>(OP, t)?)?.into_iter().map(bf16::to_f32).collect()),
            DType::F16 => Ok(self.gpu.download(&self.view::<f16>(OP, t)?)?.into_iter().map(f16::to_f32).collect()),
            DType::U32 => Err(Error::Unsupported(format!("{OP}: a u32 tensor {:?}; use to_host_u32", t.shape()))),
        }
    }

    fn upload_u32(&self, data: Vec<u32>, shape: &[usize]) -> Result<Tensor> {
        check_len("upload_u32", data.len(), shape)?;
        let t = self.new_tensor::<u32>(shape)?;
        self.gpu.copy_htod(&data, &mut self.view_mut("upload_u32", &t)?)?;
        Ok(t)
    }

    fn to_host_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.gpu.download(&self.view::<u32>("to_host_u32", t)?)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty(shape, dtype)?;
        match dtype {
            DType::F32 => self.gpu.memset_zero(&mut self.view_mut::<f32>("zeros", &t)?)?,
            DType::BF16 => self.gpu.memset_zero(&mut self.view_mut::<bf16>("zeros", &t)?)?,
            DType::F16 => self.gpu.memset_zero(&mut self.view_mut::<f16>("zeros", &t)?)?,
            DType::U32 => self.gpu.memset_zero(&mut self.view_mut::<u32>("zeros", &t)?)?,
        }
        Ok(t)
    }

    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.new_tensor::<f32>(shape),
            DType::BF16 => self.new_tensor::<bf16>(shape),
            DType::F16 => self.new_tensor::<f16>(shape),
            DType::U32 => self.new_tensor::<u32>(shape),
        }
    }

    fn all_finite(&self, t: &Tensor) -> Result<bool> {
        match t.dtype() {
            // One pass on the device and a 4-byte read, not the tensor.
            DType::F32 => Ok(elementwise::count_nonfinite(&self.gpu, &self.view("all_finite", t)?)? == 0),
            // Widened exactly (NaN and ±inf stay what they are), then the same count.
            DType::BF16 | DType::F16 => self.all_finite(&self.cast(t, DType::F32)?),
            _ => Ok(self.to_host(t)?.iter().all(|v| v.is_finite())),
        }
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if x.dtype().is_half() {
            return Ok(self.linear_half_activations("linear", x, w, b, HalfEpilogue::Act { act: None, keep_pre: false })?.0);
        }
        let mut shape = x.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = w.shape().first().copied().unwrap_or(0);
        }
        let y = self.new_tensor::<f32>(&shape)?;
        self.linear_into(x, w, b, &y)?;
        Ok(y)
    }

    fn linear_dropout(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        if x.dtype().is_half() {
            // The mask in the product's epilogue pass (the same words the f32 path draws).
            return Ok(self.linear_half_activations("linear_dropout", x, w, b, HalfEpilogue::Dropout(dropout))?.0);
        }
        // The product, then the mask over its output (the CPU's epilogue draws the same words).
        let y = self.linear(x, w, b)?;
        if let Some(spec) = dropout {
            self.dropout_in_place("linear_dropout", &y, spec)?;
        }
        Ok(y)
    }

    fn linear_act(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<(Tensor, Tensor)> {
        if x.dtype().is_half() {
            // One epilogue pass writes the rounded pre-activation and the activation at it (what
            // the backward differentiates at).
            let (y, pre) = self.linear_half_activations("linear_act", x, w, b, HalfEpilogue::Act { act: Some(act), keep_pre: true })?;
            let pre = pre.ok_or_else(|| Error::internal("linear_act: the epilogue kept no pre-activation"))?;
            return Ok((y, pre));
        }
        // cuBLASLt's GELU epilogue is the tanh form, not BERT's erf: the product keeps the bias
        // epilogue and the activation is its own pass.
        let pre = self.linear(x, w, b)?;
        let y = self.activation(&pre, act)?;
        Ok((y, pre))
    }

    fn linear_act_only(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        const OP: &str = "linear_act_only";
        if x.dtype().is_half() {
            return Ok(self.linear_half_activations(OP, x, w, b, HalfEpilogue::Act { act: Some(act), keep_pre: false })?.0);
        }
        let y = self.linear(x, w, b)?;
        let cols = y.last_dim();
        elementwise::bias_act_in_place::<f32>(&self.gpu, &mut self.view_mut(OP, &y)?, None, Some(act), cols)?;
        Ok(y)
    }

    fn linear_backward_input_act(&self, dy: &Tensor, w: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "linear_backward_input_act";
        let dims = linear_dims(OP, dy, w)?;
        let mut shape = dy.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = dims.d_in;
        }
        if dy.dtype().is_half() {
            // 16-bit training: the 16-bit product with the base weight of dy's dtype, then act' over it.
            self.half_training_operands(OP, dy.dtype(), &[("the pre-activation", pre)], &[("weight", w)])?;
            let dx = self.empty(&shape, dy.dtype())?;
            self.products.count(GemmKind::InputGrad, dims.rows * dims.d_in * dims.d_out);
            by_half_dtype!(dy.dtype(), H => elementwise::linear_backward_input_act::<H>(&self.gpu, &self.view(OP, dy)?, &self.view(OP, w)?, &self.view(OP, pre)?, Some(act), dims, &mut self.view_mut(OP, &dx)?))?;
            return Ok(dx);
        }
        let dx = self.new_tensor::<f32>(&shape)?;
        let mut scratch = None;
        let w = self.f32_operand(OP, "weight", w, &mut scratch)?;
        self.products.count(GemmKind::InputGrad, dims.rows * dims.d_in * dims.d_out);
        elementwise::linear_backward_input_act(&self.gpu, &self.view(OP, dy)?, &w, &self.view(OP, pre)?, Some(act), dims, &mut self.view_mut(OP, &dx)?)?;
        Ok(dx)
    }

    fn embedding(&self, _input_ids: &Tensor, _token_type_ids: &Tensor, _word: &Tensor, _position: &Tensor, _token_type: &Tensor, _positions: crate::config::Positions) -> Result<Tensor> {
        // The device computes the embeddings only fused with their LayerNorm.
        Err(self.unsupported("embedding without its LayerNorm (use embedding_layernorm)"))
    }

    fn embedding_layernorm(&self, input_ids: &Tensor, token_type_ids: &Tensor, word: &Tensor, position: &Tensor, token_type: &Tensor, positions: crate::config::Positions, ln: LayerNormParams<'_>, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        const OP: &str = "embedding_layernorm";
        let (batch, seq_len) = match input_ids.shape() {
            [b, t] => (*b, *t),
            s => return Err(Error::shape(OP, format!("input ids must be [B, T], got {s:?}"))),
        };
        let hidden = word.last_dim();
        let group = [("the word embeddings", word), ("the position embeddings", position), ("the token type embeddings", token_type), ("LayerNorm gamma", ln.gamma), ("LayerNorm beta", ln.beta)];
        let dtype = self.base_dtype(OP, &group)?;
        if self.activations.is_half() && dtype != self.activations {
            return Err(half_needs_same_base(OP, self.activations, "the word embeddings", word));
        }
        // The activations start here, in the backend's dtype; every later op follows them.
        let y = self.empty(&[batch, seq_len, hidden], self.activations)?;
        let mut flag = new_error_flag(&self.gpu)?;
        {
            let ids = (self.view(OP, input_ids)?, self.view(OP, token_type_ids)?);
            let dims = (batch, seq_len, hidden, ln.eps, positions);
            let error_flag = flag.view_mut();
            match (dtype, self.activations) {
                (DType::BF16, DType::BF16) => {
                    let mut outputs = EmbeddingOutputs::<bf16> { y: self.view_mut(OP, &y)?, mean: None, rstd: None, error_flag };
                    embedding_layernorm_forward(&self.gpu, &self.embedding_inputs::<bf16>(ids, word, position, token_type, &ln, dims)?, &mut outputs)?
                }
                (DType::F16, DType::F16) => {
                    let mut outputs = EmbeddingOutputs::<f16> { y: self.view_mut(OP, &y)?, mean: None, rstd: None, error_flag };
                    embedding_layernorm_forward(&self.gpu, &self.embedding_inputs::<f16>(ids, word, position, token_type, &ln, dims)?, &mut outputs)?
                }
                (DType::BF16, _) => {
                    let mut outputs = EmbeddingOutputs::<f32> { y: self.view_mut(OP, &y)?, mean: None, rstd: None, error_flag };
                    embedding_layernorm_forward(&self.gpu, &self.embedding_inputs::<bf16>(ids, word, position, token_type, &ln, dims)?, &mut outputs)?
                }
                (DType::F16, _) => {
                    let mut outputs = EmbeddingOutputs::<f32> { y: self.view_mut(OP, &y)?, mean: None, rstd: None, error_flag };
                    embedding_layernorm_forward(&self.gpu, &self.embedding_inputs::<f16>(ids, word, position, token_type, &ln, dims)?, &mut outputs)?
                }
                _ => {
                    let mut outputs = EmbeddingOutputs::<f32> { y: self.view_mut(OP, &y)?, mean: None, rstd: None, error_flag };
                    embedding_layernorm_forward(&self.gpu, &self.embedding_inputs::<f32>(ids, word, position, token_type, &ln, dims)?, &mut outputs)?
                }
            }
        }
        // One 8-byte read: an out-of-range id is an error, never a row of NaN passed on. A step
        // being captured may not read back; its replays check the ids on the host instead
        // (`BertModel::replay_train_step`).
        if !self.gpu.is_capturing() {
            check_flag(&self.gpu, &flag.view())?;
        }
        if let Some(spec) = dropout {
            self.dropout_in_place(OP, &y, spec)?;
        }
        Ok(y)
    }

    fn residual_layernorm(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let rows = x.rows();
        let y = self.empty(x.shape(), activation_dtype(x))?;
        let (mean, rstd) = (self.new_tensor::<f32>(&[rows])?, self.new_tensor::<f32>(&[rows])?);
        self.ln_into(x, residual, gamma, beta, eps, &y, (&mean, &rstd))?;
        Ok(y)
    }

    fn residual_layernorm_stats(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "residual_layernorm_stats";
        let dtype = activation_dtype(x);
        let y = self.empty(x.shape(), dtype)?;
        let z = self.empty(x.shape(), dtype)?;
        let mut stats_shape = x.shape().to_vec();
        *stats_shape.last_mut().ok_or_else(|| Error::shape(OP, "a scalar input".to_string()))? = 2;
        let stats = self.new_tensor::<f32>(&stats_shape)?;
        if dtype.is_half() {
            self.half_training_operands(OP, dtype, &residual.map(|r| ("the residual", r)).into_iter().collect::<Vec<_>>(), &[("LayerNorm gamma", gamma), ("LayerNorm beta", beta)])?;
            by_half_dtype!(dtype, H => self.ln_train_typed::<H, H>(x, residual, gamma, beta, eps, [&y, &z, &stats]))?;
        } else {
            self.ln_train_typed::<f32, f32>(x, residual, gamma, beta, eps, [&y, &z, &stats])?;
        }
        Ok((y, z, stats))
    }

    fn layernorm_backward_stats(&self, dy: &Tensor, z: &Tensor, stats: &Tensor, gamma: &Tensor) -> Result<Tensor> {
        const OP: &str = "layernorm_backward_stats";
        let dz = self.empty(dy.shape(), activation_dtype(dy))?;
        if dz.dtype().is_half() {
            self.half_training_operands(OP, dz.dtype(), &[("z", z)], &[("LayerNorm gamma", gamma)])?;
            by_half_dtype!(dz.dtype(), H => {
                let inputs = LayerNormBackwardInputs::<H, H> { dy: self.view(OP, dy)?, z: self.view(OP, z)?, stats: self.view(OP, stats)?, gamma: self.view(OP, gamma)?, rows: dy.rows(), cols: dy.last_dim() };
                layernorm_backward(&self.gpu, &inputs, &mut self.view_mut(OP, &dz)?, false, None)
            })?;
        } else {
            let inputs = LayerNormBackwardInputs::<f32, f32> { dy: self.view(OP, dy)?, z: self.view(OP, z)?, stats: self.view(OP, stats)?, gamma: self.view(OP, gamma)?, rows: dy.rows(), cols: dy.last_dim() };
            layernorm_backward(&self.gpu, &inputs, &mut self.view_mut(OP, &dz)?, false, None)?;
        }
        Ok(dz)
    }

    fn residual_layernorm_dropout(&self, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, beta: &Tensor, eps: f32, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        let y = self.residual_layernorm(x, residual, gamma, beta, eps)?;
        if let Some(spec) = dropout {
            self.dropout_in_place("residual_layernorm_dropout", &y, spec)?;
        }
        Ok(y)
    }

    fn attention(&self, _q: &Tensor, _k: &Tensor, _v: &Tensor, _mask_bias: &Tensor, _heads: usize, _dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        Err(self.unsupported("attention"))
    }

    fn attention_packed(&self, qkv: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<(Tensor, Tensor)> {
        const OP: &str = "attention_packed";
        let (batch, seq, hidden) = match qkv.shape() {
            [b, t, h3] if h3 % 3 == 0 => (*b, *t, h3 / 3),
            s => return Err(Error::shape(OP, format!("packed Q, K, V must be [B, T, 3H], got {s:?}"))),
        };
        let ctx = self.empty(&[batch, seq, hidden], activation_dtype(qkv))?;
        let lse = self.new_tensor::<f32>(&[batch, heads, seq])?;
        by_activation_dtype!(ctx.dtype(), A => self.attention_typed::<A>(qkv, mask_bias, &ctx, &lse, (batch, seq, hidden, heads), dropout))?;
        Ok((ctx, lse))
    }

    fn activation(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation";
        let y = self.empty(x.shape(), activation_dtype(x))?;
        by_activation_dtype!(y.dtype(), A => elementwise::bias_act::<A>(&self.gpu, &self.view(OP, x)?, None, Some(act), x.last_dim(), &mut self.view_mut(OP, &y)?, None))?;
        Ok(y)
    }

    fn adapter_location(&self, loc: &AdapterLocation) -> Result<Tensor> {
        const OP: &str = "adapter_location";
        match loc.h.dtype() {
            DType::BF16 => return self.adapter_location_io::<bf16>(loc),
            DType::F16 => return self.adapter_location_io::<f16>(loc),
            _ => {}
        }
        let (weights, shape, dropout_seed) = self.location_parts(OP, loc)?;
        let (n, batch, seq_len, hidden) = (shape.branches, shape.batch, shape.seq_len, shape.hidden);
        let descriptors = self.location_descriptors(hidden, loc.steps, &weights)?;
        let out = self.new_tensor::<f32>(&[n * batch, seq_len, hidden])?;
        let gate = if descriptors.has_gate() { Some(self.new_tensor::<f32>(&[n * batch])?) } else { None };
        let ln = &loc.layer_norm;
        let dtype = self.base_dtype(OP, &[("LayerNorm gamma", ln.gamma), ("LayerNorm beta", ln.beta)])?;
        let (h, r) = (self.view(OP, loc.h)?, self.view(OP, loc.r)?);
        let path = self.location_path()?;
        let mut outputs = LocationOutputs { out: self.view_mut(OP, &out)?, gate: gate.as_ref().map(|g| self.view_mut(OP, g)).transpose()? };
        match dtype {
            DType::BF16 => {
                let inputs = LocationInputs::<bf16> { h, r, ln_gamma: self.view(OP, ln.gamma)?, ln_beta: self.view(OP, ln.beta)?, ln_eps: ln.eps, dropout_seed };
                adapter_location_forward_on(&self.gpu, &inputs, &descriptors, &mut outputs, shape, path)?;
            }
            DType::F16 => {
                let inputs = LocationInputs::<f16> { h, r, ln_gamma: self.view(OP, ln.gamma)?, ln_beta: self.view(OP, ln.beta)?, ln_eps: ln.eps, dropout_seed };
                adapter_location_forward_on(&self.gpu, &inputs, &descriptors, &mut outputs, shape, path)?;
            }
            _ => {
                let inputs = LocationInputs::<f32> { h, r, ln_gamma: self.view(OP, ln.gamma)?, ln_beta: self.view(OP, ln.beta)?, ln_eps: ln.eps, dropout_seed };
                adapter_location_forward_on(&self.gpu, &inputs, &descriptors, &mut outputs, shape, path)?;
            }
        }
        Ok(out)
    }

    fn nice(&self, x: &Tensor, params: &NiceParams, inverse: bool) -> Result<Tensor> {
        const OP: &str = "nice";
        let p = NiceDeviceParams {
            f0: self.view_pair(OP, params.f0)?,
            f2: self.view_pair(OP, params.f2)?,
            g0: self.view_pair(OP, params.g0)?,
            g2: self.view_pair(OP, params.g2)?,
            activation: params.activation,
        };
        let out = self.empty(x.shape(), activation_dtype(x))?;
        by_activation_dtype!(out.dtype(), A => nice_forward::<A>(&self.gpu, &self.view(OP, x)?, &p, inverse, &mut self.view_mut(OP, &out)?))?;
        Ok(out)
    }

    fn linear_backward_input_into(&self, dy: &Tensor, w: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        const OP: &str = "linear_backward_input";
        let dims = linear_dims(OP, dy, w)?;
        if out.overlaps(dy) || out.overlaps(w) {
            return Err(Error::Internal(format!("{OP}: the destination overlaps an input")));
        }
        if dy.dtype().is_half() {
            // 16-bit training: dy·W on the tensor cores, `out` (+=) rounded once.
            self.half_training_operands(OP, dy.dtype(), &[("the destination", out)], &[("weight", w)])?;
            self.products.count(GemmKind::InputGrad, dims.rows * dims.d_in * dims.d_out);
            return by_half_dtype!(dy.dtype(), H => elementwise::linear_backward_input::<H>(&self.gpu, &self.view(OP, dy)?, &self.view(OP, w)?, dims, &mut self.view_mut(OP, out)?, accumulate));
        }
        let mut scratch = None;
        let w = self.f32_operand(OP, "weight", w, &mut scratch)?;
        self.products.count(GemmKind::InputGrad, dims.rows * dims.d_in * dims.d_out);
        elementwise::linear_backward_input(&self.gpu, &self.view(OP, dy)?, &w, dims, &mut self.view_mut(OP, out)?, accumulate)
    }

    fn linear_backward_params_into(&self, dy: &Tensor, x: &Tensor, dw: &Tensor, db: Option<&Tensor>, accumulate: bool) -> Result<()> {
        const OP: &str = "linear_backward_params";
        if dy.dtype().is_half() || x.dtype().is_half() {
            // Parameter gradients are f32 (f32 master weights): a 16-bit operand (no trainable Linear
            // reads one in this model: heads widen their input, adapters have their own op) is
            // widened exactly first.
            let (dy, x) = (self.cast(dy, DType::F32)?, self.cast(x, DType::F32)?);
            return self.linear_backward_params_into(&dy, &x, dw, db, accumulate);
        }
        let dims = LinearDims { rows: dy.rows(), d_in: x.last_dim(), d_out: dy.last_dim() };
        for (name, t) in [("dw", Some(dw)), ("db", db)] {
            if t.is_some_and(|t| t.overlaps(dy) || t.overlaps(x)) {
                return Err(Error::Internal(format!("{OP}: {name} overlaps an input")));
            }
        }
        let workspace = match db {
            Some(_) => Some(self.gpu.alloc::<f32>(elementwise::bias_grad_workspace_len(dims.rows, dims.d_out))?),
            None => None,
        };
        let mut ws = workspace;
        let mut grads = LinearParamGrads { dw: self.view_mut(OP, dw)?, db: db.map(|b| self.view_mut(OP, b)).transpose()?, workspace: ws.as_mut().map(|w| w.view_mut()), accumulate };
        self.products.count(GemmKind::WeightGrad, dims.rows * dims.d_in * dims.d_out);
        elementwise::linear_backward_params(&self.gpu, &self.view(OP, dy)?, &self.view(OP, x)?, dims, &mut grads)
    }

    fn activation_backward(&self, dy: &Tensor, pre: &Tensor, act: Activation) -> Result<Tensor> {
        const OP: &str = "activation_backward";
        let dx = self.empty(dy.shape(), activation_dtype(dy))?;
        if dx.dtype().is_half() {
            self.half_training_operands(OP, dx.dtype(), &[("the pre-activation", pre)], &[])?;
            by_half_dtype!(dx.dtype(), H => elementwise::activation_backward_as::<H>(&self.gpu, &self.view(OP, dy)?, &self.view(OP, pre)?, Some(act), &mut self.view_mut(OP, &dx)?))?;
        } else {
            elementwise::activation_backward(&self.gpu, &self.view(OP, dy)?, &self.view(OP, pre)?, Some(act), &mut self.view_mut(OP, &dx)?)?;
        }
        Ok(dx)
    }

    fn layernorm_backward_input(&self, dy: &Tensor, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        // The statistics from a training forward of the same input (beta does not reach dx).
        let zero_beta = self.zeros(gamma.shape(), gamma.dtype())?;
        let (_, z, stats) = self.residual_layernorm_stats(x, residual, gamma, &zero_beta, eps)?;
        self.layernorm_backward_stats(dy, &z, &stats, gamma)
    }

    fn attention_backward(&self, _dctx: &Tensor, _q: &Tensor, _k: &Tensor, _v: &Tensor, _mask_bias: &Tensor, _heads: usize, _dropout: Option<&DropoutSpec>) -> Result<[Tensor; 3]> {
        Err(self.unsupported("attention_backward"))
    }

    fn attention_packed_backward(&self, dctx: &Tensor, qkv: &Tensor, lse: &Tensor, mask_bias: &Tensor, heads: usize, dropout: Option<&DropoutSpec>) -> Result<Tensor> {
        const OP: &str = "attention_packed_backward";
        if activation_dtype(dctx) != activation_dtype(qkv) {
            return Err(Error::Input(format!("{OP}: the gradient is {} but Q, K, V are {}; the backward takes both in one dtype", dctx.dtype(), qkv.dtype())));
        }
        let (batch, seq, hidden) = match qkv.shape() {
            [b, t, h3] if h3 % 3 == 0 => (*b, *t, h3 / 3),
            s => return Err(Error::shape(OP, format!("packed Q, K, V must be [B, T, 3H], got {s:?}"))),
        };
        let path = self.tensor_core_checked(self.attention_path(seq)?)?;
        if path.gemm_backward() {
            // The GEMM path recomputes P from the lse and needs no ctx.
            let dqkv = self.empty(qkv.shape(), activation_dtype(qkv))?;
            let d = dropout.map(|spec| self.device_dropout(OP, spec)).transpose()?;
            let (l, m) = (self.view::<f32>(OP, lse)?, self.view::<f32>(OP, mask_bias)?);
            let tensor_cores = path == AttentionPath::TensorCores;
            by_activation_dtype!(dqkv.dtype(), A => {
                let backward = if tensor_cores { attention_mma_backward::<A> } else { attention_gemm_backward::<A> };
                backward(&self.gpu, &self.view(OP, dctx)?, &self.view(OP, qkv)?, &l, &m, &mut self.view_mut(OP, &dqkv)?, batch, seq, hidden, heads, d.as_ref())
            })?;
            return Ok(dqkv);
        }
        // The fused kernels read the forward's output for D = rowsum(dO ⊙ O); the seam does not keep
        // it, so it is recomputed here (one forward's cost; keeping it on the tape is issue 15's),
        // with the same dropout: D = dO·O is over the dropped output.
        let (ctx, _) = self.attention_packed(qkv, mask_bias, heads, dropout)?;
        let dqkv = self.empty(qkv.shape(), activation_dtype(qkv))?;
        let d = dropout.map(|spec| self.device_dropout(OP, spec)).transpose()?;
        let dims = (batch, seq, hidden, heads);
        by_activation_dtype!(dqkv.dtype(), A => self.attention_backward_typed::<A>([dctx, qkv, &ctx, lse, mask_bias], &dqkv, dims, d.as_ref()))?;
        Ok(dqkv)
    }

    fn adapter_location_backward_into(&self, loc: &AdapterLocation, d_out: &Tensor, grads: &[Option<GradsOut<BottleneckGrads>>], need_input_grads: bool) -> Result<(Option<Tensor>, Option<Tensor>)> {
        const OP: &str = "adapter_location_backward";
        // The 16-bit type of the step: the output gradient's, else h's or r's (a mix is refused below).
        let Some(dtype) = [d_out, loc.h, loc.r].iter().map(|t| t.dtype()).find(|&d| d.is_half()) else {
            return self.adapter_backward_typed::<f32>(loc, d_out, grads, need_input_grads);
        };
        let ln = &loc.layer_norm;
        self.half_training_operands(OP, dtype, &[("h", loc.h), ("r", loc.r), ("the output gradient", d_out)], &[("LayerNorm gamma", ln.gamma), ("LayerNorm beta", ln.beta)])?;
        match (self.location_path()?, dtype) {
            // The split backward has `_bf16io` / `_f16io` row kernels (its products are f32 on f32
            // scratch).
            (LocationPath::Split, DType::F16) => self.adapter_backward_typed::<f16>(loc, d_out, grads, need_input_grads),
            (LocationPath::Split, _) => self.adapter_backward_typed::<bf16>(loc, d_out, grads, need_input_grads),
            // The fused kernel reads f32 only.
            (LocationPath::Fused, _) => self.adapter_location_backward_widened(dtype, loc, d_out, grads, need_input_grads),
        }
    }

    fn nice_backward_into(&self, x: &Tensor, params: &NiceParams, dy: &Tensor, out: &GradsOut<NiceGrads>) -> Result<()> {
        if x.dtype().is_half() || dy.dtype().is_half() {
            // 16-bit training: the invertible adapter runs once per step on the embeddings
            // ([B·T, H], small next to the encoder), so its backward widens x and dy exactly and
            // runs in f32; its parameter gradients are f32 either way. G is differentiated at
            // the y1 the forward's G read: the stored 16-bit one (kernels/nice.cu).
            let stored = if x.dtype().is_half() { x.dtype() } else { dy.dtype() };
            let (x, dy) = (self.cast(x, DType::F32)?, self.cast(dy, DType::F32)?);
            return self.nice_backward_f32(&x, params, &dy, out, Some(stored));
        }
        self.nice_backward_f32(x, params, dy, out, None)
    }

    fn dropout(&self, x: &Tensor, spec: &DropoutSpec) -> Result<Tensor> {
        const OP: &str = "dropout";
        let y = self.empty(x.shape(), activation_dtype(x))?;
        let d = self.device_dropout(OP, spec)?;
        by_activation_dtype!(y.dtype(), A => elementwise::dropout::<A>(&self.gpu, &self.view(OP, x)?, &mut self.view_mut(OP, &y)?, &d))?;
        Ok(y)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "add";
        if a.shape() != b.shape() {
            return Err(Error::shape(OP, format!("{:?} + {:?}", a.shape(), b.shape())));
        }
        self.same_activation_dtype(OP, ("a", a.dtype()), &[("b", b)])?;
        let y = self.empty(a.shape(), activation_dtype(a))?;
        by_activation_dtype!(y.dtype(), A => elementwise::add::<A>(&self.gpu, &self.view(OP, a)?, &self.view(OP, b)?, &mut self.view_mut(OP, &y)?))?;
        Ok(y)
    }

    fn select_rows(&self, t: &Tensor, ranges: &[std::ops::Range<usize>]) -> Result<Tensor> {
        const OP: &str = "select_rows";
        let (rows, width) = (t.shape().first().copied().unwrap_or(0), t.elem_count().checked_div(t.shape().first().copied().unwrap_or(0)).unwrap_or(0));
        let mut total = 0;
        for r in ranges {
            if r.start > r.end || r.end > rows {
                return Err(Error::shape(OP, format!("row range {}..{} is outside {rows} rows", r.start, r.end)));
            }
            total += r.len();
        }
        let mut shape = t.shape().to_vec();
        if let Some(first) = shape.first_mut() {
            *first = total;
        }
        let out = self.empty(&shape, t.dtype())?;
        let mut at = 0;
        for r in ranges {
            copy_rows(self, t, &out, r.start * width, at * width, r.len() * width)?;
            at += r.len();
        }
        Ok(out)
    }

    fn first_token_backward_into(&self, d: &Tensor, out: &Tensor, accumulate: bool) -> Result<()> {
        const OP: &str = "first_token_backward";
        let (b, t, h) = match out.shape() {
            [b, t, h] => (*b, *t, *h),
            s => return Err(Error::shape(OP, format!("destination must be [B, T, H], got {s:?}"))),
        };
        if out.overlaps(d) {
            return Err(Error::Internal(format!("{OP}: the destination overlaps the gradient")));
        }
        match (d.dtype(), out.dtype()) {
            (a, o) if a == o && a.is_half() => by_half_dtype!(a, H => elementwise::first_token_backward_as::<H>(&self.gpu, &self.view(OP, d)?, b, t, h, &mut self.view_mut(OP, out)?, accumulate)),
            (a, o) if a.is_half() || o.is_half() => Err(Error::Input(format!("{OP}: the gradient is {a} and the destination {o}; they must share a dtype"))),
            _ => elementwise::first_token_backward(&self.gpu, &self.view(OP, d)?, b, t, h, &mut self.view_mut(OP, out)?, accumulate),
        }
    }

    fn first_token(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "first_token";
        let [b, t, h] = match x.shape() {
            [b, t, h] => [*b, *t, *h],
            s => return Err(Error::shape(OP, format!("expected [B, T, H], got {s:?}"))),
        };
        let out = self.empty(&[b, h], activation_dtype(x))?;
        by_activation_dtype!(out.dtype(), A => elementwise::first_token::<A>(&self.gpu, &self.view(OP, x)?, b, t, h, &mut self.view_mut(OP, &out)?))?;
        Ok(out)
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        const OP: &str = "cast";
        let out = self.empty(t.shape(), dtype)?;
        match (t.dtype(), dtype) {
            (a, b) if a == b => copy_rows(self, t, &out, 0, 0, t.elem_count())?,
            (DType::F32, DType::BF16) => elementwise::cast_f32_to_bf16(&self.gpu, &self.view(OP, t)?, &mut self.view_mut(OP, &out)?)?,
            (DType::BF16, DType::F32) => elementwise::cast_bf16_to_f32(&self.gpu, &self.view(OP, t)?, &mut self.view_mut(OP, &out)?)?,
            (DType::F32, DType::F16) => elementwise::cast_f32_to_f16(&self.gpu, &self.view(OP, t)?, &mut self.view_mut(OP, &out)?)?,
            (DType::F16, DType::F32) => elementwise::cast_f16_to_f32(&self.gpu, &self.view(OP, t)?, &mut self.view_mut(OP, &out)?)?,
            // bf16 <-> f16 would round twice through f32 (neither holds the other): refused.
            (a, b) => return Err(self.unsupported(&format!("cast from {a} to {b}"))),
        }
        Ok(out)
    }

    fn fill(&self, t: &Tensor, value: f32) -> Result<()> {
        const OP: &str = "fill";
        match t.dtype() {
            DType::F32 => elementwise::fill_f32(&self.gpu, &mut self.view_mut(OP, t)?, value),
            DType::BF16 => elementwise::fill_bf16(&self.gpu, &mut self.view_mut(OP, t)?, value),
            DType::U32 if value >= 0.0 && value <= u32::MAX as f32 && value.fract() == 0.0 => elementwise::fill_u32(&self.gpu, &mut self.view_mut(OP, t)?, value as u32),
            DType::F16 => elementwise::fill_f16(&self.gpu, &mut self.view_mut(OP, t)?, value),
            d => Err(Error::Input(format!("{OP}: {value} cannot fill a {d} tensor on {}", self.device))),
        }
    }

    fn add_into(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        const OP: &str = "add_into";
        if dst.shape() != src.shape() {
            return Err(Error::shape(OP, format!("{:?} += {:?}", dst.shape(), src.shape())));
        }
        if dst.overlaps(src) {
            return Err(Error::Internal(format!("{OP}: the destination overlaps the source")));
        }
        // dst = dst + src elementwise: each element is read once, then written.
        match (dst.dtype(), src.dtype()) {
            (a, b) if a == b && a.is_half() => by_half_dtype!(a, H => elementwise::add::<H>(&self.gpu, &self.view(OP, dst)?, &self.view(OP, src)?, &mut self.view_mut(OP, dst)?)),
            (a, b) if a.is_half() || b.is_half() => Err(Error::Input(format!("{OP}: {a} += {b}; both must share a dtype"))),
            _ => elementwise::add::<f32>(&self.gpu, &self.view(OP, dst)?, &self.view(OP, src)?, &mut self.view_mut(OP, dst)?),
        }
    }

    fn write_u32(&self, dst: &Tensor, data: &[u32]) -> Result<()> {
        self.gpu.copy_htod(data, &mut self.view_mut("write_u32", dst)?)
    }

    fn write_f32(&self, dst: &Tensor, data: &[f32]) -> Result<()> {
        self.gpu.copy_htod(data, &mut self.view_mut("write_f32", dst)?)
    }

    fn scale_in_place(&self, t: &Tensor, factor: f32) -> Result<()> {
        super::optim::scale_in_place(&self.gpu, &mut self.view_mut("scale_in_place", t)?, factor)
    }

    fn loss(&self, op: &crate::train::loss::LossOp, dlogits: &Tensor, loss: &Tensor) -> Result<()> {
        const OP: &str = "loss";
        let (rows, classes) = op.validate(dlogits, loss)?;
        if dlogits.overlaps(op.trained) || op.other.is_some_and(|o| dlogits.overlaps(o)) {
            return Err(Error::Internal(format!("{OP}: the gradient overlaps the logits")));
        }
        let inputs = super::loss::LossInputs {
            objective: op.objective,
            trained: self.view(OP, op.trained)?,
            other: op.other.map(|o| self.view(OP, o)).transpose()?,
            labels: self.view(OP, op.labels)?,
            rows,
            classes,
        };
        super::loss::loss_forward_backward(&self.gpu, &inputs, &mut self.view_mut(OP, dlogits)?, &mut self.view_mut(OP, loss)?)
    }

    fn clip_grad_norm(&self, grads: &[Tensor], max_norm: f32, norm: &Tensor) -> Result<()> {
        const OP: &str = "clip_grad_norm";
        if norm.shape() != [1] {
            return Err(Error::shape(OP, format!("norm output {:?}, expected [1]", norm.shape())));
        }
        // The view table is uploaded per call for now (the arena's views do not change between
        // steps; caching it is issue 15's).
        let views = grads.iter().map(|g| self.view_mut::<f32>(OP, g)).collect::<Result<Vec<_>>>()?;
        let mut table = GradViews::new(&self.gpu, &views)?;
        super::optim::clip_grad_norm(&self.gpu, &mut table, max_norm, &mut self.view_mut(OP, norm)?)
    }

    fn adamw(&self, step: &crate::train::optim::AdamWLaunch) -> Result<()> {
        const OP: &str = "adamw";
        let n = step.params.elem_count();
        let mut segments = AdamWSegments::new(&self.gpu, step.segments, n, step.steps.elem_count())?;
        let mut bufs = AdamWBuffers {
            params: self.view_mut(OP, step.params)?,
            grads: self.view(OP, step.grads)?,
            exp_avg: self.view_mut(OP, step.exp_avg)?,
            exp_avg_sq: self.view_mut(OP, step.exp_avg_sq)?,
            steps: self.view_mut(OP, step.steps)?,
            lr: self.view(OP, step.lr)?,
            skip_unless_finite: step.skip_unless_finite.map(|t| self.view(OP, t)).transpose()?,
        };
        super::optim::adamw(&self.gpu, &step.config, &mut segments, &mut bufs)
    }
}

/// `out[dst..dst + n] = src[from..from + n]` in elements of the tensors' (equal) dtype.
fn copy_rows(be: &CudaBackend, src: &Tensor, out: &Tensor, from: usize, dst: usize, n: usize) -> Result<()> {
    fn typed<T: BufferElement>(be: &CudaBackend, src: &Tensor, out: &Tensor, from: usize, dst: usize, n: usize) -> Result<()> {
        const OP: &str = "copy";
        let s = src.view(from, &[n])?;
        let d = out.view(dst, &[n])?;
        be.gpu.copy_dtod(&be.view::<T>(OP, &s)?, &mut be.view_mut::<T>(OP, &d)?)
    }
    match src.dtype() {
        DType::F32 => typed::<f32>(be, src, out, from, dst, n),
        DType::BF16 => typed::<bf16>(be, src, out, from, dst, n),
        DType::F16 => typed::<f16>(be, src, out, from, dst, n),
        DType::U32 => typed::<u32>(be, src, out, from, dst, n),
    }
}

fn check_len(op: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if len != n {
        return Err(Error::shape(op, format!("{len} elements for shape {shape:?} ({n} elements)")));
    }
    Ok(())
}

/// `[rows, d_out]` gradient through a `[d_out, d_in]` weight.
fn linear_dims(op: &'static str, dy: &Tensor, w: &Tensor) -> Result<LinearDims> {
    match w.shape() {
        [o, i] if *o == dy.last_dim() => Ok(LinearDims { rows: dy.rows(), d_in: *i, d_out: *o }),
        s => Err(Error::shape(op, format!("weight {s:?} does not map the gradient's {} features", dy.last_dim()))),
    }
}

/// The activation dtype an op on `x` computes in: bf16 or f16 for a bf16 or f16 `x` (the
/// `_bf16io` / `_f16io` kernels), else f32 (another dtype is then refused by the f32 view, named).
fn activation_dtype(x: &Tensor) -> DType {
    x.dtype().half_or_f32()
}

/// The error for a frozen-base tensor `t` that is not of `dtype` given with `dtype` (bf16 or
/// f16) activations.
fn half_needs_same_base(op: &str, dtype: DType, name: &str, t: &Tensor) -> Error {
    let variant = if dtype == DType::F16 { "F16" } else { "BF16" };
    Error::Unsupported(format!(
        "{op}: {dtype} activations with {name} {:?} in {}: the {dtype} kernels read the frozen base in {dtype} (load it with LoadOptions {{ dtype: DType::{variant}, .. }})",
        t.shape(),
        t.dtype()
    ))
}
