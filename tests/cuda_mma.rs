//! The tensor cores' fragment layout (`cuda::mma::check_tensor_core_layout`, kernels/mma.cu): on
//! cuda-sim it checks the executor's `mma.sync`; on a GPU, the layout that kernels/common.cuh
//! writes out from the PTX ISA against the hardware, in isolation from the kernels that use it
//! (tests/cuda_bf16_adapter.rs's tensor-core forward). And a backend asking for the tensor-core
//! forward runs the check before its first location.

use bert_adapters::cuda::adapter::{LocationPath, SplitForward};
use bert_adapters::cuda::backend::CudaBackend;
use bert_adapters::cuda::mma::check_tensor_core_layout;
use bert_adapters::cuda::Gpu;

fn layout(gpu: &Gpu) {
    check_tensor_core_layout(gpu).unwrap_or_else(|e| panic!("{}: {e}", gpu.describe()));
    // The check launches the kernel once per type.
    let before = gpu.launch_counts();
    check_tensor_core_layout(gpu).unwrap();
    assert_eq!(gpu.launch_counts().since(&before).of("mma_layout_check"), 2);
}
bert_adapters::test_device!(tensor_core_fragments_are_laid_out_as_the_kernels_assume, layout);

/// The backend checks once, on its first 16-bit location with the tensor-core forward, and not
/// for the GEMM forward.
fn backend_checks(gpu: &Gpu) {
    use bert_adapters::{Backend, BertModel, DType, InputBatch, LoadOptions};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_bert");
    for (forward, checks) in [(SplitForward::Gemm, 0), (SplitForward::TensorCores, 2)] {
        let be = std::sync::Arc::new(CudaBackend::on(gpu.reopen().unwrap()).with_location_path(LocationPath::Split).with_split_forward(forward).with_activations(DType::BF16).unwrap());
        let (mut model, _) = BertModel::from_dir(&dir, be.clone() as std::sync::Arc<dyn Backend>, LoadOptions { dtype: DType::BF16, ..LoadOptions::default() }).unwrap();
        let batch = InputBatch::from_file(dir.join("inputs.safetensors"), model.config()).unwrap();
        model.load_adapter(dir.parent().unwrap().join("adapters/pfeiffer")).unwrap();
        model.set_active_adapters(Some(bert_adapters::AdapterSetup::Single("pfeiffer".into()))).unwrap();
        let before = be.gpu().launch_counts();
        model.forward(&batch).unwrap();
        model.forward(&batch).unwrap();
        assert_eq!(be.gpu().launch_counts().since(&before).of("mma_layout_check"), checks, "{forward:?}");
    }
}
bert_adapters::test_device!(the_tensor_core_forward_checks_the_layout_first, backend_checks);
