//! The shim zygote: one `kiln __shim-zygote` process per kiln process
//! (per `kiln` binary and state root), exec'd once, lazily, and
//! single-threaded forever, that forks a container shim per container
//! instead of kiln exec'ing a fresh `kiln __container-shim` each time (an
//! exec of the 30 MB binary costs a few ms of CPU per RUN step). Requests
//! from concurrent threads take turns; each is one round trip and a fork.
//!
//! The zygote forks each shim ahead of its request (a [`Spare`], named
//! `kiln-spare` until it gets its request): a request is handed to the
//! waiting spare, and the next spare is forked after the answer, beside the
//! container just started rather than before the next one.
//!
//! Why a process at all: libcontainer must clone from a single-threaded
//! process (see [`crate::executor`]); the zygote is one, and so is every
//! child it forks. Each child runs exactly the exec'd shim's logic
//! ([`crate::commands::shim`]) on the fds the client sent, then `_exit`s.
//!
//! Protocol, on a SOCK_SEQPACKET socketpair made when the zygote is spawned
//! (its end is `--socket-fd`):
//! - zygote → client, once: `ready`;
//! - client → zygote, per container: a JSON [`Request`] with five fds
//!   (SCM_RIGHTS): the shim's status socket end, the spec pipe's read end,
//!   the container's stdin, stdout and stderr;
//! - zygote → client: `ok <pid>` with a pidfd of the forked shim, or
//!   `error <message>`.
//!
//! The zygote reaps its children; on reaping one it sends `shim-exit <code>`
//! or `shim-signal <signal>` on that child's status socket (after whatever
//! the shim itself sent), so that a shim killed by its start watchdog
//! (SIGALRM) is still told apart by the client. The zygote exits when its
//! socket reaches end of stream or the kiln process dies (it watches a
//! pidfd of it); its running children stay: they watch the kiln process
//! themselves, through the same pidfd inherited from the zygote (opened
//! once after checking that kiln is the zygote's parent, so a recycled pid
//! can never be mistaken for it). No `PR_SET_PDEATHSIG` here: it fires when
//! the *thread* that spawned the zygote exits, and kiln spawns it from
//! whichever blocking-pool thread needs it first.
//!
//! `KILN_SHIM_ZYGOTE=0` ([`ZYGOTE_ENV`]) turns it off (one exec'd shim per
//! container, as before); kiln also falls back to that when the zygote
//! cannot be started.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::socket::MsgFlags;
use serde::{Deserialize, Serialize};

use crate::commands::run::pidfd_open;
use crate::commands::shim::{ShimJob, serve};
use crate::config::Global;
use crate::runtime::tty::{WindowSize, recv_fds, send_fds};

/// Env var: `0` runs each container through an exec'd shim instead of a
/// zygote's fork.
pub const ZYGOTE_ENV: &str = "KILN_SHIM_ZYGOTE";

/// How long a freshly spawned zygote has to say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `kiln __shim-zygote`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The kiln process served; the zygote exits when it dies.
    #[arg(long)]
    pub parent_pid: i32,
    /// Inherited SOCK_SEQPACKET socket on which requests come.
    #[arg(long)]
    pub socket_fd: i32,
}

/// One container's shim, as asked of the zygote (its fds travel beside).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Request {
    /// The runtime's state directory.
    pub state_root: PathBuf,
    /// Milliseconds between a forwarded SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// The container reads the stdin fd sent (else `/dev/null`).
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (rows, columns).
    pub tty: Option<(u16, u16)>,
    /// `exit N` before the teardown (`__container-shim --report-exit-early`).
    pub report_exit_early: bool,
    /// The network namespace to join (`__container-shim --netns`).
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// The fds a shim works on, in the order they are sent.
pub(crate) struct ShimFds<'a> {
    /// The shim's end of the status socket.
    pub status: BorrowedFd<'a>,
    /// Read end of the spec pipe.
    pub spec: BorrowedFd<'a>,
    /// The container's stdin (a pipe or `/dev/null`).
    pub stdin: BorrowedFd<'a>,
    /// The shim's (and container's) stdout.
    pub stdout: BorrowedFd<'a>,
    /// The shim's (and container's) stderr.
    pub stderr: BorrowedFd<'a>,
}

/// A shim forked by the zygote.
pub(crate) struct Forked {
    /// Its pid (a child of the zygote, not of this process).
    pub pid: u32,
    /// A pidfd of it, to signal it without pid reuse races.
    pub pidfd: OwnedFd,
}

/// The zygote of one `kiln` binary in this process.
enum Slot {
    /// Not started yet, or gone (start one on the next request).
    Idle,
    Running(Zygote),
    /// Could not be started: exec a shim per container.
    Unavailable,
}

struct Zygote {
    sock: OwnedFd,
    process: std::process::Child,
    /// Whether it already served a request (a fresh zygote that dies on
    /// its first one is not restarted again).
    served: bool,
}

/// Zygotes by binary and state root (one of each per build or daemon).
/// Each slot's mutex serialises that zygote's requests.
type Slots = HashMap<(PathBuf, PathBuf), Arc<Mutex<Slot>>>;
static ZYGOTES: LazyLock<Mutex<Slots>> = LazyLock::new(Default::default);

fn slot(exe: &Path, state_root: &Path) -> Arc<Mutex<Slot>> {
    let mut all = ZYGOTES.lock().unwrap_or_else(|e| e.into_inner());
    all.entry((exe.to_path_buf(), state_root.to_path_buf()))
        .or_insert_with(|| Arc::new(Mutex::new(Slot::Idle)))
        .clone()
}

/// Pid of this process's running zygote of `exe` for containers with
/// state under `state_root`, if there is one.
pub(crate) fn running_pid(exe: &Path, state_root: &Path) -> Option<u32> {
    match &*slot(exe, state_root)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
    {
        Slot::Running(z) => Some(z.process.id()),
        _ => None,
    }
}

/// Start the zygote of `exe` for `state_root` now if none runs, on a
/// thread of its own: a build does it while it pulls its base image, so
/// that its first step does not wait for the zygote's exec. A failure is
/// left for the first request to see.
pub(crate) fn start_early(exe: &Path, state_root: &Path) {
    let (slot, exe) = (slot(exe, state_root), exe.to_path_buf());
    std::thread::spawn(move || {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*slot, Slot::Idle)
            && let Ok(z) = Zygote::spawn(&exe)
        {
            *slot = Slot::Running(z);
        }
    });
}

/// Have the zygote of `exe` fork a shim on `fds` (starting the zygote if
/// needed, once more if it died). `Ok(None)`: no zygote can run here;
/// exec a shim instead.
pub(crate) fn fork_shim(
    exe: &Path,
    req: &Request,
    fds: &ShimFds<'_>,
) -> anyhow::Result<Option<Forked>> {
    let json = serde_json::to_vec(req).context("encoding the shim request")?;
    let slot = slot(exe, &req.state_root);
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if matches!(*slot, Slot::Idle) {
            *slot = match Zygote::spawn(exe) {
                Ok(z) => Slot::Running(z),
                Err(e) => {
                    tracing::warn!("{e:#}; running each container through its own shim process");
                    Slot::Unavailable
                }
            };
        }
        let Slot::Running(zygote) = &mut *slot else {
            return Ok(None);
        };
        match zygote.request(&json, fds) {
            Ok(forked) => {
                zygote.served = true;
                return Ok(Some(forked));
            }
            Err(RequestError::NotSent(e)) => {
                // It is gone (killed, or its kiln binary replaced...):
                // the request never reached it, so a new one may take it.
                let fresh = !zygote.served;
                tracing::warn!("the shim zygote is gone ({e}); starting a new one");
                zygote.reap();
                *slot = if fresh { Slot::Unavailable } else { Slot::Idle };
            }
            Err(RequestError::Lost(e)) => {
                zygote.reap();
                *slot = Slot::Idle;
                return Err(e.context("the shim zygote died while starting a container"));
            }
            Err(RequestError::Refused(msg)) => anyhow::bail!("the shim zygote: {msg}"),
        }
    }
}

enum RequestError {
    /// The zygote did not get the request.
    NotSent(std::io::Error),
    /// It got it but died before answering (a shim may have been forked).
    Lost(anyhow::Error),
    /// It answered with an error.
    Refused(String),
}

impl Zygote {
    fn spawn(exe: &Path) -> anyhow::Result<Zygote> {
        let (ours, theirs) = seqpacket_pair()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("__shim-zygote")
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .args(["--socket-fd", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let fd = theirs.as_raw_fd();
        // SAFETY: place_fds is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || place_fds(&[fd], 3));
        }
        let process = cmd
            .spawn()
            .with_context(|| format!("starting {} __shim-zygote", exe.display()))?;
        drop(theirs);
        let mut zygote = Zygote {
            sock: ours,
            process,
            served: false,
        };
        match zygote.await_ready() {
            Ok(()) => Ok(zygote),
            Err(e) => {
                zygote.reap();
                Err(e.context(format!("starting {} __shim-zygote", exe.display())))
            }
        }
    }

    fn await_ready(&mut self) -> anyhow::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, READY_TIMEOUT.as_millis() as i32) };
        anyhow::ensure!(n > 0, "it did not answer within {READY_TIMEOUT:?}");
        let mut buf = [0u8; 64];
        let (len, _) = recv_fds(self.sock.as_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)?;
        anyhow::ensure!(
            &buf[..len] == b"ready",
            "it said {:?} instead of ready (not a kiln with a zygote?)",
            String::from_utf8_lossy(&buf[..len])
        );
        Ok(())
    }

    fn request(&mut self, json: &[u8], fds: &ShimFds<'_>) -> Result<Forked, RequestError> {
        let raw = [fds.status, fds.spec, fds.stdin, fds.stdout, fds.stderr].map(|f| f.as_raw_fd());
        send_fds(self.sock.as_fd(), json, &raw, MsgFlags::MSG_NOSIGNAL).map_err(RequestError::NotSent)?;
        let mut buf = vec![0u8; 64 * 1024];
        let (n, mut got) = recv_fds(self.sock.as_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| RequestError::Lost(e.into()))?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        if n == 0 {
            return Err(RequestError::Lost(anyhow::anyhow!("end of stream")));
        }
        if let Some(msg) = reply.strip_prefix("error ") {
            return Err(RequestError::Refused(msg.to_string()));
        }
        let pid = reply.strip_prefix("ok ").and_then(|p| p.parse().ok());
        match (pid, got.pop()) {
            (Some(pid), Some(pidfd)) => Ok(Forked { pid, pidfd }),
            _ => Err(RequestError::Refused(format!(
                "unexpected answer {reply:?}"
            ))),
        }
    }

    /// Make sure it is gone and reaped (it is this process's child).
    fn reap(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn seqpacket_pair() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair")
}

/// `kiln __shim-zygote`: serve fork requests until the kiln process that
/// started it is gone.
pub fn run(_global: &Global, args: Args) -> anyhow::Result<i32> {
    // fork() below is only sound while this process has one thread.
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    anyhow::ensure!(
        threads == 1,
        "the shim zygote must be single-threaded (has {threads} threads)"
    );
    // SAFETY: the fd was passed to us for exactly this purpose.
    let sock = unsafe { OwnedFd::from_raw_fd(args.socket_fd) };
    set_cloexec(sock.as_raw_fd());
    let parent = pidfd_open(args.parent_pid).ok();
    // Reparented already: the kiln process died before we could watch it.
    let parent = match parent {
        Some(fd) if nix::unistd::getppid().as_raw() == args.parent_pid => fd,
        // Nothing to serve, and nothing to tell: it started one early (see
        // `start_early`) and ended before needing it.
        _ => return Ok(0),
    };
    // Keyboard and hang-up signals are meant for kiln, which ends us by
    // going away; our children get the defaults back.
    for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: setting a disposition to SIG_IGN, no handler.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let sigchld = sigchld_fd()?;
    send_fds(sock.as_fd(), b"ready", &[], MsgFlags::MSG_NOSIGNAL).context("greeting the kiln process")?;
    let mut zygote = Server {
        sock,
        sigchld,
        parent,
        children: HashMap::new(),
        spare: None,
    };
    zygote.spare = zygote.fork_spare();
    zygote.serve()?;
    Ok(0)
}

/// SIGCHLD blocked and readable on a signalfd instead (no handler, no thread).
fn sigchld_fd() -> anyhow::Result<OwnedFd> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().context("blocking SIGCHLD")?;
    // SAFETY: signalfd(2) on a valid sigset; returns a new fd or -1.
    let fd = unsafe { libc::signalfd(-1, set.as_ref(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    anyhow::ensure!(fd >= 0, "signalfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl(2) on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// The zygote's state.
struct Server {
    sock: OwnedFd,
    sigchld: OwnedFd,
    /// pidfd of the kiln process served.
    parent: OwnedFd,
    /// Each running child's status socket end, for its `shim-*` message.
    children: HashMap<i32, OwnedFd>,
    /// A child forked ahead, waiting for the next request (see [`Spare`]).
    spare: Option<Spare>,
}

/// A shim forked before its request comes: the request's fork then
/// happens beside the previous container, not before the next one. It waits
/// on its end of a socketpair for the request and its fds (as the zygote
/// got them), then runs exactly as a freshly forked shim; it exits when
/// that socket ends (the zygote is gone).
struct Spare {
    pid: i32,
    pidfd: OwnedFd,
    sock: OwnedFd,
}

impl Server {
    fn serve(&mut self) -> anyhow::Result<()> {
        loop {
            let mut fds = [&self.sock, &self.sigchld, &self.parent].map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: poll(2) on valid pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("poll");
            }
            if fds[1].revents != 0 {
                self.reap();
            }
            if fds[2].revents != 0 {
                return Ok(());
            }
            if fds[0].revents != 0 {
                let mut buf = vec![0u8; 64 * 1024];
                let (n, got) = recv_fds(self.sock.as_fd(), &mut buf, MsgFlags::empty())
                    .context("reading a request")?;
                if n == 0 {
                    return Ok(());
                }
                let reply = self.start_one(&buf[..n], got);
                let (text, pidfd) = match &reply {
                    Ok((pid, fd)) => (format!("ok {pid}"), Some(fd.as_raw_fd())),
                    Err(e) => (format!("error {e:#}"), None),
                };
                // A client that went away is seen at the next recv.
                let _ = send_fds(self.sock.as_fd(), text.as_bytes(), pidfd.as_slice(), MsgFlags::MSG_NOSIGNAL);
                drop(reply);
                if self.spare.is_none() {
                    self.spare = self.fork_spare();
                }
            }
        }
    }

    /// Start a shim for one request: hand it to the spare, else fork one.
    /// Its pid and a pidfd of it. The request is checked here either way,
    /// so a bad one gets the same `error` answer.
    fn start_one(&mut self, json: &[u8], fds: Vec<OwnedFd>) -> anyhow::Result<(i32, OwnedFd)> {
        let req: Request = serde_json::from_slice(json).context("parsing the request")?;
        let fds: [OwnedFd; 5] = fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| anyhow::anyhow!("expected 5 fds, got {}", v.len()))?;
        if let Some(spare) = self.spare.take() {
            let raw = fds.each_ref().map(AsRawFd::as_raw_fd);
            if send_fds(spare.sock.as_fd(), json, &raw, MsgFlags::MSG_NOSIGNAL).is_ok() {
                // Its copies are in the spare now; ours close here, but for
                // the status end, kept for the `shim-*` message.
                let [status, ..] = fds;
                self.children.insert(spare.pid, status);
                return Ok((spare.pid, spare.pidfd));
            }
            // Gone (killed?): reaped like any child; fork instead.
            // SAFETY: pidfd_send_signal(2) on a pidfd we own.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, spare.pidfd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32) };
        }
        self.fork_one(&req, fds)
    }

    /// Fork a [`Spare`]; `None` (and one fork per request) if that fails.
    fn fork_spare(&mut self) -> Option<Spare> {
        let (ours, theirs) = seqpacket_pair().ok()?;
        // SAFETY: this process has a single thread (checked at start), so
        // the child may run anything; it never returns here.
        match unsafe { nix::unistd::fork() }.ok()? {
            nix::unistd::ForkResult::Child => {
                drop(ours);
                await_request(theirs, self.parent.as_raw_fd())
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                let pid = child.as_raw();
                match pidfd_open(pid) {
                    Ok(pidfd) => Some(Spare { pid, pidfd, sock: ours }),
                    // Without a pidfd it cannot be handed out: let it go
                    // (its socket's end ends it).
                    Err(_) => None,
                }
            }
        }
    }

    /// Fork a shim for `req` on `fds` (status, spec, stdin, stdout,
    /// stderr); its pid and a pidfd of it.
    fn fork_one(&mut self, req: &Request, fds: [OwnedFd; 5]) -> anyhow::Result<(i32, OwnedFd)> {
        let [status, spec, stdin, stdout, stderr] = fds;
        // SAFETY: this process has a single thread (checked at start), so
        // the child may run anything; it never returns here.
        match unsafe { nix::unistd::fork() }.context("fork")? {
            nix::unistd::ForkResult::Child => {
                let fds = [stdin, stdout, stderr, status, spec];
                become_shim(req, fds, self.parent.as_raw_fd())
            }
            nix::unistd::ForkResult::Parent { child } => {
                let pid = child.as_raw();
                // Our copies of its stdio and spec close here: the client's
                // readers see EOF once the shim and container are gone.
                drop((spec, stdin, stdout, stderr));
                self.children.insert(pid, status);
                // Unreaped until the next reap() at the earliest: the pid
                // is still this child's.
                let pidfd = pidfd_open(pid).context("pidfd_open of the forked shim")?;
                Ok((pid, pidfd))
            }
        }
    }

    /// Reap the children that ended; tell each one's client how.
    fn reap(&mut self) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // Drain it; waitpid below finds every ended child anyway.
        while nix::unistd::read(self.sigchld.as_raw_fd(), &mut info).is_ok_and(|n| n > 0) {}
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            let (pid, msg) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, format!("shim-exit {code}")),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid, format!("shim-signal {}", sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            if let Some(status) = self.children.remove(&pid.as_raw()) {
                // Nonblocking: a client that stopped reading must not hang us.
                let _ = nix::sys::socket::send(
                    status.as_raw_fd(),
                    msg.as_bytes(),
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                );
            }
        }
    }
}

/// Between fork and exec (async-signal-safe, no allocation): dup
/// `sources` (at most 8) to `first`, `first + 1`, ... Each is first copied
/// above all targets (close-on-exec copies, left open), so that no dup2
/// overwrites a source that is still to be placed.
pub(crate) fn place_fds(sources: &[RawFd], first: RawFd) -> std::io::Result<()> {
    let mut high = [-1; 8];
    if sources.len() > high.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let above = first + sources.len() as RawFd;
    for (copy, fd) in high.iter_mut().zip(sources) {
        // SAFETY: fcntl(2) on an fd of this process.
        *copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
    }
    for (target, copy) in (first..).zip(&high[..sources.len()]) {
        // SAFETY: dup2(2) on fds of this process.
        if *copy < 0 || unsafe { libc::dup2(*copy, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A [`Spare`]'s life: keep only its socket (at 3) and the kiln pidfd (at
/// 4) of the zygote's fds, wait for a request, then become its shim.
fn await_request(sock: OwnedFd, parent: RawFd) -> ! {
    // SAFETY: prctl(2) with a static name; `ps` tells it from a shim.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"kiln-spare".as_ptr(), 0, 0, 0) };
    // Nothing else of the zygote's stays open here: other shims' status
    // ends held open by a spare would keep their clients from seeing the end.
    if place_fds(&[sock.into_raw_fd(), parent], 3).is_err() {
        // SAFETY: leaving the child at once.
        unsafe { libc::_exit(127) };
    }
    // SAFETY: close_range(2) on fds nothing in this process uses anymore.
    unsafe { libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32) };
    // SAFETY: placed at 3 just above, owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(3) };
    let mut buf = vec![0u8; 64 * 1024];
    let request = loop {
        match recv_fds(sock.as_fd(), &mut buf, MsgFlags::empty()) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok((n, fds)) if n > 0 => break (n, fds),
            // SAFETY: the zygote is gone (or the socket broke): leave.
            _ => unsafe { libc::_exit(0) },
        }
    };
    let (n, fds) = request;
    let req: Option<Request> = serde_json::from_slice(&buf[..n]).ok();
    let fds: Option<[OwnedFd; 5]> = fds.try_into().ok();
    let (Some(req), Some([status, spec, stdin, stdout, stderr])) = (req, fds) else {
        // SAFETY: the zygote checked the request before handing it over,
        // so this is a broken transfer; its client sees the `shim-exit`
        // the zygote sends when it reaps this process.
        unsafe { libc::_exit(125) };
    };
    drop(sock);
    become_shim(&req, [stdin, stdout, stderr, status, spec], 4)
}

/// In a freshly forked child: put `fds` (stdin, stdout, stderr, status,
/// spec) at 0..=4 and the kiln pidfd at 5, close everything else of the
/// zygote's, run the shim and `_exit` with its code.
fn become_shim(req: &Request, fds: [OwnedFd; 5], parent: RawFd) -> ! {
    // SAFETY: resetting this (single-threaded) process's signal mask and
    // dispositions to what an exec'd process would have.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        // Its command line is still the zygote's: `ps -o comm` tells them apart.
        libc::prctl(libc::PR_SET_NAME, c"kiln-shim".as_ptr(), 0, 0, 0);
    }
    let sources: Vec<RawFd> = fds
        .into_iter()
        .map(IntoRawFd::into_raw_fd)
        .chain([parent])
        .collect();
    if place_fds(&sources, 0).is_err() {
        // SAFETY: leaving the child at once, as after a failed exec.
        unsafe { libc::_exit(127) };
    }
    // The zygote's socket, signalfd, other children's status ends, and
    // the high copies: none of them is this shim's.
    // SAFETY: close_range(2) on fds nothing in this process uses anymore.
    unsafe { libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32) };
    for fd in 3..=5 {
        set_cloexec(fd);
    }
    let job = ShimJob {
        state_root: req.state_root.clone(),
        grace: Duration::from_millis(req.grace_ms),
        stdin: req.stdin,
        tty: req.tty.map(|(rows, cols)| WindowSize { rows, cols }),
        report_exit_early: req.report_exit_early,
        netns: req.netns.clone(),
    };
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: placed at 3, 4 and 5 just above, owned by nothing else.
        let (status, spec, parent) = unsafe {
            (
                OwnedFd::from_raw_fd(3),
                OwnedFd::from_raw_fd(4),
                OwnedFd::from_raw_fd(5),
            )
        };
        match serve(status, spec, || Ok((job, Some(parent)))) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("kiln: {e:#}");
                1
            }
        }
    }))
    .unwrap_or(101);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: ends this child without running the zygote's exit path.
    unsafe { libc::_exit(code) }
}
