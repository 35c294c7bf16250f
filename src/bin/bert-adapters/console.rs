//! Everything the command prints goes through here, because a user can close either stream
//! (`| head -1`, a terminal that went away): `println!` would then panic and lose a training
//! run. A write that fails marks its stream closed and later writes are skipped; the work goes
//! on (a run keeps training and checkpointing) and a closed stdout is a quiet exit, not an error.

use std::fmt::Arguments;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);

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

/// A line on stdout; `false` once stdout is closed.
pub fn out(args: Arguments) -> bool {
    write_line(&STDOUT_CLOSED, std::io::stdout().lock(), args)
}

/// A line on stderr; `false` once stderr is closed.
pub fn err(args: Arguments) -> bool {
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
