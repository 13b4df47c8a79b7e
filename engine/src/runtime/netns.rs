//! Network namespaces with only the loopback interface, up: a fresh one
//! per container ([`spawn_loopback_netns`], `kiln run`), or one lent by a
//! [`NetnsPool`] (build steps).
//!
//! A namespace is made on a short-lived helper thread (so the caller's own
//! namespace never changes) and handed back as an open fd; the container
//! joins it through `/proc/<pid>/fd/<n>`.
//!
//! Why a pool: making a namespace costs the kernel about 1.2 ms of CPU
//! (`setup_net`, `register_netdevice`, sysctl tables) and destroying it more
//! (`cleanup_net` in a kernel worker, RCU). A build of many short RUN steps
//! pays that per step, on a machine whose cores run the next step.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;

/// Start creating a network namespace with `lo` up; the thread's result
/// is an fd to it.
pub fn spawn_loopback_netns() -> std::thread::JoinHandle<anyhow::Result<OwnedFd>> {
    std::thread::spawn(make_loopback_netns)
}

/// Move this thread into a new network namespace with `lo` up; returns an
/// fd to it. The thread stays in it: call this on a thread that ends after.
fn make_loopback_netns() -> anyhow::Result<OwnedFd> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    let ns = std::fs::File::open("/proc/thread-self/ns/net")
        .context("opening the new network namespace")?;
    loopback_up().context("bringing up lo in the new network namespace")?;
    Ok(OwnedFd::from(ns))
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

/// Loopback-only network namespaces kept open by this process and lent to
/// build steps one at a time, so that consecutive steps share one instead
/// of each making and destroying its own.
///
/// Lending is safe because a step cannot change a namespace beyond its
/// sockets: its container gets docker's default capabilities
/// (`spec::DEFAULT_CAPABILITIES`: no `CAP_NET_ADMIN`, so no links,
/// addresses, routes, netfilter rules or qdiscs; no `CAP_SYS_ADMIN`),
/// `/proc/sys` and `/sys` are mounted read-only (so no `net.*` sysctls),
/// and seccomp refuses `mount`, `setns` and `unshare`. What a step can
/// leave behind is sockets: a `TIME_WAIT` (which makes a later plain `bind`
/// of that port fail), or a socket of a process still dying or passed out
/// of the container. So a namespace comes back to the pool only when it
/// holds no socket at all, which [`PooledNetns::give_back`] checks off the
/// step's path; otherwise its fd is closed and the kernel destroys it once
/// nothing is left in it. Only harmless kernel caches stay behind (TCP
/// metrics and neighbour entries for 127.0.0.1, port and IP-id counters).
///
/// Each lease is its own namespace, so concurrent steps never share one
/// (two parallel stages may both bind port 8080). At most as many idle
/// namespaces are kept as there were leases out at once.
///
/// Cheap to clone (clones share the pool); dropping the last clone closes
/// the idle namespaces.
#[derive(Debug, Clone, Default)]
pub struct NetnsPool {
    state: Arc<Mutex<PoolState>>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Namespaces checked to hold no socket, ready to lend.
    idle: Vec<OwnedFd>,
    /// Leases alive now (with or without a namespace).
    leased: usize,
    /// Most leases ever alive at once: the cap on `idle`.
    peak: usize,
    /// Leases alive without a namespace (the pool had none ready).
    bare: usize,
    /// Helper threads making a namespace for `idle`: one per bare lease.
    making: usize,
}

impl PoolState {
    /// Keep `ns` if the pool has room for it (else it is closed).
    fn keep(&mut self, ns: OwnedFd) -> bool {
        let room = self.idle.len() < self.peak.max(1);
        if room {
            self.idle.push(ns);
        }
        room
    }
}

impl NetnsPool {
    /// An empty pool; it fills as build steps run.
    pub fn new() -> Self {
        NetnsPool::default()
    }

    /// A namespace for one step, without waiting: an idle one if there is
    /// one, else a lease without a namespace ([`PooledNetns::path`] is
    /// `None`: the container makes its own fresh namespace, as `kiln run`
    /// does), and a helper thread makes one for the next step meanwhile.
    pub fn take(&self) -> PooledNetns {
        let mut st = self.lock();
        st.leased += 1;
        st.peak = st.peak.max(st.leased);
        let fd = st.idle.pop();
        if fd.is_none() {
            st.bare += 1;
        }
        // One in the making per step that found none (steps running at once
        // each get theirs next time), not one per such step in a row.
        if st.making < st.bare {
            st.making += 1;
            let pool = self.state.clone();
            std::thread::spawn(move || {
                let made = make_loopback_netns();
                let mut st = pool.lock().unwrap_or_else(|e| e.into_inner());
                st.making -= 1;
                match made {
                    Ok(ns) => {
                        st.keep(ns);
                    }
                    Err(e) => tracing::debug!("making a network namespace for the pool: {e:#}"),
                }
            });
        }
        PooledNetns {
            bare: fd.is_none(),
            fd,
            pool: self.state.clone(),
        }
    }

    /// How many namespaces are idle now.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A namespace lent by a [`NetnsPool`] for one container (or none, see
/// [`NetnsPool::take`]). Keep it until the container has exited: the
/// container joins it through [`PooledNetns::path`], a path into this
/// process's open fds. Dropping it closes the namespace (use
/// [`PooledNetns::give_back`] once the container is known to be gone).
#[derive(Debug)]
pub struct PooledNetns {
    fd: Option<OwnedFd>,
    /// Lent without a namespace (counted in `PoolState::bare`).
    bare: bool,
    pool: Arc<Mutex<PoolState>>,
}

impl PooledNetns {
    /// `/proc/<this pid>/fd/<n>` for the container to join; `None` when the
    /// pool had none ready.
    pub fn path(&self) -> Option<PathBuf> {
        self.fd
            .as_ref()
            .map(|fd| PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())))
    }

    /// The container has exited: check on a helper thread whether the
    /// namespace holds any socket still, and pool it if not (else close
    /// it). The thread says whether it pooled it; `None` when this lease
    /// had no namespace.
    pub fn give_back(mut self) -> Option<std::thread::JoinHandle<bool>> {
        let ns = self.fd.take()?;
        let pool = self.pool.clone();
        Some(std::thread::spawn(move || {
            match sockets_left_in(&ns) {
                Ok(left) if left.is_empty() => {
                    pool.lock().unwrap_or_else(|e| e.into_inner()).keep(ns)
                }
                Ok(left) => {
                    tracing::debug!("network namespace not reused: {}", left.join(", "));
                    false
                }
                Err(e) => {
                    tracing::debug!("network namespace not reused: {e:#}");
                    false
                }
            }
        }))
    }
}

impl Drop for PooledNetns {
    fn drop(&mut self) {
        let mut st = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        st.leased -= 1;
        st.bare -= usize::from(self.bare);
    }
}

/// How long [`sockets_left_in`] waits in all for sockets that were closed
/// but not freed yet.
const FREEING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The socket counters of namespace `ns` that are not zero, e.g.
/// `"TCP tw 1"`; empty when it holds no socket. Joins `ns` on this
/// thread: call it on a thread that ends after.
fn sockets_left_in(ns: &OwnedFd) -> anyhow::Result<Vec<String>> {
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .context("joining the network namespace")?;
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        let left = socket_counts()?;
        // Netlink and raw sockets (`ip`, `ping`) are freed an RCU grace
        // period after their last close: counted in `sockets used` only,
        // for some milliseconds. Anything else stays for long (a TIME_WAIT
        // for a minute) or for good (a socket held outside the container).
        let freeing = left.len() == 1 && left[0].starts_with("sockets used ");
        if !freeing || start.elapsed() >= FREEING_WAIT {
            return Ok(left);
        }
        std::thread::sleep(pause);
        pause *= 2;
    }
}

/// [`nonzero_socket_counts`] of this thread's network namespace.
fn socket_counts() -> anyhow::Result<Vec<String>> {
    // The kernel keeps these counts per namespace, so reading them is
    // cheap; listing sockets (`/proc/net/tcp`) walks the host-wide hash
    // tables instead, about 10 ms here.
    let v4 = std::fs::read_to_string("/proc/thread-self/net/sockstat")
        .context("reading /proc/thread-self/net/sockstat")?;
    // Absent when IPv6 is off.
    let v6 = std::fs::read_to_string("/proc/thread-self/net/sockstat6").unwrap_or_default();
    nonzero_socket_counts(&v4, &v6)
}

/// The counters that must be zero for a namespace to hold no socket, as
/// (line, field) of `sockstat`/`sockstat6`: `sockets used` counts every
/// socket created from user space (all families, including orphaned TCP
/// sockets still closing), `TCP tw` the `TIME_WAIT`/`FIN_WAIT2` remnants,
/// which have no socket of their own; the `inuse` counts are redundant but
/// say what kind of socket is left.
const MUST_BE_ZERO: &[(&str, &str)] = &[
    ("sockets", "used"),
    ("TCP", "inuse"),
    ("TCP", "tw"),
    ("UDP", "inuse"),
    ("UDPLITE", "inuse"),
    ("RAW", "inuse"),
    ("TCP6", "inuse"),
    ("UDP6", "inuse"),
    ("UDPLITE6", "inuse"),
    ("RAW6", "inuse"),
];

/// The [`MUST_BE_ZERO`] counters found non-zero in the text of
/// `sockstat` and `sockstat6` (`"TCP: inuse 0 orphan 0 tw 0 ..."`); an
/// error when `sockets used` or `TCP tw` is missing (then nothing can be
/// told).
fn nonzero_socket_counts(sockstat: &str, sockstat6: &str) -> anyhow::Result<Vec<String>> {
    let mut counts = std::collections::HashMap::new();
    for line in sockstat.lines().chain(sockstat6.lines()) {
        let Some((name, fields)) = line.split_once(':') else {
            continue;
        };
        let words: Vec<&str> = fields.split_whitespace().collect();
        for pair in words.chunks(2) {
            if let [field, value] = pair {
                counts.insert((name.trim(), *field), value.parse::<u64>().ok());
            }
        }
    }
    for needed in [("sockets", "used"), ("TCP", "tw")] {
        anyhow::ensure!(
            counts.contains_key(&needed),
            "sockstat has no {} {} count",
            needed.0,
            needed.1
        );
    }
    Ok(MUST_BE_ZERO
        .iter()
        .filter_map(|key| match counts.get(key) {
            Some(Some(0)) | None => None,
            Some(Some(n)) => Some(format!("{} {} {n}", key.0, key.1)),
            Some(None) => Some(format!("{} {} unreadable", key.0, key.1)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "sockets: used 0\nTCP: inuse 0 orphan 3 tw 0 alloc 9 mem 1\n\
                         UDP: inuse 0 mem 0\nUDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n";
    const CLEAN6: &str = "TCP6: inuse 0\nUDP6: inuse 0\nUDPLITE6: inuse 0\nRAW6: inuse 0\nFRAG6: inuse 0 memory 0\n";

    #[test]
    fn sockstat_of_an_empty_namespace_is_clean() {
        // `orphan` and `alloc` are host-wide counts: not looked at.
        assert_eq!(nonzero_socket_counts(CLEAN, CLEAN6).unwrap(), Vec::<String>::new());
        assert_eq!(nonzero_socket_counts(CLEAN, "").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn sockstat_names_what_is_left() {
        let tw = CLEAN.replace("tw 0", "tw 2");
        assert_eq!(nonzero_socket_counts(&tw, CLEAN6).unwrap(), ["TCP tw 2"]);
        let listening = CLEAN.replace("used 0", "used 1");
        let listening6 = CLEAN6.replace("TCP6: inuse 0", "TCP6: inuse 1");
        assert_eq!(
            nonzero_socket_counts(&listening, &listening6).unwrap(),
            ["sockets used 1", "TCP6 inuse 1"]
        );
    }

    #[test]
    fn sockstat_without_the_key_counts_is_an_error() {
        let err = nonzero_socket_counts("TCP: inuse 0\n", "").unwrap_err();
        assert!(err.to_string().contains("sockets used"), "{err}");
    }
}
