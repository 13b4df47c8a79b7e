//! Creating a container that joins no cgroup (when it has no limits).
//!
//! Moving a process into a cgroup (a write to `cgroup.procs`) takes the
//! kernel's `cgroup_threadgroup_rwsem` for writing, which waits for an RCU
//! grace period: 5-25 ms per container, more than everything else kiln does
//! to start one. A container without resource limits needs no cgroup of its
//! own: its pid namespace already ends every process in it when its first
//! process exits (as crun's `--cgroup-manager=disabled`).
//!
//! libcontainer 0.7 has no switch for this. Its cgroup manager is made in
//! the container's intermediate process, cloned from the calling thread:
//! on a `/sys/fs/cgroup` that is a plain tmpfs it uses the v1 manager, which
//! skips every controller it finds no mount for and so moves the process
//! nowhere. [`HiddenCgroupfs::enter`] gives the calling thread such a view,
//! a mount namespace of its own with an empty tmpfs on `/sys/fs/cgroup`,
//! for the duration of the container's creation; the container's own mount
//! namespace starts as a copy of it (and replaces it with its rootfs).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::Context;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The calling thread is in a private mount namespace without cgroup
/// hierarchies until [`HiddenCgroupfs::leave`].
pub struct HiddenCgroupfs {
    host_ns: OwnedFd,
    cwd: OwnedFd,
}

impl HiddenCgroupfs {
    /// Move the calling thread into a new mount namespace (nothing in it
    /// propagates to the host) whose `/sys/fs/cgroup` is an empty tmpfs.
    /// The thread must have its own fs context (see `private_cwd`), or be
    /// the only thread.
    pub fn enter() -> anyhow::Result<HiddenCgroupfs> {
        let host_ns = File::open("/proc/thread-self/ns/mnt")
            .context("opening this thread's mount namespace")?
            .into();
        let cwd = File::open(".")
            .context("opening the working directory")?
            .into();
        let hidden = HiddenCgroupfs { host_ns, cwd };
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
        // From here on, a failure must return to the host namespace.
        if let Err(e) = hide_cgroup_mounts() {
            let _ = hidden.leave();
            return Err(e);
        }
        Ok(hidden)
    }

    /// Return the thread to the host's mount namespace (and its working
    /// directory). Returns the private namespace: its last reference
    /// unmounts all its copies, which waits for an RCU grace period, so the
    /// caller drops it where that does not delay anything.
    pub fn leave(self) -> anyhow::Result<OwnedFd> {
        let private: OwnedFd = File::open("/proc/thread-self/ns/mnt")
            .context("opening the private mount namespace")?
            .into();
        nix::sched::setns(&self.host_ns, CloneFlags::CLONE_NEWNS)
            .context("returning to the host mount namespace")?;
        nix::unistd::fchdir(self.cwd.as_raw_fd()).context("restoring the working directory")?;
        Ok(private)
    }
}

/// In the calling thread's (new) mount namespace: stop propagation both
/// ways, then replace the cgroup hierarchies by an empty tmpfs.
fn hide_cgroup_mounts() -> anyhow::Result<()> {
    // Recursively private first: the unmount below must not propagate to
    // the host's peers of these mounts.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the private mount namespace private")?;
    // Detaching also takes every hierarchy mounted below it; a host without
    // anything mounted there (EINVAL) is fine.
    match nix::mount::umount2(CGROUP_ROOT, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e).with_context(|| format!("detaching {CGROUP_ROOT}")),
    }
    nix::mount::mount(
        Some("tmpfs"),
        CGROUP_ROOT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,mode=755"),
    )
    .with_context(|| format!("mounting an empty tmpfs on {CGROUP_ROOT}"))?;
    Ok(())
}
