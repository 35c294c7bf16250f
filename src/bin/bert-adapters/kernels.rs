//! `bert-adapters kernels`: compile the CUDA kernels into the on-disk kernel cache ahead of time,
//! in parallel, so that no later `train`, `run` or `predict` waits for NVRTC. Needs NVRTC, and a
//! GPU only to learn its architecture (`--arch` names it instead: a cache can be filled on a
//! login node or in an image build for the GPUs it will run on).

use clap::Args;

use bert_adapters::cuda::kernel_cache::{CubinOrigin, DiskCache, CACHE_ENV};
use bert_adapters::cuda::registry::{KernelSource, ALL_SOURCES};
use bert_adapters::cuda::runtime::{entry_key, precompile, Precompiled};
use bert_adapters::{Error, Result};

#[derive(Args)]
#[command(args_override_self = true)]
pub struct KernelsArgs {
    /// GPU architectures to compile for, e.g. sm_80 (A100), sm_90 (H100, H200); repeat or
    /// separate with commas. Default: GPU 0's.
    #[arg(long, value_name = "SM", value_delimiter = ',')]
    arch: Vec<String>,
    /// Kernel families (file stems of kernels/*.cu) to compile; default: all of them.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    family: Vec<String>,
    /// NVRTC compiles at a time (each takes one core); default: the cores this process may use.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: Option<u16>,
    /// Then remove the cache's entries for these architectures that this build does not use
    /// (left by earlier versions of the kernels or of NVRTC); every family's current entry stays.
    #[arg(long)]
    prune: bool,
}

fn sources(names: &[String]) -> Result<Vec<&'static KernelSource>> {
    if names.is_empty() {
        return Ok(ALL_SOURCES.to_vec());
    }
    names
        .iter()
        .map(|n| {
            ALL_SOURCES.iter().copied().find(|s| s.family == n.as_str()).ok_or_else(|| {
                let known: Vec<&str> = ALL_SOURCES.iter().map(|s| s.family).collect();
                Error::Input(format!("--family {n}: no such kernel family (known: {})", known.join(", ")))
            })
        })
        .collect()
}

fn device_arch() -> Result<String> {
    let ctx = bert_adapters::cuda::probe::probe_gpu(0)
        .map_err(|why| Error::Cuda(format!("no GPU to take the architecture from ({why}); name it with --arch, e.g. --arch sm_90")))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| Error::Cuda(format!("reading GPU 0's compute capability: {e:?}")))?;
    Ok(format!("sm_{major}{minor}"))
}

pub fn run(args: KernelsArgs) -> Result<()> {
    let cache = DiskCache::configured().ok_or_else(|| {
        let why = match std::env::var_os(CACHE_ENV) {
            Some(v) => format!("{CACHE_ENV}={:?} turns it off", v.to_string_lossy()),
            None => "neither XDG_CACHE_HOME nor HOME is set".to_string(),
        };
        Error::Input(format!("the kernel cache is off ({why}): there is nowhere to keep the compiled kernels; set {CACHE_ENV} to a folder"))
    })?;
    if let Some(bad) = args.arch.iter().find(|a| !bert_adapters::cuda::runtime::is_real_arch(a)) {
        return Err(Error::Input(format!("--arch `{bad}` is not a GPU architecture (expected e.g. sm_80, sm_90, sm_90a)")));
    }
    let sources = sources(&args.family)?;
    let archs = if args.arch.is_empty() { vec![device_arch()?] } else { args.arch.clone() };
    let jobs = args.jobs.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), usize::from);
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for arch in &archs {
        let (mut compiled, mut cached) = (0, 0);
        // Each family is reported as it finishes; failures are gathered for the closing error.
        let progress = |source: &KernelSource, result: &Result<Precompiled>| match result {
            Ok(done) if done.origin == CubinOrigin::Compiled => {
                say!("{arch} {}: compiled in {:.1} s", done.family, done.seconds);
            }
            Ok(done) => {
                say!("{arch} {}: already in the cache", done.family);
            }
            Err(e) => {
                warn!("{arch} {}: {e}", source.family);
            }
        };
        for (source, result) in sources.iter().zip(precompile(cache, &sources, arch, jobs, progress)?) {
            match result {
                Ok(done) if done.origin == CubinOrigin::Compiled => compiled += 1,
                Ok(_) => cached += 1,
                Err(_) => failures.push(format!("{arch} {}", source.family)),
            }
        }
        say!("{arch}: {compiled} compiled, {cached} already cached, in {}", cache.dir().display());
        if args.prune && failures.is_empty() {
            let keep = ALL_SOURCES.iter().map(|s| entry_key(s.file, s.code, arch, &[]).map(|k| k.file_name)).collect::<Result<Vec<_>>>()?;
            let (removed, bytes) = cache.prune(&[arch.as_str()], &keep)?;
            say!("{arch}: removed {removed} stale entr{} ({:.1} MB)", if removed == 1 { "y" } else { "ies" }, bytes as f64 / 1e6);
        }
    }
    say!("{:.1} s with {jobs} compile{} at a time", start.elapsed().as_secs_f64(), if jobs == 1 { "" } else { "s" });
    match failures.len() {
        0 => Ok(()),
        // One line: each family's error (an NVRTC log can be many lines) went out as it failed.
        n => Err(Error::Cuda(format!("{n} compile{} failed ({}); the errors are above", if n == 1 { "" } else { "s" }, failures.join(", ")))),
    }
}
