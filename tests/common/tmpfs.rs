//! A small tmpfs mounted for one test, to make a store's filesystem fill up or turn read-only
//! for real. Mounting needs root (or CAP_SYS_ADMIN): where it is refused, `mount` returns the
//! reason and the test prints it and skips.

use std::path::Path;
use std::process::Command;

/// A tmpfs mounted on `mnt` in a fresh temporary directory (so that files a test puts beside
/// it, such as a service's log, are on another filesystem and cleaned up with the directory);
/// unmounted when dropped, also on panic.
pub struct Tmpfs {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes, or says why it could not.
    pub fn mount(bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| format!("mount point: {e}"))?;
        run_mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0755"),
                "tmpfs",
            ],
            &mnt,
        )?;
        Ok(Tmpfs { dir, mnt })
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Remounts it read-only: even root cannot write to it then.
    pub fn remount_read_only(&self) -> Result<(), String> {
        run_mount(&["-o", "remount,ro"], self.path())
    }
}

fn run_mount(args: &[&str], at: &Path) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {} {}: {}",
            args.join(" "),
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file there: detach it, so no mount outlives the test.
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}
