//! Everything the command prints goes through here, because a user can close either stream
//! (`| head -1`, a terminal that went away): `println!` would then panic and lose a training
//! run. A write that fails marks its stream closed and later writes are skipped; the work goes
//! on (a run keeps training and checkpointing) and a closed stdout is a quiet exit, not an error.

use std::fmt::Arguments;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);
/// Set on the ranks of a multi-process `train` other than rank 0: only rank 0 prints.
static SILENT: AtomicBool = AtomicBool::new(false);

/// From now on `say!` and `warn!` print nothing (a rank other than 0); `err_always` still does.
pub fn silence() {
    SILENT.store(true, Ordering::Relaxed);
}

fn write_line(closed: &AtomicBool, mut w: impl Write, args: Arguments) -> bool {
    if closed.load(Ordering::Relaxed) {
        return false;
    }
    let ok = w.write_fmt(args).and_then(|()| w.write_all(b"\n")).and_then(|()| w.flush()).is_ok();
    if !ok {
        closed.store(true, Ordering::Relaxed);
    }
    ok
}

pub fn silenced() -> bool {
    SILENT.load(Ordering::Relaxed)
}

/// A line on stdout; `false` once stdout is closed (or when silenced).
pub fn out(args: Arguments) -> bool {
    !SILENT.load(Ordering::Relaxed) && write_line(&STDOUT_CLOSED, std::io::stdout().lock(), args)
}

/// A line on stderr; `false` once stderr is closed (or when silenced).
pub fn err(args: Arguments) -> bool {
    !SILENT.load(Ordering::Relaxed) && err_always(args)
}

/// A line on stderr even when silenced: a rank's fatal error.
pub fn err_always(args: Arguments) -> bool {
    write_line(&STDERR_CLOSED, std::io::stderr().lock(), args)
}

/// `println!` that never panics.
macro_rules! say {
    ($($t:tt)*) => { $crate::console::out(format_args!($($t)*)) };
}

/// `eprintln!` that never panics.
macro_rules! warn {
    ($($t:tt)*) => { $crate::console::err(format_args!($($t)*)) };
}
