//! The `--out` folder of `train`: what a run writes there, and the rules that keep everything
//! else safe. A fresh run refuses a folder that holds a previous run unless `--overwrite` (or
//! `--resume`) is given; a folder of ours that holds a file we did not write, or a file at one of
//! our names that does not start as ours does (a CSV header, the plot's mark), is refused before
//! any step runs, and nothing but our own files is ever removed. Leftovers of a killed run
//! (hidden `.NAME.tmp-…`, `.partial-…`, `.old-…` of dead processes) are cleaned first, and a
//! checkpoint a crash left as `.checkpoint.old-…` is put back.

use std::path::{Path, PathBuf};

use bert_adapters::io::atomic::{check_ours, clean_leftovers, remove_ours, Tree};
use bert_adapters::{Error, Result};

use crate::checkpoint::{self, ADAPTER_TREE, BEST_TREE, CHECKPOINT_TREE};
use crate::{metrics, plot};
use crate::train::{SCORENN, TASKNN};

pub const METRICS: &str = "metrics.csv";
pub const PLOT: &str = "training.svg";
pub const PREDICTIONS: &str = "test_predictions.csv";
/// The first line of `test_predictions.csv`.
pub const PREDICTIONS_HEADER: &str = "text,label,predicted";

/// Files a run writes directly into `--out`.
const FILES: [&str; 3] = [METRICS, PLOT, PREDICTIONS];

/// `--keep-best`'s folder: the best validation's adapters.
pub const BEST: &str = "best";

/// Folders a run writes into `--out`, with what each may hold.
fn folders() -> [(&'static str, &'static Tree); 4] {
    [(SCORENN, &ADAPTER_TREE), (TASKNN, &ADAPTER_TREE), (checkpoint::DIR, &CHECKPOINT_TREE), (BEST, &BEST_TREE)]
}

/// How a run treats what it finds in `--out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Fresh,
    Overwrite,
    Resume,
}

/// What `prepare` found, and the run's hold on `--out`: an exclusive lock on the folder, so a
/// second run into the same folder is refused rather than interleaving its files with this
/// one's. Dropped, it lets go, and removes the folder if `prepare` created it and the run
/// wrote nothing there (a run that failed early leaves no empty folder behind).
pub struct Prepared {
    /// Leftovers cleaned or restored, for a log line each.
    pub cleaned: Vec<String>,
    /// Outputs of a previous run, by name.
    pub previous: Vec<String>,
    out: PathBuf,
    created: bool,
    _lock: std::fs::File,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.created {
            // Fails, harmlessly, unless the folder is empty.
            let _ = std::fs::remove_dir(&self.out);
        }
    }
}

/// Lock `out` (a folder) for this process: `flock` on the folder itself, so no file of ours
/// appears in it; released when the process ends, however it ends.
fn lock_folder(out: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => refuse(out, "another bert-adapters train is writing into this folder; wait for it to end, or choose another --out".into()),
            _ => Error::Io { path: out.to_path_buf(), source: e },
        });
    }
    Ok(dir)
}

fn refuse(path: &Path, msg: String) -> Error {
    Error::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, msg) }
}

/// Check `out` before anything runs: clean leftovers, refuse foreign content in our folders, and
/// refuse a fresh run over a previous one; lock the folder (created if missing) for this run.
/// Changes nothing but leftovers of dead processes.
pub fn prepare(out: &Path, start: Start) -> Result<Prepared> {
    let created = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| Error::Io { path: parent.to_path_buf(), source: e })?;
            }
            // Created here only if this process made it: two runs started together must not
            // both think so (the loser would remove the winner's folder).
            match std::fs::create_dir(out) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(Error::Io { path: out.to_path_buf(), source: e }),
            }
        }
        _ if !out.is_dir() => return Err(refuse(out, "exists and is not a folder".into())),
        _ => false,
    };
    let lock = lock_folder(out)?;
    let mut prepared = Prepared { cleaned: Vec::new(), previous: Vec::new(), out: out.to_path_buf(), created, _lock: lock };
    if created {
        return Ok(prepared);
    }
    let cleaned = clean_leftovers(out, &FILES, &folders())?;
    let mut previous = Vec::new();
    for (name, tree) in folders() {
        let dir = out.join(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            check_ours(&dir, tree)?;
            previous.push(format!("{name}/"));
        }
    }
    for name in FILES {
        let path = out.join(name);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.is_file() || !written_by_us(name, &path) {
                return Err(refuse(&path, "was not written by bert-adapters; it is never replaced or removed, so move it away first".into()));
            }
            previous.push(name.to_string());
        }
    }
    if start == Start::Fresh && !previous.is_empty() {
        return Err(refuse(
            out,
            format!("holds a previous run ({}); --resume continues it, --overwrite replaces it (only files bert-adapters wrote), or choose another --out", previous.join(", ")),
        ));
    }
    prepared.cleaned = cleaned;
    prepared.previous = previous;
    Ok(prepared)
}

/// Whether the file `name` at `path` starts as we write it (a CSV header, the plot's mark): a
/// file of the same name that someone else wrote is never replaced or removed.
fn written_by_us(name: &str, path: &Path) -> bool {
    let mut head = Vec::with_capacity(512);
    let read = std::fs::File::open(path).and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 512), &mut head));
    if read.is_err() {
        return false;
    }
    let head = String::from_utf8_lossy(&head);
    match name {
        METRICS => head.starts_with(metrics::HEADER),
        PREDICTIONS => head.starts_with(PREDICTIONS_HEADER),
        PLOT => head.contains(plot::MARK),
        _ => false,
    }
}

/// `--overwrite`: remove the previous run's outputs (only what bert-adapters wrote, checked by
/// `prepare`), so the new run never leaves a mix of both behind.
pub fn clear_previous(out: &Path) -> Result<()> {
    for (name, tree) in folders() {
        let dir = out.join(name);
        if dir.exists() {
            remove_ours(&dir, tree)?;
        }
    }
    for name in FILES {
        let path: PathBuf = out.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
        }
    }
    Ok(())
}
