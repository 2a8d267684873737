//! File helpers every layer may use (a leaf: it imports nothing of the crate): atomic
//! writes, and the one-writer lock of a run or sweep folder.

use std::path::Path;

use anyhow::{Context, Result};

/// Write `bytes` to `path` atomically: a temporary file in the same folder, then rename,
/// so a reader (or a crash) never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// An exclusive lock on a folder (`<dir>/.lock`, `flock`), held until dropped: a folder has
/// one writer. The holder's pid is written into the lock file, so that a second writer's
/// error can name it. The lock goes with the process, even when it is killed.
pub struct FolderLock {
    _file: std::fs::File,
}

/// Another process holds the folder's lock (a caller may wait for it: the single-task
/// reference does).
#[derive(Debug)]
pub struct FolderInUse {
    pub what: String,
    pub dir: std::path::PathBuf,
    pub lock: std::path::PathBuf,
    pub pid: Option<u32>,
}

impl std::fmt::Display for FolderInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let holder = match self.pid {
            Some(pid) => format!("process {pid}"),
            None => "another process".to_string(),
        };
        write!(
            f,
            "the {} {} is in use by onehead {holder} (it holds {}): a folder has one writer; wait for it to finish or stop it first",
            self.what,
            self.dir.display(),
            self.lock.display()
        )
    }
}

impl std::error::Error for FolderInUse {}

/// Take the lock of `dir` (which must exist); `what` names the folder in the error ("run
/// folder", "sweep folder").
pub fn lock_folder(dir: &Path, what: &str) -> Result<FolderLock> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let path = dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(FolderInUse {
            what: what.to_string(),
            dir: dir.to_path_buf(),
            lock: path,
            pid: holder.trim().parse().ok(),
        }
        .into());
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(FolderLock { _file: file })
}

/// The file onehead leaves in an output folder it made (`eval --export`, `predict --out`):
/// what is in such a folder is onehead's to replace; any other folder is left alone.
pub const OUTPUT_MARKER: &str = ".onehead-output";

/// Take `dir` as an output folder (`flag` names the option in errors): created if absent,
/// an empty folder, or one onehead marked earlier (`Ok(true)`: it may hold an earlier
/// output); `legacy(dir)` may recognise an output written before the marker existed. A
/// folder holding anything else is refused: onehead never deletes or overwrites what it did
/// not write. The marker is written before anything else.
pub fn claim_output_dir(dir: &Path, flag: &str, legacy: impl Fn(&Path) -> bool) -> Result<bool> {
    let ours = dir.join(OUTPUT_MARKER).is_file() || (dir.is_dir() && legacy(dir));
    if !ours && dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("{flag} {}", dir.display()))?;
        if entries.next().is_some() {
            anyhow::bail!(
                "{flag} {} holds files onehead did not write (no {OUTPUT_MARKER}): use an empty or new folder",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(
        &dir.join(OUTPUT_MARKER),
        b"written by onehead: files here may be replaced by the next export or prediction\n",
    )?;
    Ok(ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_has_one_writer_and_the_second_learns_who() {
        let tmp = tempfile::tempdir().unwrap();
        let first = lock_folder(tmp.path(), "run folder").unwrap();
        let msg = match lock_folder(tmp.path(), "run folder") {
            Ok(_) => panic!("a second lock on the same folder was granted"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("run folder"), "{msg}");
        drop(first);
        lock_folder(tmp.path(), "run folder").unwrap();
    }

    #[test]
    fn only_empty_or_marked_folders_are_claimed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        // New, then marked: ours the second time.
        assert!(!claim_output_dir(&out, "--out", |_| false).unwrap());
        assert!(claim_output_dir(&out, "--out", |_| false).unwrap());
        // A foreign folder with a file is refused and left as it was.
        let foreign = tmp.path().join("photos");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("cat.jpg"), b"x").unwrap();
        let msg = claim_output_dir(&foreign, "--out", |_| false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("did not write"), "{msg}");
        assert!(!foreign.join(OUTPUT_MARKER).exists());
        assert_eq!(std::fs::read(foreign.join("cat.jpg")).unwrap(), b"x");
        // Unless the caller recognises it as an older output of its own.
        assert!(claim_output_dir(&foreign, "--out", |d| d.join("cat.jpg").is_file()).unwrap());
    }
}
