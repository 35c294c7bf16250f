//! Files and folders written so that a failure never destroys what was there, and nothing is
//! ever removed that this crate did not write.
//!
//! - [`StagedFile`] / [`write_atomic`]: the one atomic-write routine. A file is written under a
//!   hidden, unpredictable sibling name (`.NAME.tmp-PID-RANDOM`) opened with `create_new`, so a
//!   link planted at the temporary name is never followed; it is fsynced, then renamed over
//!   `NAME`. Dropped without `commit`, it removes its own temporary.
//! - [`replace_dir`]: a folder filled beside its destination (`.NAME.partial-…`) and swapped in
//!   with two renames (the old one to `.NAME.old-…`); if the second rename fails the old folder is
//!   put back. The old folder is then removed entry by entry, and only entries its [`Tree`] says
//!   we write: a folder holding anything else is refused before anything moves.
//! - [`clean_leftovers`]: hidden `.old-` / `.partial-` / `.tmp-` siblings that a killed process
//!   left. Only names of exactly our form, whose process is no longer alive, are touched; a
//!   leftover `.NAME.old-…` whose `NAME` is missing is renamed back (it is the last complete one).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a folder of ours may hold: the files and sub-folders we write into it.
#[derive(Debug)]
pub struct Tree {
    pub files: &'static [&'static str],
    pub dirs: &'static [(&'static str, &'static Tree)],
}

/// The three kinds of hidden sibling we create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tmp,
    Partial,
    Old,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Tmp, Kind::Partial, Kind::Old];

    fn tag(self) -> &'static str {
        match self {
            Kind::Tmp => "tmp",
            Kind::Partial => "partial",
            Kind::Old => "old",
        }
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn name_of(path: &Path) -> Result<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| Error::malformed(path, "not a file or folder name"))
}

/// `.NAME.KIND-PID-RANDOM` beside `dest`: hidden, ours by its form, and not guessable.
fn sibling(dest: &Path, kind: Kind) -> Result<PathBuf> {
    let name = name_of(dest)?;
    let random: u64 = rand::random();
    Ok(parent_of(dest).join(format!(".{name}.{}-{}-{random:016x}", kind.tag(), std::process::id())))
}

/// If `entry` is one of our hidden siblings of `name`, its kind and the pid that made it.
fn parse_sibling(entry: &str, name: &str) -> Option<(Kind, u32)> {
    let rest = entry.strip_prefix('.')?.strip_prefix(name)?.strip_prefix('.')?;
    Kind::ALL.into_iter().find_map(|kind| {
        let tail = rest.strip_prefix(kind.tag())?.strip_prefix('-')?;
        let (pid, random) = tail.split_once('-')?;
        let pid: u32 = pid.parse().ok()?;
        (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit())).then_some((kind, pid))
    })
}

/// Whether process `pid` exists (any owner). Where that cannot be told, assume it does, so a
/// leftover of a live process is never touched.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

fn sync_dir(dir: &Path) {
    // Makes a rename durable where the platform allows; a failure here loses nothing written.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A rename replaces whatever is at `dest`: a device, a FIFO or a link the user named would be
/// gone, not written to. Only a regular file (or nothing) may be replaced.
fn refuse_non_regular(dest: &Path) -> Result<()> {
    let kind = match std::fs::symlink_metadata(dest) {
        Ok(meta) if meta.file_type().is_file() => return Ok(()),
        Ok(meta) if meta.file_type().is_symlink() => "a symbolic link",
        Ok(meta) if meta.is_dir() => "a folder",
        Ok(_) => "not a regular file (a device, a FIFO or a socket)",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dest, e)),
    };
    Err(Error::Input(format!("{}: exists and is {kind}; it is not replaced (name a regular file, or a new path)", dest.display())))
}

/// A file being written under its temporary name; [`StagedFile::commit`] renames it into place.
pub struct StagedFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl StagedFile {
    /// Create the temporary sibling of `dest` (never following a link, never reusing a name).
    pub fn create(dest: &Path) -> Result<Self> {
        refuse_non_regular(dest)?;
        let tmp = sibling(dest, Kind::Tmp)?;
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| Error::io(dest, e))?;
        Ok(StagedFile { file: Some(file), tmp, dest: dest.to_path_buf() })
    }

    /// Create and fill in one go, fsynced.
    pub fn with_bytes(dest: &Path, bytes: &[u8]) -> Result<Self> {
        let mut staged = Self::create(dest)?;
        staged.file().write_all(bytes).map_err(|e| Error::io(dest, e))?;
        staged.sync()?;
        Ok(staged)
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("a StagedFile holds its file until commit")
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// fsync the data (before a rename makes it visible).
    pub fn sync(&mut self) -> Result<()> {
        let dest = self.dest.clone();
        self.file().sync_all().map_err(|e| Error::io(&dest, e))
    }

    /// Rename over the destination. The folder is synced by the caller (once for many files).
    fn rename_into_place(mut self) -> Result<()> {
        self.file = None;
        let result = std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e));
        if result.is_ok() {
            self.tmp = PathBuf::new(); // nothing left for Drop to remove
        }
        result
    }

    /// fsync, rename into place, sync the folder.
    pub fn commit(mut self) -> Result<()> {
        self.sync()?;
        let dir = parent_of(&self.dest);
        self.rename_into_place()?;
        sync_dir(&dir);
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Replace `path` with `bytes`: all of it or, on any failure, the earlier file untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    StagedFile::with_bytes(path, bytes)?.commit()
}

/// Several files made visible together: all are written and fsynced first, then renamed in the
/// order given (put the one a reader looks at first, e.g. a config, last).
pub fn commit_all(files: Vec<StagedFile>) -> Result<()> {
    let dirs: Vec<PathBuf> = files.iter().map(|f| parent_of(f.dest())).collect();
    // On a failure the rest are dropped, which removes their temporaries.
    for f in files {
        f.rename_into_place()?;
    }
    let mut done: Vec<&PathBuf> = Vec::new();
    for d in &dirs {
        if !done.contains(&d) {
            sync_dir(d);
            done.push(d);
        }
    }
    Ok(())
}

/// The first entry under `dir` that `tree` does not describe (our own leftovers count as ours),
/// or `None`. Links are never ours: we write plain files and folders.
pub fn foreign_entry(dir: &Path, tree: &Tree) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        let ours_by_name = |names: &[&str]| names.iter().any(|n| *n == name || parse_sibling(&name, n).is_some());
        if kind.is_file() && ours_by_name(tree.files) {
            continue;
        }
        if kind.is_dir() {
            if let Some((_, sub)) = tree.dirs.iter().find(|(n, _)| *n == name) {
                if let Some(found) = foreign_entry(&path, sub)? {
                    return Ok(Some(found));
                }
                continue;
            }
            if tree.dirs.iter().any(|(n, _)| parse_sibling(&name, n).is_some()) {
                continue; // a staged or old copy of one of our folders
            }
        }
        return Ok(Some(path));
    }
    Ok(None)
}

/// Refuse a folder that holds something we did not write (so we never replace or remove it).
pub fn check_ours(dir: &Path, tree: &Tree) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a folder written by bert-adapters; move it away")));
    }
    match foreign_entry(dir, tree)? {
        None => Ok(()),
        Some(found) => Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("holds {}, which bert-adapters did not write; it is never replaced or removed, so move it away first", found.display()),
            ),
        )),
    }
}

/// Remove the folder `dir` of ours: only the entries `tree` names (and our leftovers), then the
/// folders themselves if that emptied them. Returns an error naming what could not go.
pub fn remove_ours(dir: &Path, tree: &Tree) -> Result<()> {
    check_ours(dir, tree)?;
    remove_checked(dir, tree)
}

fn remove_checked(dir: &Path, tree: &Tree) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            let sub = tree.dirs.iter().find(|(n, _)| *n == name || parse_sibling(&name, n).is_some()).map(|(_, t)| *t);
            if let Some(sub) = sub {
                remove_checked(&path, sub)?;
            }
        } else if kind.is_file() && tree.files.iter().any(|n| *n == name || parse_sibling(&name, n).is_some()) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    // remove_dir, not remove_dir_all: it fails rather than take anything not removed above.
    std::fs::remove_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Fill a new folder with `fill(staging folder)` and swap it in as `dest`, which may hold only
/// what `tree` describes. On any failure `dest` is left as it was (or, after a crash between
/// the two renames, beside it as `.NAME.old-…`, which [`clean_leftovers`] puts back).
pub fn replace_dir(dest: &Path, tree: &Tree, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dest);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    check_ours(dest, tree)?;
    let stage = sibling(dest, Kind::Partial)?;
    // create_dir fails if anything (a link included) is already at the name.
    std::fs::create_dir(&stage).map_err(|e| Error::io(&stage, e))?;
    if let Err(e) = fill(&stage).and_then(|()| check_ours(&stage, tree)) {
        let _ = remove_checked(&stage, tree);
        return Err(e);
    }
    swap_in(dest, &stage, tree)
}

fn swap_in(dest: &Path, stage: &Path, tree: &Tree) -> Result<()> {
    let old = if dest.exists() {
        let old = sibling(dest, Kind::Old)?;
        if let Err(e) = std::fs::rename(dest, &old) {
            let _ = remove_checked(stage, tree);
            return Err(Error::io(dest, e));
        }
        Some(old)
    } else {
        None
    };
    if let Err(e) = rename_dir(stage, dest) {
        let rollback = old.as_ref().map(|old| std::fs::rename(old, dest));
        let _ = remove_checked(stage, tree);
        return Err(match rollback {
            Some(Err(r)) => Error::io(
                dest,
                std::io::Error::other(format!("{e}; and putting the previous folder back failed ({r}): it is at {}", old.as_ref().map_or(String::new(), |o| o.display().to_string()))),
            ),
            _ => Error::io(dest, e),
        });
    }
    sync_dir(&parent_of(dest));
    if let Some(old) = old {
        remove_checked(&old, tree)?;
    }
    Ok(())
}

/// The second rename of a swap; a test can make it fail to exercise the rollback.
fn rename_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::FAIL_SECOND_RENAME.with(|f| f.replace(false)) {
        return Err(std::io::Error::other("injected failure"));
    }
    std::fs::rename(from, to)
}

/// Clean what a killed process left beside the files and folders named `names` in `dir`:
/// temporaries and staged folders go, a previous folder is put back where its name is free and
/// removed where it is not. Only our exact naming, only from processes no longer alive, and
/// folders only entry by entry per `trees` (name → tree). Returns what was done, for a log line.
pub fn clean_leftovers(dir: &Path, names: &[&str], trees: &[(&str, &Tree)]) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(done) };
    let mut found: Vec<(PathBuf, String, Kind)> = Vec::new();
    for entry in entries.flatten() {
        let entry_name = entry.file_name().to_string_lossy().into_owned();
        let all = names.iter().copied().chain(trees.iter().map(|(n, _)| *n));
        for name in all {
            if let Some((kind, pid)) = parse_sibling(&entry_name, name) {
                if pid != std::process::id() && !process_alive(pid) {
                    found.push((entry.path(), name.to_string(), kind));
                }
            }
        }
    }
    // A fixed order; of several previous folders of one name the first is put back and the
    // others, finding the name taken, are removed.
    found.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, name, kind) in found {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let tree = trees.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        match (kind, tree) {
            (_, None) if meta.is_file() => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                done.push(format!("removed {}", path.display()));
            }
            (Kind::Old, Some(tree)) if meta.is_dir() => {
                let target = dir.join(&name);
                if target.exists() {
                    remove_ours(&path, tree)?;
                    done.push(format!("removed {}", path.display()));
                } else {
                    std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
                    done.push(format!("restored {} from {}", target.display(), path.display()));
                }
            }
            (Kind::Partial, Some(tree)) if meta.is_dir() => {
                remove_ours(&path, tree)?;
                done.push(format!("removed {}", path.display()));
            }
            _ => {} // not a shape we create: leave it
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        pub(super) static FAIL_SECOND_RENAME: Cell<bool> = const { Cell::new(false) };
    }

    static LEAF: Tree = Tree { files: &["a.txt", "b.txt"], dirs: &[] };
    static ROOT: Tree = Tree { files: &["state.json"], dirs: &[("sub", &LEAF)] };

    fn fill(dir: &Path, tag: &str) -> Result<()> {
        std::fs::write(dir.join("state.json"), tag).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.txt"), tag).unwrap();
        Ok(())
    }

    /// `DIR/ck` filled with "1", as a first save leaves it.
    fn saved_once(d: &Path) -> PathBuf {
        let dest = d.join("ck");
        replace_dir(&dest, &ROOT, |s| fill(s, "1")).unwrap();
        dest
    }

    /// The first save is still there, whole, and nothing else is.
    fn assert_first_save_intact(d: &Path) {
        assert_eq!(std::fs::read_to_string(d.join("ck/state.json")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(d.join("ck/sub/a.txt")).unwrap(), "1");
        assert_eq!(listing(d), ["ck"]);
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn sibling_names_parse_back_and_nothing_else_does() {
        let s = sibling(Path::new("/x/checkpoint"), Kind::Old).unwrap();
        let n = s.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(parse_sibling(&n, "checkpoint"), Some((Kind::Old, std::process::id())));
        assert_eq!(parse_sibling(&n, "check"), None);
        for other in [".checkpoint.old-12", ".checkpoint.old-12-xyz", "checkpoint.old-1-0000000000000000", ".checkpoint.new-1-0000000000000000", ".checkpoint.old-1-00000000000000000"] {
            assert_eq!(parse_sibling(other, "checkpoint"), None, "{other}");
        }
        assert_ne!(sibling(Path::new("a"), Kind::Tmp).unwrap(), sibling(Path::new("a"), Kind::Tmp).unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn write_atomic_never_follows_a_link_at_the_temporary_name() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        // The old predictable name, and a spread of plausible ones: none is used.
        for pid_name in [format!(".out.tmp-{}", std::process::id()), format!(".out.tmp-{}-0000000000000000", std::process::id())] {
            std::os::unix::fs::symlink(&victim, d.path().join(pid_name)).unwrap();
        }
        write_atomic(&d.path().join("out"), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(d.path().join("out")).unwrap(), b"new");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        let staged = StagedFile::with_bytes(&p, b"two").unwrap();
        drop(staged); // never committed
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(listing(d.path()), ["f"]);
    }

    #[test]
    fn replace_dir_swaps_and_removes_only_the_old_folder() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("ck");
        replace_dir(&dest, &ROOT, |s| fill(s, "1")).unwrap();
        replace_dir(&dest, &ROOT, |s| fill(s, "2")).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("sub/a.txt")).unwrap(), "2");
        assert_eq!(listing(d.path()), ["ck"]);
    }

    #[test]
    fn replace_dir_refuses_a_folder_holding_a_foreign_file_and_keeps_it() {
        let d = tempfile::tempdir().unwrap();
        let dest = saved_once(d.path());
        std::fs::write(dest.join("sub/NOTES.txt"), "mine").unwrap();
        let err = replace_dir(&dest, &ROOT, |s| fill(s, "2")).unwrap_err().to_string();
        assert!(err.contains("NOTES.txt") && err.contains("did not write"), "{err}");
        assert_eq!(std::fs::read_to_string(dest.join("sub/NOTES.txt")).unwrap(), "mine");
        std::fs::remove_file(dest.join("sub/NOTES.txt")).unwrap();
        assert_first_save_intact(d.path()); // and the staged folder was cleaned up
        std::fs::write(dest.join("sub/NOTES.txt"), "mine").unwrap();
        assert!(remove_ours(&dest, &ROOT).is_err());
        assert!(dest.join("sub/NOTES.txt").is_file());
    }

    #[test]
    fn a_failed_second_rename_puts_the_old_folder_back() {
        let d = tempfile::tempdir().unwrap();
        let dest = saved_once(d.path());
        FAIL_SECOND_RENAME.with(|f| f.set(true));
        let err = replace_dir(&dest, &ROOT, |s| fill(s, "2")).unwrap_err().to_string();
        assert!(err.contains("injected failure"), "{err}");
        assert_first_save_intact(d.path());
    }

    #[test]
    fn a_failed_fill_leaves_the_old_folder() {
        let d = tempfile::tempdir().unwrap();
        let dest = saved_once(d.path());
        let err = replace_dir(&dest, &ROOT, |_| Err(Error::Input("disk full".into()))).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_first_save_intact(d.path());
    }

    /// A pid that is not running: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn leftovers_of_dead_processes_are_cleaned_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let live = std::process::id();
        let p = |kind: &str, pid: u32, name: &str| d.path().join(format!(".{name}.{kind}-{pid}-00000000000000ab"));
        // A crash between the two renames: only the old checkpoint is left; it comes back.
        std::fs::create_dir(p("old", dead, "ck")).unwrap();
        fill(&p("old", dead, "ck"), "old").unwrap();
        std::fs::create_dir(p("partial", dead, "ck")).unwrap();
        fill(&p("partial", dead, "ck"), "partial").unwrap();
        std::fs::write(p("tmp", dead, "metrics.csv"), "x").unwrap();
        std::fs::write(p("tmp", live, "metrics.csv"), "live").unwrap();
        // Not ours: a user's folder with a similar name, and a partial folder holding their file.
        std::fs::create_dir(d.path().join(".ck.old-backup")).unwrap();
        std::fs::create_dir(p("partial", dead, "other")).unwrap();
        let done = clean_leftovers(d.path(), &["metrics.csv"], &[("ck", &ROOT)]).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(std::fs::read_to_string(d.path().join("ck/state.json")).unwrap(), "old");
        let mut want = vec![
            "ck".to_string(),
            ".ck.old-backup".into(),
            format!(".metrics.csv.tmp-{live}-00000000000000ab"),
            format!(".other.partial-{dead}-00000000000000ab"),
        ];
        want.sort();
        assert_eq!(listing(d.path()), want);
    }
}
