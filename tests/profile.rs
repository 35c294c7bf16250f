//! `ProfiledBackend` passes every op through unchanged and counts each call.

mod common;

use std::sync::Arc;

use bert_adapters::profile::ProfiledBackend;
use bert_adapters::{Backend, CpuBackend};

use common::tiny;

#[test]
fn profiled_forward_is_bit_identical_and_counts_every_op() {
    let (plain, batch) = tiny(Arc::new(CpuBackend::fast()));
    let profiled = Arc::new(ProfiledBackend::new(Arc::new(CpuBackend::fast())));
    let (timed, _) = tiny(profiled.clone() as Arc<dyn Backend>);
    let layers = plain.config().num_hidden_layers;
    assert!(layers >= 2);
    profiled.reset(); // loading uploads weights through the backend
    let (want, got) = (plain.forward(&batch).unwrap(), timed.forward(&batch).unwrap());
    let (w, g) = (want.last_hidden_state.into_cpu_vec().unwrap(), got.last_hidden_state.into_cpu_vec().unwrap());
    assert_eq!(w.len(), g.len());
    assert!(w.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits()), "profiling changed the output");

    let times = profiled.times();
    let calls = |op: &str| times.iter().find(|(o, _)| *o == op).map(|(_, t)| t.calls).unwrap_or(0);
    // One packed QKV product and one attention per layer; one embeddings block (gather + LayerNorm).
    assert_eq!(calls("attention_packed"), layers as u64);
    assert_eq!(calls("embedding_layernorm"), 1);
    // Sorted by total time, most expensive first.
    assert!(times.windows(2).all(|p| p[0].1.total >= p[1].1.total));
    let report = profiled.report();
    assert!(report.contains("| attention_packed |"), "{report}");
    profiled.reset();
    assert!(profiled.times().is_empty());
}

/// Over a CUDA backend every op is also timed on the device: two events on the backend's stream
/// per call, read when the table is asked for, with the kernels and products the call launched.
/// The profiled training step equals an unprofiled one bit for bit; a step captured through the
/// profiled backend (its `gpu()` is the inner backend's) replays, and nothing is timed on the
/// device during the capture.
#[test]
fn a_cuda_backend_is_timed_on_its_stream() {
    use bert_adapters::model::step::TrainStepConfig;
    use bert_adapters::train::loss::Objective;
    use bert_adapters::train::{AdamW, AdamWConfig};
    for dev in common::cuda_backends() {
        let label = dev.name();
        let gpu = dev.gpu().expect("a CUDA backend has a Gpu");
        let profiled = Arc::new(ProfiledBackend::new(dev.clone()));
        assert!(std::ptr::eq(profiled.gpu().expect("the inner Gpu"), gpu), "{label}: gpu() is forwarded");
        let (mut plain, batch, labels) = common::parallel_pair(dev.clone(), [0.1, 0.0]);
        let (mut timed, _, _) = common::parallel_pair(profiled.clone() as Arc<dyn Backend>, [0.1, 0.0]);
        let cfg = TrainStepConfig { objective: Objective::TaskEnergy { lambda: 0.1 }, trained: "tasknn".into(), max_grad_norm: Some(1.0) };
        let (mut opt_p, mut opt_t) = (AdamW::new(AdamWConfig::default()).unwrap(), AdamW::new(AdamWConfig::default()).unwrap());
        for m in [&mut plain, &mut timed] {
            m.train_adapter(&["tasknn"]).unwrap();
            m.set_dropout(Some(3));
        }
        profiled.reset();
        let before = gpu.launch_counts();
        let want = plain.train_step(&batch, &labels, &cfg, &mut opt_p).unwrap().read(dev.as_ref()).unwrap();
        let plain_launches = gpu.launch_counts().since(&before);
        let before = gpu.launch_counts();
        let got = timed.train_step(&batch, &labels, &cfg, &mut opt_t).unwrap().read(dev.as_ref()).unwrap();
        let timed_launches = gpu.launch_counts().since(&before);
        assert_eq!(want, got, "{label}: profiling changed the step");
        // The same launches (the profiler adds events, not kernels), and every one of them is
        // attributed to exactly one op.
        assert_eq!(plain_launches, timed_launches, "{label}");
        let times = profiled.times();
        assert!(!times.is_empty());
        let kernels: u64 = times.iter().map(|(_, t)| t.kernel_launches).sum();
        assert_eq!(kernels, plain_launches.kernels.values().sum::<u64>(), "{label}: kernels attributed to ops");
        assert_eq!(times.iter().map(|(_, t)| t.gemm_calls).sum::<u64>(), plain_launches.gemm_calls, "{label}");
        assert_eq!(times.iter().map(|(_, t)| t.gemm_macs).sum::<u64>(), plain_launches.gemm_macs, "{label}");
        let per_op = profiled.kernels();
        for (op, t) in &times {
            assert_eq!(t.device_calls, t.calls, "{label}: {op} timed on the device at every call");
            let listed: u64 = per_op.get(op).map(|k| k.values().sum()).unwrap_or(0);
            assert_eq!(listed, t.kernel_launches, "{label}: {op}'s kernel list");
        }
        // Attention ran one launch or more per layer and branch, and its kernels are named.
        let attention = times.iter().find(|(o, _)| *o == "attention_packed").expect("attention timed").1;
        assert!(attention.kernel_launches >= attention.calls, "{label}: {attention:?}");
        assert!(per_op["attention_packed"].keys().all(|k| k.starts_with("attention")), "{label}: {:?}", per_op["attention_packed"]);
        // The ops' intervals are disjoint stretches of the device's span.
        let device: std::time::Duration = times.iter().map(|(_, t)| t.device).sum();
        let span = profiled.device_span().expect("a device span");
        assert!(!device.is_zero() && device <= span, "{label}: ops {device:?}, span {span:?}");
        let report = profiled.report();
        assert!(report.contains("GPU share") && report.contains("GPU span of the timed window"), "{report}");
        assert!(profiled.kernel_report().contains("- attention_packed ("), "{}", profiled.kernel_report());
        assert!(profiled.device_failure().is_none());

        // A capture through the profiled backend: its ops are host-timed only, and its replay
        // gives the launched step's bits.
        timed.train_step(&batch, &labels, &cfg, &mut opt_t).unwrap();
        plain.train_step(&batch, &labels, &cfg, &mut opt_p).unwrap();
        profiled.reset();
        let graph = timed.capture_train_step(&batch, &labels, &cfg, &mut opt_t).unwrap();
        let times = profiled.times();
        // (The step's per-step values are written before the capture begins: those are timed.)
        let captured = times.iter().find(|(o, _)| *o == "attention_packed").expect("attention captured").1;
        assert!(captured.calls > 0 && captured.device_calls == 0, "{label}: {captured:?}");
        assert!(times.iter().all(|(_, t)| t.device_calls == 0 || t.kernel_launches + t.gemm_calls == 0), "{label}: {times:?}");
        let want = plain.train_step(&batch, &labels, &cfg, &mut opt_p).unwrap().read(dev.as_ref()).unwrap();
        timed.replay_train_step(&graph, &batch, &labels, &mut opt_t).unwrap();
        assert_eq!(graph.output().read(dev.as_ref()).unwrap(), want, "{label}: the replay");
    }
}

/// tools/ncu_summary.py (the device check's `NCU=1` table) on a hand-written sample of
/// `ncu --csv` output: the bench's own lines and ncu's `==PROF==` lines skipped, the units
/// (µs, ns with a thousands separator, ms) converted, launches of one kernel summed.
#[test]
fn ncu_summary_sums_kernel_time_by_name() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&std::path::Path]| std::process::Command::new("python3").arg(root.join("tools/ncu_summary.py")).args(args).output();
    let out = match run(&[&common::committed_fixture("ncu/step.csv")]) {
        Ok(o) => o,
        Err(e) => {
            println!("SKIPPED: python3 is not runnable here ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // 12.5 µs + 11,500 ns = 24.0 µs of 29.25 µs in all (82.1 %); 2 µs of adamw (0.002 ms).
    assert!(text.starts_with("4 kernel launches, 29.2 µs of kernel time"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| `")).collect();
    assert_eq!(rows, ["| `attention_gemm_softmax_bf16io` | 2 | 24.0 | 82.1 % | 12.00 |", "| `nvjet_tst_128x64_64x8_1x1_v_bz_TNT` | 1 | 3.2 | 11.1 % | 3.25 |", "| `adamw_f32` | 1 | 2.0 | 6.8 % | 2.00 |"]);
    // Input with no CSV block is an error naming the file.
    let bad = std::env::temp_dir().join(format!("ncu-empty-{}.csv", std::process::id()));
    std::fs::write(&bad, "==PROF== nothing profiled\n").unwrap();
    let out = run(&[&bad]).unwrap();
    std::fs::remove_file(&bad).ok();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ncu CSV header"), "{}", String::from_utf8_lossy(&out.stderr));
}
