//! [`ContainerExecutor`]: the solver's [`kiln_solver::Executor`] on top of
//! the container [`runtime`](crate::runtime).
//!
//! Each container runs in its own `kiln __container-shim` process
//! ([`Shim`]): libcontainer's cloned child exits through
//! `std::process::exit`, which takes std-internal locks that other threads
//! of a multi-threaded process (tokio's workers, log readers...) may hold
//! at the moment of the clone, and then hangs forever. The shim has a
//! single thread around the clone.
//!
//! Using a shim from async code: [`Shim::run`] runs a container to the
//! end (output to a [`LogSink`], dropping the future stops it). For more
//! control, call [`Shim::start`] in `spawn_blocking` with [`ShimOptions`]
//! (stdin pipe, pty, stop grace, a [`ShimStopper`] cloned beforehand to
//! cancel from elsewhere); the [`ShimProcess`] gives the stdin pipe or the
//! pty master (resize it with [`WindowSize::apply`]), and its blocking
//! [`ShimProcess::wait`] the exit code. A container never outlives its
//! shim: stop = SIGTERM, SIGKILL after the grace; a killed shim takes its
//! container along (`PR_SET_PDEATHSIG`); a shim killed mid-start leaves
//! state that the next [`Runtime::new`] sweeps.
//!
//! The shim is normally not exec'd per container but forked by a
//! [zygote](crate::zygote) (one `kiln __shim-zygote` per kiln process,
//! single-threaded too), which saves an exec of kiln per container;
//! `KILN_SHIM_ZYGOTE=0` turns that off.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio as ProcStdio;
use std::time::Duration;

use anyhow::Context;
use kiln_solver::worker::LogStream;
use kiln_solver::{ExecRequest, Executor, HostMountSource, LogSink};

use crate::runtime::tty::{WindowSize, recv_with_fd};
use crate::runtime::{
    ContainerSpec, Mount, MountSource, NetnsPool, NetworkMode, PooledNetns, Rootfs, Runtime,
};

/// Env var naming the `kiln` binary that runs containers (see [`Shim::find`]).
/// Its companion [`ZYGOTE_ENV`](crate::zygote::ZYGOTE_ENV), `KILN_SHIM_ZYGOTE=0`,
/// execs that binary per container instead of forking shims from a zygote.
pub const SHIM_ENV: &str = "KILN_SHIM";

/// How long a stopped container gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// How long past the grace period a shim that is still there gets before
/// it is SIGKILLed itself (its container then dies with it).
const SHIM_GRACE: Duration = Duration::from_secs(5);

/// Runs containers, each in a `kiln __container-shim` child process.
#[derive(Debug, Clone)]
pub struct Shim {
    exe: PathBuf,
    state_root: PathBuf,
    /// Fork shims from a zygote (else exec one per container).
    zygote: bool,
}

/// How a container run by a [`Shim`] is attached.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    /// Give the container a pipe as stdin ([`ShimProcess::take_stdin`]);
    /// otherwise it reads `/dev/null`.
    pub stdin: bool,
    /// Run it on a pseudo-terminal of this size ([`WindowSize::default`] =
    /// unknown): its input and output then go through
    /// [`ShimProcess::take_terminal`], not the pipe and the log sink.
    pub tty: Option<WindowSize>,
    /// After [`ShimStopper::stop`], how long the container has between
    /// SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Stops this container; clone it before [`Shim::start`] to be able to
    /// stop the container while it is still starting.
    pub stopper: ShimStopper,
    /// [`ShimProcess::wait`] returns as soon as the container has exited
    /// and its upperdir holds only its diff, while the shim tears down the
    /// rest (libcontainer state, state directory) on its own: what a build
    /// step needs before it commits, a few milliseconds sooner.
    pub report_exit_early: bool,
    /// The network namespace the container joins (a path that stays valid
    /// until it has exited, e.g. [`PooledNetns::path`]; libcontainer opens
    /// it while it creates the container) instead of making a fresh one;
    /// ignored with host networking.
    pub netns: Option<PathBuf>,
}

impl Default for ShimOptions {
    fn default() -> Self {
        ShimOptions {
            stdin: false,
            tty: None,
            grace: TERM_GRACE,
            stopper: ShimStopper::default(),
            report_exit_early: false,
            netns: None,
        }
    }
}

impl Shim {
    /// A shim running `exe __container-shim` (forked by `exe
    /// __shim-zygote` unless `KILN_SHIM_ZYGOTE=0`) with state under
    /// `state_root`.
    pub fn new(exe: impl Into<PathBuf>, state_root: impl Into<PathBuf>) -> Self {
        Shim {
            exe: exe.into(),
            state_root: state_root.into(),
            zygote: std::env::var_os(crate::zygote::ZYGOTE_ENV).is_none_or(|v| v != "0"),
        }
    }

    /// Fork shims from a zygote (`true`) or exec one per container.
    pub fn with_zygote(mut self, zygote: bool) -> Self {
        self.zygote = zygote;
        self
    }

    /// Pid of this process's zygote for this shim's binary and state
    /// root, while one runs.
    pub fn zygote_pid(&self) -> Option<u32> {
        crate::zygote::running_pid(&self.exe, &self.state_root)
    }

    /// The `kiln` binary, in this order: `$KILN_SHIM`; this executable if
    /// it is `kiln`; `kiln` next to it; `kiln` in its parent directory
    /// (cargo puts test binaries in `target/<profile>/deps/`, next to which
    /// `target/<profile>/kiln` lives).
    pub fn find(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        if let Some(exe) = std::env::var_os(SHIM_ENV) {
            return Ok(Shim::new(exe, state_root));
        }
        let me = std::env::current_exe().context("locating the kiln executable")?;
        if me.file_name().is_some_and(|n| n == "kiln") {
            return Ok(Shim::new(me, state_root));
        }
        let dir = me.parent().unwrap_or(Path::new("/"));
        for candidate in [dir.join("kiln"), dir.join("../kiln")] {
            if candidate.is_file() {
                return Ok(Shim::new(candidate, state_root));
            }
        }
        anyhow::bail!(
            "cannot find the kiln binary to run containers (not {} nor next to it); set {SHIM_ENV}",
            me.display()
        )
    }

    /// Start `spec` in a new shim; returns once the container's process
    /// runs (blocking: call it from `spawn_blocking` in async code). Its
    /// stdout/stderr go to `log` (without a tty). Errors starting it (bad
    /// spec, missing layer...) are returned here. A start that timed out
    /// ([`StartTimedOut`]: nothing of the container ran yet) is tried once
    /// more.
    pub fn start(
        &self,
        spec: &ContainerSpec,
        opts: ShimOptions,
        log: LogSink,
    ) -> anyhow::Result<ShimProcess> {
        match self.start_once(spec, opts.clone(), log.clone()) {
            Err(e) if e.is::<StartTimedOut>() => {
                tracing::warn!("{e}; trying once more");
                self.start_once(spec, opts, log)
            }
            other => other,
        }
    }

    fn start_once(
        &self,
        spec: &ContainerSpec,
        opts: ShimOptions,
        log: LogSink,
    ) -> anyhow::Result<ShimProcess> {
        let json = serde_json::to_vec(spec).context("encoding the container spec")?;
        let (status, shim_status) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .context("socketpair")?;
        let (spec_read, spec_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
        // Into the pipe before the shim exists when it fits there: the shim
        // reads it at once rather than waiting for this thread to have the
        // fork's answer.
        // SAFETY: fcntl(2) F_GETPIPE_SZ on a pipe we own.
        let capacity = unsafe { libc::fcntl(spec_write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let mut spec_write = Some(spec_write);
        if usize::try_from(capacity).is_ok_and(|c| json.len() <= c) {
            let early = spec_write.take().expect("just set");
            std::fs::File::from(early).write_all(&json).context("writing the container spec")?;
        }
        let forked = match self.zygote {
            true => self.fork(&opts, &shim_status, &spec_read)?,
            false => None,
        };
        let launched = match forked {
            Some(l) => l,
            None => self.exec(&opts, &shim_status, &spec_read)?,
        };
        drop(shim_status);
        drop(spec_read);
        let stopper = opts.stopper.clone();
        stopper.attach(launched.pidfd, opts.grace + SHIM_GRACE);
        let readers = [
            (launched.stdout, LogStream::Stdout),
            (launched.stderr, LogStream::Stderr),
        ]
        .into_iter()
        .map(|(fd, stream)| crate::runtime::spawn_reader(fd, stream, log.clone()))
        .collect::<Vec<_>>();
        let mut process = ShimProcess {
            stdin: launched.stdin,
            shim: Some(launched.shim),
            status,
            readers,
            container_pid: 0,
            terminal: None,
            last: None,
            stopper,
            teardown_unobserved: opts.report_exit_early,
        };
        if let Some(late) = spec_write {
            // A shim that died early closed its end: its status says why.
            let _ = std::fs::File::from(late).write_all(&json);
        }
        match process.next_message()? {
            (Some(started), fd) if started.starts_with("started ") => {
                process.container_pid = started["started ".len()..].parse().unwrap_or(0);
                process.terminal = fd;
                Ok(process)
            }
            (last, _) => {
                process.last = Some(last);
                match process.finish() {
                    Ok(code) => anyhow::bail!("container shim ended with {code} before starting"),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Have the zygote fork a shim on `status` and `spec`; `None` when no
    /// zygote runs here (exec one then).
    fn fork(
        &self,
        opts: &ShimOptions,
        status: &OwnedFd,
        spec: &OwnedFd,
    ) -> anyhow::Result<Option<Launched>> {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe");
        let (out_read, out_write) = pipe()?;
        let (err_read, err_write) = pipe()?;
        let stdin_pipe = opts.stdin && opts.tty.is_none();
        let (stdin_write, stdin_read) = if stdin_pipe {
            let (read, write) = pipe()?;
            (Some(write), read)
        } else {
            let null = std::fs::File::open("/dev/null").context("opening /dev/null")?;
            (None, OwnedFd::from(null))
        };
        let fds = crate::zygote::ShimFds {
            status: status.as_fd(),
            spec: spec.as_fd(),
            stdin: stdin_read.as_fd(),
            stdout: out_write.as_fd(),
            stderr: err_write.as_fd(),
        };
        let req = crate::zygote::Request {
            state_root: self.state_root.clone(),
            grace_ms: opts.grace.as_millis() as u64,
            stdin: stdin_pipe,
            tty: opts.tty.map(|s| (s.rows, s.cols)),
            report_exit_early: opts.report_exit_early,
            netns: opts.netns.clone(),
        };
        let Some(forked) = crate::zygote::fork_shim(&self.exe, &req, &fds)? else {
            return Ok(None);
        };
        Ok(Some(Launched {
            shim: ShimHandle::Forked(forked.pid),
            pidfd: Some(forked.pidfd),
            stdin: stdin_write.map(std::process::ChildStdin::from),
            stdout: out_read,
            stderr: err_read,
        }))
    }

    /// Exec `kiln __container-shim` on `status` and `spec`.
    fn exec(&self, opts: &ShimOptions, status: &OwnedFd, spec: &OwnedFd) -> anyhow::Result<Launched> {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("__container-shim")
            .arg("--state-root")
            .arg(&self.state_root)
            .args(["--status-fd", "3", "--spec-fd", "4"])
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .arg("--grace-ms")
            .arg(opts.grace.as_millis().to_string())
            .stdin(if opts.stdin && opts.tty.is_none() {
                ProcStdio::piped()
            } else {
                ProcStdio::null()
            })
            .stdout(ProcStdio::piped())
            .stderr(ProcStdio::piped());
        if opts.stdin && opts.tty.is_none() {
            cmd.arg("--stdin");
        }
        if let Some(size) = opts.tty {
            cmd.arg("--tty").arg(format!("{}x{}", size.rows, size.cols));
        }
        if opts.report_exit_early {
            cmd.arg("--report-exit-early");
        }
        if let Some(netns) = &opts.netns {
            cmd.arg("--netns").arg(netns);
        }
        let fds = [status.as_raw_fd(), spec.as_raw_fd()];
        // SAFETY: place_fds is async-signal-safe (no dup2 there
        // overwrites the other fd before it is placed).
        unsafe {
            cmd.pre_exec(move || crate::zygote::place_fds(&fds, 3));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} __container-shim", self.exe.display()))?;
        let pidfd = crate::commands::run::pidfd_open(child.id() as i32).ok();
        let stdout = child.stdout.take().context("the shim's stdout pipe")?;
        let stderr = child.stderr.take().context("the shim's stderr pipe")?;
        Ok(Launched {
            stdin: child.stdin.take(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            pidfd,
            shim: ShimHandle::Exec(child),
        })
    }

    /// Run `spec` to the end in a shim, its output going to `log`; returns
    /// its exit code (128+N if killed by signal N). Dropping the future
    /// stops the container (see [`ShimStopper::stop`]).
    pub async fn run(&self, spec: &ContainerSpec, log: LogSink) -> anyhow::Result<i32> {
        self.run_with(spec, ShimOptions::default(), log).await
    }

    /// [`Shim::run`] with `opts` (stdin and tty are not wired up here).
    pub async fn run_with(
        &self,
        spec: &ContainerSpec,
        opts: ShimOptions,
        log: LogSink,
    ) -> anyhow::Result<i32> {
        self.run_then(spec, opts, log, |_| {}).await
    }

    /// [`Shim::run_with`], then `ended` with the result once the container
    /// has exited or could not run, also when the future was dropped
    /// (it runs on a blocking thread: what it owns outlives the container).
    pub async fn run_then(
        &self,
        spec: &ContainerSpec,
        opts: ShimOptions,
        log: LogSink,
        ended: impl FnOnce(&anyhow::Result<i32>) + Send + 'static,
    ) -> anyhow::Result<i32> {
        let mut stop_on_drop = StopOnDrop(Some(opts.stopper.clone()));
        let shim = self.clone();
        let spec = spec.clone();
        let code = tokio::task::spawn_blocking(move || {
            let code = shim.start(&spec, opts, log).and_then(ShimProcess::wait);
            ended(&code);
            code
        })
        .await
        .context("container shim task panicked")?;
        stop_on_drop.0 = None;
        code
    }
}

/// The shim was ended by its start watchdog before the container's
/// process ran (see `START_TIMEOUT_SECS` in `commands::run`).
#[derive(Debug, thiserror::Error)]
#[error("the container did not start within {} s (its starter was stopped)", crate::commands::run::START_TIMEOUT_SECS)]
pub struct StartTimedOut;

/// Stops the container if the [`Shim::run`] future is dropped.
struct StopOnDrop(Option<ShimStopper>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.stop();
        }
    }
}

/// A shim just launched, before its container starts.
struct Launched {
    shim: ShimHandle,
    /// pidfd of the shim process, for its [`ShimStopper`].
    pidfd: Option<OwnedFd>,
    stdin: Option<std::process::ChildStdin>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// The shim process of a container.
enum ShimHandle {
    /// Exec'd by this process, which reaps it.
    Exec(std::process::Child),
    /// Forked by the zygote (pid), which reaps it.
    Forked(u32),
}

/// How a shim ended without saying `exit` or `error`.
enum ShimEnd {
    Signal(i32),
    Exit(Option<i32>),
}

/// A container running in a shim (from [`Shim::start`]). Dropping it
/// without [`ShimProcess::wait`] stops the container.
pub struct ShimProcess {
    shim: Option<ShimHandle>,
    status: OwnedFd,
    stdin: Option<std::process::ChildStdin>,
    terminal: Option<OwnedFd>,
    readers: Vec<std::thread::JoinHandle<()>>,
    container_pid: i32,
    /// The final status message, when it was read early.
    last: Option<Option<String>>,
    stopper: ShimStopper,
    /// [`ShimOptions::report_exit_early`]: after `exit N` an exec'd shim
    /// is reaped in the background (a forked one always is, by its zygote).
    teardown_unobserved: bool,
}

impl ShimProcess {
    /// Host pid of the container's first process.
    pub fn container_pid(&self) -> i32 {
        self.container_pid
    }

    /// Pid of the shim process (signals sent to it reach the container).
    pub fn shim_pid(&self) -> Option<u32> {
        match self.shim.as_ref()? {
            ShimHandle::Exec(c) => Some(c.id()),
            ShimHandle::Forked(pid) => Some(*pid),
        }
    }

    /// The container's stdin (with [`ShimOptions::stdin`], once); drop it
    /// to close the container's stdin.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.stdin.take()
    }

    /// The pty master (with [`ShimOptions::tty`], once): write the
    /// container's input to it, read its output from it (EIO once the
    /// container is gone), resize it with [`WindowSize::apply`].
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    /// What stops this container.
    pub fn stopper(&self) -> ShimStopper {
        self.stopper.clone()
    }

    /// Wait for the container to exit (blocking); returns its exit code
    /// (128+N if killed by signal N). Everything is cleaned up by then
    /// (with [`ShimOptions::report_exit_early`]: the container's output
    /// was all read, its upperdir holds only its diff, and the shim may
    /// still be tearing down the rest).
    pub fn wait(mut self) -> anyhow::Result<i32> {
        self.finish()
    }

    /// One status message (`None` at the end of the stream) and its fd.
    fn next_message(&mut self) -> anyhow::Result<(Option<String>, Option<OwnedFd>)> {
        let mut buf = vec![0u8; 64 * 1024];
        let (n, fd) = recv_with_fd(self.status.as_fd(), &mut buf)
            .context("reading the container shim's status")?;
        Ok((
            (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned()),
            fd,
        ))
    }

    /// Read the final status (and reap an exec'd shim), wait for the end
    /// of the output, return the exit code.
    fn finish(&mut self) -> anyhow::Result<i32> {
        let last = match self.last.take() {
            Some(m) => Ok(m),
            None => self.next_message().map(|(m, _)| m),
        };
        self.stdin = None;
        // The zygote's word on a forked shim that ended without its own.
        let mut end = last.as_ref().ok().and_then(|m| m.as_deref()).and_then(|m| {
            let num = |p: &str| m.strip_prefix(p).and_then(|n| n.parse().ok());
            num("shim-signal ")
                .map(ShimEnd::Signal)
                .or_else(|| num("shim-exit ").map(|c| ShimEnd::Exit(Some(c))))
        });
        let exited = matches!(&last, Ok(Some(line)) if line.starts_with("exit "));
        match self.shim.take() {
            // Reaped by its zygote; its `exit N` comes after its teardown
            // unless `report_exit_early`.
            Some(ShimHandle::Forked(_)) | None => {}
            Some(ShimHandle::Exec(mut child)) if exited && self.teardown_unobserved => {
                // It still tears down; `Runtime::new`'s sweep covers a crash.
                std::thread::spawn(move || child.wait());
            }
            Some(ShimHandle::Exec(mut child)) => {
                let status = child.wait().context("waiting for the container shim")?;
                end = Some(match status.signal() {
                    Some(sig) => ShimEnd::Signal(sig),
                    None => ShimEnd::Exit(status.code()),
                });
            }
        }
        self.stopper.detach();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let line = last?.unwrap_or_default();
        if let Some(code) = line.strip_prefix("exit ") {
            return code
                .parse()
                .with_context(|| format!("container shim status {line:?}"));
        }
        if let Some(msg) = line.strip_prefix("error ") {
            anyhow::bail!("{msg}");
        }
        match end {
            Some(ShimEnd::Signal(libc::SIGALRM)) if self.container_pid == 0 => {
                Err(StartTimedOut.into())
            }
            Some(ShimEnd::Signal(sig)) => anyhow::bail!("container shim killed by signal {sig}"),
            Some(ShimEnd::Exit(code)) => {
                anyhow::bail!("container shim exited with {code:?} without a status")
            }
            None => anyhow::bail!("container shim ended without a status (its zygote is gone)"),
        }
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        let Some(shim) = self.shim.take() else {
            return;
        };
        self.stopper.stop();
        // Reap it (and its output readers) without blocking the dropper.
        let readers = std::mem::take(&mut self.readers);
        std::thread::spawn(move || {
            if let ShimHandle::Exec(mut child) = shim {
                let _ = child.wait();
            }
            for r in readers {
                let _ = r.join();
            }
        });
    }
}

/// Stops a container running in a shim: SIGTERM to the shim, which
/// forwards it to the container and SIGKILLs it after the grace period;
/// should the shim itself hang, it is SIGKILLed a little later (and the
/// container dies with it). Cheap to clone; usable from any thread, also
/// before the container has started (it is then stopped as soon as it
/// runs) and after it ended (a no-op).
#[derive(Debug, Clone, Default)]
pub struct ShimStopper {
    inner: std::sync::Arc<std::sync::Mutex<StopperState>>,
}

#[derive(Debug, Default)]
struct StopperState {
    /// pidfd of the running shim (signals never reach a recycled pid).
    shim: Option<OwnedFd>,
    /// How long to wait after SIGTERM before SIGKILLing the shim.
    shim_grace: Duration,
    stopped: bool,
}

impl ShimStopper {
    /// Stop the container (idempotent).
    pub fn stop(&self) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.stopped {
            return;
        }
        st.stopped = true;
        if let Some(fd) = &st.shim {
            terminate(fd, st.shim_grace);
        }
    }

    /// Whether [`ShimStopper::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).stopped
    }

    fn attach(&self, pidfd: Option<OwnedFd>, shim_grace: Duration) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = pidfd else {
            return;
        };
        st.shim_grace = shim_grace;
        if st.stopped {
            terminate(&fd, shim_grace);
        }
        st.shim = Some(fd);
    }

    /// The container ended: nothing more to stop.
    fn detach(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).shim = None;
    }
}

/// SIGTERM to the shim behind `pidfd`, SIGKILL if it is still there after `grace`.
fn terminate(pidfd: &OwnedFd, grace: Duration) {
    pidfd_signal(pidfd, libc::SIGTERM);
    let Ok(fd) = pidfd.try_clone() else { return };
    std::thread::spawn(move || {
        // A pidfd becomes readable when its process exits.
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, grace.as_millis() as i32) };
        if ready == 0 {
            pidfd_signal(&fd, libc::SIGKILL);
        }
    });
}

fn pidfd_signal(fd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Env var that, set to `0`, gives every build step a fresh network
/// namespace instead of one lent by the executor's [`NetnsPool`].
pub const NETNS_POOL_ENV: &str = "KILN_NETNS_POOL";

/// Runs the solver's RUN steps as containers, each through a [`Shim`],
/// in network namespaces lent by a [`NetnsPool`] (unless host networking
/// or `KILN_NETNS_POOL=0`): consecutive steps share one rather than each
/// making and destroying its own (`kiln run` keeps a fresh one per
/// container).
#[derive(Debug, Clone)]
pub struct ContainerExecutor {
    shim: Shim,
    /// `None` with `KILN_NETNS_POOL=0`.
    netns: Option<NetnsPool>,
}

impl ContainerExecutor {
    /// An executor keeping container state under `state_root` (e.g.
    /// `<kiln root>/run`); cleans up what dead kiln processes left there and
    /// locates the `kiln` binary with [`Shim::find`].
    pub fn new(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let runtime = Runtime::new(state_root)?;
        Ok(ContainerExecutor::with_shim(Shim::find(runtime.state_root())?))
    }

    /// An executor running containers through `shim`.
    pub fn with_shim(shim: Shim) -> Self {
        if shim.zygote {
            // Its exec overlaps whatever comes before the first step (the
            // base image's pull).
            crate::zygote::start_early(&shim.exe, &shim.state_root);
        }
        let pool = std::env::var_os(NETNS_POOL_ENV).is_none_or(|v| v != "0");
        ContainerExecutor {
            shim,
            netns: pool.then(NetnsPool::new),
        }
    }

    /// The pool of network namespaces its steps run in (`None` with
    /// `KILN_NETNS_POOL=0`).
    pub fn netns_pool(&self) -> Option<&NetnsPool> {
        self.netns.as_ref()
    }
}

/// The runtime's view of a solver request.
pub fn container_spec(req: ExecRequest) -> ContainerSpec {
    let mounts = req
        .mounts
        .into_iter()
        .map(|m| Mount {
            target: PathBuf::from(m.target),
            source: match m.source {
                HostMountSource::Bind(p) => MountSource::Bind(p),
                HostMountSource::Layers(l) => MountSource::Layers(l),
                HostMountSource::Tmpfs(size) => MountSource::Tmpfs { size },
            },
            readonly: m.readonly,
        })
        .collect();
    ContainerSpec {
        name: None,
        rootfs: Rootfs {
            lower: req.lower,
            upper: req.upper,
            work: req.work,
        },
        args: req.args,
        env: req.env,
        cwd: req.cwd,
        user: req.user,
        mounts,
        network: req.network,
        hostname: req.hostname,
        limits: Default::default(),
    }
}

#[async_trait::async_trait]
impl Executor for ContainerExecutor {
    async fn exec(&self, req: ExecRequest, log: LogSink) -> anyhow::Result<i32> {
        let netns: Option<PooledNetns> = match &self.netns {
            Some(pool) if req.network != NetworkMode::Host => Some(pool.take()),
            _ => None,
        };
        let opts = ShimOptions {
            report_exit_early: true,
            netns: netns.as_ref().and_then(PooledNetns::path),
            ..Default::default()
        };
        // The lease holds the fd the container joins through: it is kept
        // until the container is gone, even if this future is dropped.
        let spec = container_spec(req);
        self.shim
            .run_then(&spec, opts, log, move |code| {
                // It has exited (`exit N` came): the namespace may be reused
                // once it holds no socket. After an error the lease drops and
                // the namespace is closed, never lent again.
                if let (Ok(_), Some(netns)) = (code, netns) {
                    netns.give_back();
                }
            })
            .await
    }
}
