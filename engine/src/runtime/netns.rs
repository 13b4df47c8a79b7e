//! A fresh network namespace with only the loopback interface, up.
//!
//! The namespace is made on a short-lived helper thread (so the caller's
//! own namespace never changes) and handed back as an open fd; the
//! container joins it through `/proc/<pid>/fd/<n>`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::Context;

/// Start creating a network namespace with `lo` up; the thread's result
/// is an fd to it.
pub fn spawn_loopback_netns() -> std::thread::JoinHandle<anyhow::Result<OwnedFd>> {
    std::thread::spawn(|| -> anyhow::Result<OwnedFd> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET)")?;
        let ns = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening the new network namespace")?;
        loopback_up().context("bringing up lo in the new network namespace")?;
        Ok(OwnedFd::from(ns))
    })
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2).
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: zeroed ifreq is valid; we fill the name and flags.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket and ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union was just filled by the kernel.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: valid socket and ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
