//! A small private disk for one test: a tmpfs mounted in its own mount namespace (held open by
//! a sleeping process), so a gateway run inside it can be made to find its data directory full
//! or read-only — which `chmod` cannot do to root — while nothing changes for the rest of the
//! machine. Needs root (or CAP_SYS_ADMIN) and util-linux `unshare`/`nsenter`/`mount`.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::{ChildGuard, READY_TIMEOUT};

/// A tmpfs of a fixed size, visible only to processes started through [`DataVolume::command`].
#[derive(Debug)]
pub struct DataVolume {
    holder: ChildGuard,
    /// The mount point: an empty directory outside; the tmpfs inside the namespace.
    mount_point: tempfile::TempDir,
}

impl DataVolume {
    /// Mounts a tmpfs of `size_mib` MiB in a new private mount namespace.
    pub async fn start(size_mib: u32) -> anyhow::Result<DataVolume> {
        let mount_point = tempfile::Builder::new().prefix("citywatch-volume-").tempdir().context("mount point")?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o size=\"$1\" citywatch-volume \"$0\" && echo mounted && exec sleep 86400")
            .arg(mount_point.path())
            .arg(format!("{size_mib}m"));
        let mut holder = ChildGuard::spawn("volume", cmd)?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !holder.stdout().contains("mounted") {
            if let Some(status) = holder.try_wait()? {
                bail!("could not mount a private tmpfs (needs root and util-linux unshare): {status}\n{}", holder.logs());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the private tmpfs was not mounted within {READY_TIMEOUT:?}\n{}", holder.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(DataVolume { holder, mount_point })
    }

    /// The directory as processes inside the namespace see it (put the gateway's data here).
    pub fn inside(&self) -> &Path {
        self.mount_point.path()
    }

    /// The same directory seen from this process, through the holder's root.
    pub fn outside(&self) -> PathBuf {
        let relative = self.inside().strip_prefix("/").unwrap_or(self.inside());
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> Vec<OsString> {
        ["nsenter", "--target", &self.holder.id().to_string(), "--mount", "--"].iter().map(OsString::from).collect()
    }

    /// Writes a filler file until the tmpfs is full; returns the bytes written.
    pub fn fill(&self) -> anyhow::Result<u64> {
        let path = self.outside().join("filler");
        let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC: full, as wanted
                Err(e) => return Err(e).context("filling the volume"),
            }
        }
        // Flushing may hit ENOSPC too: the point is that the disk is full.
        let _ = file.sync_all();
        Ok(written)
    }

    /// Removes the filler file.
    pub fn free(&self) -> anyhow::Result<()> {
        std::fs::remove_file(self.outside().join("filler")).context("removing the filler")
    }

    /// Remounts the tmpfs read-only (`true`) or read-write.
    pub fn set_read_only(&self, read_only: bool) -> anyhow::Result<()> {
        let option = if read_only { "remount,ro" } else { "remount,rw" };
        let status = Command::new("nsenter")
            .args(["--target", &self.holder.id().to_string(), "--mount", "--", "mount", "-o", option])
            .arg(self.inside())
            .status()
            .context("running nsenter mount")?;
        anyhow::ensure!(status.success(), "mount -o {option} {} failed: {status}", self.inside().display());
        Ok(())
    }
}
