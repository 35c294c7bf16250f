//! The NCCL communicator on one GPU (feature `nccl`, issue 18): rank 0 of 1, bootstrapped over
//! the single-process communicator, so its collectives must leave buffers as they are, through
//! the GPU and back. Without a GPU or libnccl it is a counted skip; REQUIRE_GPU=1 makes that a
//! failure (the device check). Multi-GPU runs need a machine with several GPUs.

#![cfg(feature = "nccl")]

use bert_adapters::dist::nccl::NcclComm;
use bert_adapters::dist::Communicator;
use bert_adapters::SingleProcess;

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
