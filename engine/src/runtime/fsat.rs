//! Path resolution that cannot escape a root directory.
//!
//! Files inside a container rootfs are under the control of whatever ran
//! there before: any component may be a symlink planted to point at the
//! host. Every lookup here goes through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`
//! (or `RESOLVE_IN_ROOT` to read files as the container would see them).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// How `open_beneath` treats symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Fail on any symlink (`ELOOP`).
    NoSymlinks,
    /// Follow symlinks, but treat `/` and `..` as the root (like a chroot).
    InRoot,
}

/// Open `rel` (relative, `/`-separated) below the directory `root`.
pub fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: i32,
    resolve: Resolve,
) -> io::Result<OwnedFd> {
    let rel = relative(rel);
    let path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let resolve = match resolve {
        Resolve::NoSymlinks => {
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS
        }
        Resolve::InRoot => libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: open_how is plain data; zero is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: valid fd, NUL-terminated path, open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a fresh fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Open a directory as an `O_PATH`-less directory fd (for *at calls).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `rel` without leading `/` (and without `.` components).
pub fn relative(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

/// The normal components of an absolute container path; `..` is refused.
pub fn components(p: &Path) -> io::Result<Vec<&std::ffi::OsStr>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: `..` not allowed", p.display()),
                ));
            }
        }
    }
    Ok(out)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if it does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> io::Result<Option<libc::stat>> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, valid out pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(st))
}

/// `fstat` of an open fd.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid fd and NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Create an empty regular file `name` in `dir` (fails if it exists).
pub fn create_file_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd, closed right away.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// `unlinkat(dir, name, flags)`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, remove_dir: bool) -> io::Result<()> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the directory open at `fd` has no entries besides `.` and `..`.
pub fn dir_is_empty(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(std::fs::read_dir(path)?.next().is_none())
}

/// Whether `fd` (a directory) carries the overlay opaque xattr.
pub fn is_opaque(fd: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 4];
    // SAFETY: valid fd, NUL-terminated name, buffer of the given size.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0
}
