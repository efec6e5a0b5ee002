//! Watches the storage: the free space of the data directory's filesystem, and store writes
//! that do not return.
//!
//! Below `store.min_free_bytes` free the node reports a disk problem, which pauses intake, so
//! the store is never the one to find the disk full in the middle of a write; the reserve still
//! left is what the messages already taken in need. Intake resumes once a quarter more than the
//! minimum is free. A store write that has waited longer than [`STUCK_AFTER`] (a disk that
//! hangs instead of failing) is reported as a store problem until it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::commit::WriteWatch;
use super::health::{Health, Problem};
use crate::model::metrics::Metrics;

/// How often the storage is looked at.
const EVERY: Duration = Duration::from_millis(500);
/// A store write waiting longer than this is a problem.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

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

/// Runs until aborted. A `min_free` of 0 turns the free-space check off.
pub async fn watch(
    path: PathBuf,
    min_free: u64,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    writes: Arc<WriteWatch>,
) {
    let resume = min_free + min_free / 4;
    let mut low = false;
    let mut stuck = false;
    loop {
        // statvfs can block (a hung network filesystem): never on the runtime's threads.
        let p = path.clone();
        let free = tokio::task::spawn_blocking(move || free_bytes(&p)).await;
        match free {
            Ok(Ok(free)) => {
                metrics
                    .disk_free_bytes
                    .set(free.min(i64::MAX as u64) as i64);
                if min_free > 0 && (free < min_free || (low && free < resume)) {
                    if !low {
                        low = true;
                        health.problem(
                            Problem::Disk,
                            &format!(
                                "free space on the data directory's filesystem is below store.min_free_bytes ({} MiB)",
                                min_free >> 20
                            ),
                        );
                    }
                } else if low {
                    low = false;
                    health.clear(Problem::Disk);
                }
            }
            // Not knowing is not a reason to stop: the store reports real write failures.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the free space of the data directory")
            }
            Err(_) => {}
        }
        match writes.waiting() {
            Some(w) if w >= STUCK_AFTER => {
                if !stuck {
                    stuck = true;
                    health.problem(
                        Problem::Store,
                        &format!(
                            "a store write has not returned for {} s",
                            STUCK_AFTER.as_secs()
                        ),
                    );
                }
            }
            _ => {
                if stuck {
                    stuck = false;
                    health.clear(Problem::Store);
                }
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
