//! The `bert-adapters` command. The only place in the project that prints or exits.

#[macro_use]
mod console;
mod checkpoint;
mod convert;
mod flags;
mod infer;
mod kernels;
mod limits;
mod metrics;
mod outdir;
mod plot;
mod predict;
mod ranks;
mod run;
mod step;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bert-adapters", version, about = "Bottleneck adapters on a frozen BERT (AdapterHub semantics), CPU and CUDA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run BERT on a batch and write its outputs (and, later, adapter gradients) to a safetensors file.
    Run(run::RunArgs),
    /// Adapter folders: `adapter convert IN_DIR OUT_DIR [--model DIR] [--name NEW]`.
    Adapter(convert::AdapterArgs),
    /// Train scorenn and tasknn in alternation on labelled text; write metrics, a plot, the adapters and a checkpoint.
    Train(train::TrainFlags),
    /// Print one label per input line with an adapter and its head.
    Predict(predict::PredictArgs),
    /// Compile the CUDA kernels into the on-disk kernel cache now, in parallel, so later runs start at once.
    Kernels(kernels::KernelsArgs),
}

fn main() -> ExitCode {
    // Past a file-size limit (`ulimit -f`) the kernel would kill the process with SIGXFSZ, silently
    // and mid-write; ignored, the write fails with EFBIG and the command says which file.
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Adapter(args) => convert::run(args),
        Command::Train(args) => train::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Kernels(args) => kernels::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            warn!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
