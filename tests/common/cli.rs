//! Running the `bert-adapters` binary from a test, and what its contract says an outcome is.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bert-adapters"))
}

/// stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Exit 0; its stdout.
#[track_caller]
pub fn ok(o: Output) -> String {
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", o.status.code());
    stdout
}

/// Exit 1 with exactly one line on stderr, holding every one of `says`; that line.
#[track_caller]
pub fn fails(o: Output, says: &[&str]) -> String {
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one error line expected:\n{stderr}");
    for s in says {
        assert!(stderr.contains(s), "`{s}` not in: {stderr}");
    }
    stderr
}

/// Run `cmd` with its address space limited to `bytes`: an allocation past it fails in the child.
pub fn limited(cmd: &mut Command, bytes: u64) -> Output {
    // SAFETY: only async-signal-safe work (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}
