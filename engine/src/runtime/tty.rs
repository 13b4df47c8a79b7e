//! Pseudo-terminals: the container's console (a pty that libcontainer
//! opens inside the container and hands back over a unix socket), window
//! sizes, raw mode for the user's terminal, and passing fds over sockets.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use anyhow::Context;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::termios;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl WindowSize {
    /// The size of the terminal `fd` refers to, if it is one.
    pub fn of(fd: BorrowedFd<'_>) -> Option<WindowSize> {
        // SAFETY: zeroed winsize is a valid out-buffer for TIOCGWINSZ.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: ioctl on a borrowed fd with a pointer to a local winsize.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        (r == 0).then_some(WindowSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        })
    }

    /// Resize the terminal `fd` (e.g. a pty master: the processes on its
    /// slave get SIGWINCH).
    pub fn apply(self, fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        let ws = libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: ioctl on a borrowed fd with a pointer to a local winsize.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the terminal size");
        }
        Ok(())
    }
}

/// The user's terminal in raw mode; the old mode comes back on drop.
pub struct RawMode {
    fd: RawFd,
    saved: termios::Termios,
}

impl RawMode {
    /// Put the terminal `fd` in raw mode (no echo, no line editing, no
    /// signals from keys: Ctrl-C reaches the container as a byte).
    pub fn enable(fd: BorrowedFd<'_>) -> anyhow::Result<RawMode> {
        let saved = termios::tcgetattr(fd).context("reading the terminal mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, termios::SetArg::TCSANOW, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }

    /// Only switch off output processing on the terminal `fd` (the
    /// container's pty already turned `\n` into `\r\n`); keys still work
    /// as usual (Ctrl-C sends SIGINT).
    pub fn output_only(fd: BorrowedFd<'_>) -> anyhow::Result<RawMode> {
        let saved = termios::tcgetattr(fd).context("reading the terminal mode")?;
        let mut mode = saved.clone();
        mode.output_flags.remove(termios::OutputFlags::OPOST);
        termios::tcsetattr(fd, termios::SetArg::TCSANOW, &mode)
            .context("setting the terminal mode")?;
        Ok(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: the fd outlives this guard (it is the process's stdin).
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(fd, termios::SetArg::TCSANOW, &self.saved);
    }
}

/// Listen on `<dir>/<name>` for libcontainer's console connection. Bound
/// through `/proc/self/fd/N/`, so long state paths fit in `sun_path`.
pub(crate) fn listen_console(dir: &Path, name: &str) -> anyhow::Result<OwnedFd> {
    let dirfd = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let sock = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("console socket")?;
    let addr = UnixAddr::new(format!("/proc/self/fd/{}/{name}", dirfd.as_raw_fd()).as_str())
        .context("console socket address")?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr).context("binding the console socket")?;
    nix::sys::socket::listen(&sock, nix::sys::socket::Backlog::new(1).expect("backlog 1"))
        .context("listening on the console socket")?;
    Ok(sock)
}

/// The pty master the container sent to the console socket `listener`
/// (it connected and sent it while being created).
pub(crate) fn accept_console(listener: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let conn = nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
        .context("the container did not connect to its console socket")?;
    // SAFETY: accept4 returned a fresh fd that we now own.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    let (_, fd) = recv_with_fd(conn.as_fd(), &mut [0u8; 256])
        .context("receiving the container's terminal")?;
    fd.context("the container sent no terminal")
}

/// Send `data` with `fd` attached (SCM_RIGHTS) on a unix socket.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> anyhow::Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    send_fds(sock, data, &fds, MsgFlags::empty()).context("sendmsg")
}

/// Receive one message into `buf` on a unix socket: its length (0 at end
/// of stream) and the fd attached to it, if any.
pub fn recv_with_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> anyhow::Result<(usize, Option<OwnedFd>)> {
    let (n, fds) = recv_fds(sock, buf, MsgFlags::empty()).context("recvmsg")?;
    Ok((n, fds.into_iter().next()))
}

/// Send `data` with `fds` attached (SCM_RIGHTS), with `flags` (e.g.
/// `MSG_NOSIGNAL`, so a closed peer is an error instead of a SIGPIPE).
pub(crate) fn send_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[RawFd],
    flags: MsgFlags,
) -> std::io::Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    loop {
        match nix::sys::socket::sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, flags, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receive one message into `buf`: its length (0 at end of stream) and
/// the fds attached to it (close-on-exec), in order.
pub(crate) fn recv_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = loop {
        match nix::sys::socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these fds for us.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}
