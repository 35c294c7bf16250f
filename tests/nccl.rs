//! The NCCL communicator on one GPU (feature `nccl`, issue 18): rank 0 of 1, bootstrapped over
//! the single-process communicator, so its collectives must leave buffers as they are, through
//! the GPU and back. Without a GPU or libnccl it is a counted skip; REQUIRE_GPU=1 makes that a
//! failure (the device check). Multi-GPU runs need a machine with several GPUs.
//!
//! The gradient arena's path: a communicator built on the CUDA backend's stream
//! (`NcclComm::on_gpu`) reduces a tensor of that backend where it lies, a view at its offset
//! (`cuda_f32_device_ptr`: the base address plus 4 bytes per element), leaving the elements
//! around it alone, with the host values that travel with it reduced too.

#![cfg(feature = "nccl")]

use bert_adapters::cuda::backend::{cuda_f32_device_ptr, CudaBackend};
use bert_adapters::dist::nccl::NcclComm;
use bert_adapters::dist::Communicator;
use bert_adapters::{Backend, Device, SingleProcess};

#[test]
fn one_rank_over_nccl_keeps_its_buffers() {
    let comm = match NcclComm::new(0, &SingleProcess) {
        Ok(c) => c,
        Err(e) => {
            assert!(std::env::var_os("REQUIRE_GPU").is_none(), "REQUIRE_GPU set but NCCL cannot start: {e}");
            bert_adapters::cuda::probe::report_skip("nccl", "no GPU", &e.to_string());
            return;
        }
    };
    assert_eq!((comm.rank(), comm.size()), (0, 1));
    let want: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
    let mut buf = want.clone();
    comm.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, want);
    comm.all_reduce_mean(&mut buf).unwrap();
    assert_eq!(buf, want);
    comm.broadcast(&mut buf, 0).unwrap();
    assert_eq!(buf, want);
    assert!(comm.broadcast(&mut buf, 1).is_err());
    comm.barrier().unwrap();
}

#[test]
fn a_cuda_tensor_is_reduced_where_it_lies() {
    if let Err(e) = bert_adapters::cuda::probe::probe_gpu(0) {
        assert!(std::env::var_os("REQUIRE_GPU").is_none(), "REQUIRE_GPU set but there is no GPU: {e}");
        bert_adapters::cuda::probe::report_skip("nccl", "no GPU", &e);
        return;
    }
    let be = CudaBackend::open(Device::Cuda(0)).unwrap();
    let comm = match NcclComm::on_gpu(be.gpu(), &SingleProcess) {
        Ok(c) => c,
        Err(e) => {
            assert!(std::env::var_os("REQUIRE_GPU").is_none(), "REQUIRE_GPU set but NCCL cannot start: {e}");
            bert_adapters::cuda::probe::report_skip("nccl", "no libnccl", &e.to_string());
            return;
        }
    };
    let want: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
    let whole = be.upload(want.clone(), &[1000]).unwrap();
    let view = whole.view(37, &[500]).unwrap();
    let (base, n) = cuda_f32_device_ptr(&whole).expect("an f32 tensor on a GPU has a device address");
    let (at, len) = cuda_f32_device_ptr(&view).expect("so has a view of it");
    assert_eq!((n, len, at), (1000, 500, base + 37 * 4));
    let mut extra = [2.5f32, -1.0];
    comm.all_reduce_sum_tensor(&be, &view, &mut extra).unwrap();
    assert_eq!(be.to_host(&whole).unwrap(), want, "one rank's sum is its own values, around the view too");
    assert_eq!(extra, [2.5, -1.0]);
    // Not f32, or not on a GPU: no device address (the host path takes those).
    assert!(cuda_f32_device_ptr(&bert_adapters::Tensor::from_vec(want.clone(), &[1000]).unwrap()).is_none());
}
