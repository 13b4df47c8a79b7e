//! Mounting overlayfs with the new mount API (`fsopen`/`fsconfig`/`fsmount`).
//!
//! Every lowerdir is passed on its own with `lowerdir+` (kernel >= 6.8), so
//! an image with hundreds of layers never hits the one-page limit of the
//! classic `mount(2)` option string. Options that would make the upperdir
//! anything but a plain diff (index, metacopy, redirect_dir, userxattr) are
//! switched off or left unset. When the kernel refuses, its own message
//! (read back from the fs context) is part of the error.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;

/// What to mount: layers bottom first, and optionally a writable upper.
#[derive(Debug, Clone)]
pub struct OverlaySpec<'a> {
    /// Read-only layer directories, bottom first.
    pub lower: &'a [PathBuf],
    /// `(upperdir, workdir)`; `None` mounts read-only.
    pub upper: Option<(&'a Path, &'a Path)>,
}

/// Mount an overlay at `target` (an existing directory), `nodev`.
pub fn mount_overlay(spec: &OverlaySpec<'_>, target: &Path) -> anyhow::Result<()> {
    if spec.lower.is_empty() {
        bail!("overlay at {}: no lower layers given", target.display());
    }
    // SAFETY: plain syscall; the name is a NUL-terminated literal.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(io::Error::last_os_error())
            .context("fsopen(overlay) (needs kernel >= 5.2 and overlayfs)");
    }
    // SAFETY: fsopen returned a fresh fd that we now own.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let set = |key: &str, value: &[u8]| -> anyhow::Result<()> {
        let k = CString::new(key).expect("static key");
        let v =
            CString::new(value).with_context(|| format!("overlay option {key}: NUL in value"))?;
        // SAFETY: valid fd and NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            bail!(
                "overlay option {key}={}: {err}{}",
                String::from_utf8_lossy(value),
                kernel_messages(&fs)
            );
        }
        Ok(())
    };
    // Top layer first for the kernel; `lowerdir+` appends below the previous one.
    //
    // Each layer is named by an fd (`/proc/self/fd/N`) rather than its path:
    // the kernel keeps the name as given and prints it, escaped, in every
    // read of `/proc/*/mountinfo`. libcontainer and libcgroups read that
    // file about fifteen times per container start, so with 50 layers of
    // ~90-byte store paths the printing alone was a sizeable part of the
    // start (`ovl_show_options` in `perf`). The kernel resolves each layer
    // when it is given, so the fd is closed right after.
    for dir in spec.lower.iter().rev() {
        let layer = super::fsat::open_dir(dir).with_context(|| {
            format!("overlay at {}: layer {}", target.display(), dir.display())
        })?;
        let name = format!("/proc/self/fd/{}", layer.as_raw_fd());
        set("lowerdir+", name.as_bytes()).with_context(|| {
            format!(
                "overlay at {}: layer {} (kernel >= 6.8 needed for lowerdir+)",
                target.display(),
                dir.display()
            )
        })?;
    }
    if let Some((upper, work)) = spec.upper {
        set("upperdir", upper.as_os_str().as_bytes())?;
        set("workdir", work.as_os_str().as_bytes())?;
    }
    // A faithful diff in the upperdir: no index, no metacopy-only files, no
    // redirect xattrs for renamed dirs; `userxattr` stays off (trusted.* xattrs).
    set("index", b"off")?;
    set("metacopy", b"off")?;
    set("redirect_dir", b"off")?;
    // SAFETY: valid fd; key pointer may be null for CMD_CREATE.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        let err = io::Error::last_os_error();
        bail!(
            "creating overlay at {} ({} layers): {err}{}",
            target.display(),
            spec.lower.len(),
            kernel_messages(&fs)
        );
    }
    // nodev: device nodes in image layers never open in a container (one
    // without limits has no devices cgroup to refuse them).
    let attrs = if spec.upper.is_none() {
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV
    } else {
        MOUNT_ATTR_NODEV
    };
    // SAFETY: valid fs context fd.
    let mnt = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if mnt < 0 {
        let err = io::Error::last_os_error();
        bail!(
            "fsmount overlay for {}: {err}{}",
            target.display(),
            kernel_messages(&fs)
        );
    }
    // SAFETY: fsmount returned a fresh fd that we now own.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    let target_c =
        CString::new(target.as_os_str().as_bytes()).context("mount target has a NUL byte")?;
    // SAFETY: valid fds and NUL-terminated strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("move_mount overlay to {}", target.display()));
    }
    Ok(())
}

/// The messages the kernel left in an fs context (e.g. "overlay: ... "), as
/// a suffix for an error, or "" when there are none.
fn kernel_messages(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let msg = String::from_utf8_lossy(&buf[..n as usize]);
        out.push_str(" [kernel: ");
        out.push_str(msg.trim_end());
        out.push(']');
    }
    out
}

/// Lazily unmount `target`; a path that is not a mount point is fine.
pub fn unmount(target: &Path) -> anyhow::Result<()> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
}

/// Every mount point at or below `dir` in this mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmount every mount at or below `dir`, deepest first.
pub fn unmount_all_under(dir: &Path) -> anyhow::Result<()> {
    for m in mounts_under(dir)? {
        unmount(&m)?;
    }
    Ok(())
}
