//! CUDA backend: NVRTC-compiled kernels (see kernels/), cuBLAS for dense products.
//!
//! - [`registry`]: every `kernels/*.cu` embedded in the binary, with typed kernel names;
//! - [`probe`]: "is there NVRTC / a GPU?" without panicking, and the test skip helpers;
//! - [`runtime`]: context + stream + NVRTC compile cache, and the GPU-less ptxas report;
//!   [`kernel_cache`]: the compiled images kept on disk, so a machine compiles each family once;
//! - [`gpu`]: the device-runtime layer launchers are written over ([`Gpu`]: a real GPU through
//!   cudarc, or the `cuda-sim` CPU executor), with typed, signature-checked kernel arguments;
//! - one launcher module per kernel family: [`layernorm`]; [`adapter`]: one adapter location for
//!   all Parallel branches in one launch, from per-branch descriptors; [`attention`]: the fused attention
//!   forward over packed Q, K, V, writing the context and each row's log-sum-exp; [`embedding`]:
//!   gather + sum + LayerNorm with a device-side id check; [`elementwise`]: bias + activation,
//!   add, fill, casts, first-token gather; [`loss`]: the training objectives and their
//!   gradient; [`nice`]: the invertible adapter's coupling, forward and inverse, its Linears on
//!   [`gemm`]; [`optim`]: the gradient norm, clipping and AdamW over a flat arena, from tables
//!   uploaded once; [`mma`]: the on-device check of the tensor cores' fragment layout;
//! - [`backend`]: the model's `Backend` on a [`Gpu`] (the forward, op by op as kernels land);
//! - [`pool`]: the device memory pool under `Gpu::alloc` (a repeated step allocates nothing);
//!   [`graph`]: captured launch sequences (a CUDA graph, a recorded list on cuda-sim);
//! - [`gemm`]: dense products, one cuBLASLt-semantics description run by cuBLASLt or on the CPU;
//! - `sim` (feature `cuda-sim`): the same kernels executed on the CPU under strict CUDA rules.
//!
//! Nothing here needs CUDA at build time: cudarc loads libcuda/libnvrtc on first use, and every
//! entry point checks that they can be loaded before touching them.

pub mod adapter;
pub mod attention;
pub mod attention_gemm;
pub mod backend;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod gpu;
pub mod graph;
pub mod kernel_cache;
pub mod layernorm;
pub mod loss;
pub mod mma;
pub mod nice;
pub mod optim;
pub mod pool;
pub mod probe;
pub mod registry;
pub mod runtime;
#[cfg(feature = "cuda-sim")]
pub mod sim;

pub use gpu::{ActivationScalar, BaseScalar, DeviceBuffer, DeviceTable, DeviceView, DeviceViewMut, Gpu, GpuKind, KernelArg};
pub use runtime::{compile_with_report, CompileReport, CudaRuntime, KernelResources};
