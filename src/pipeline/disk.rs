//! Watches the free space of the data directory's filesystem: below `store.min_free_bytes` the
//! node reports a disk problem, which pauses intake, so the store is never the one to find the
//! disk full in the middle of a write. The reserve still left is what the messages already
//! taken in need to be stored. Intake resumes once a quarter more than the minimum is free.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::health::{Health, Problem};

/// How often free space is read.
const EVERY: Duration = Duration::from_millis(500);

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a NUL-terminated path and `st` a plain struct statvfs fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Runs until aborted. A `min_free` of 0 turns the watch off.
pub async fn watch(path: PathBuf, min_free: u64, health: Arc<Health>) {
    if min_free == 0 {
        return;
    }
    let resume = min_free + min_free / 4;
    let mut low = false;
    loop {
        match free_bytes(&path) {
            Ok(free) if free < min_free || (low && free < resume) => {
                low = true;
                health.problem(
                    Problem::Disk,
                    &format!(
                        "{} MiB free on the data directory's filesystem, below store.min_free_bytes ({} MiB)",
                        free >> 20,
                        min_free >> 20
                    ),
                );
            }
            Ok(_) => {
                if low {
                    low = false;
                    health.clear(Problem::Disk);
                }
            }
            Err(e) => {
                // Not knowing is not a reason to stop: the store reports real write failures.
                tracing::debug!(error = %e, "cannot read the free space of the data directory");
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
