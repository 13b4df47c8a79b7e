//! `kiln __container-shim` (hidden): run one container in this process.
//!
//! libcontainer must clone the container from a process with one thread
//! (see [`crate::runtime::Runtime::start`]); kiln's builder and daemon have
//! many, so they run each container through this subcommand (see
//! [`crate::executor::Shim`], which speaks this protocol):
//! - the [`ContainerSpec`] as JSON on the fd given by `--spec-fd`, closed
//!   after it;
//! - the container's stdin is this process's with `--stdin`, else
//!   `/dev/null`; its stdout/stderr are this process's; with `--tty ROWSxCOLS`
//!   all three are a pty instead;
//! - on the `--status-fd` socket (SOCK_SEQPACKET), one message per event:
//!   `started <pid>` (with the pty master attached under `--tty`) once the
//!   container runs, then `exit <code>` or `error <message>`; with
//!   `--report-exit-early`, `exit <code>` comes as soon as the container's
//!   upperdir holds only its diff, stdout/stderr are closed with it, and
//!   the teardown follows;
//! - with `--netns PATH` the container joins that network namespace
//!   (`/proc/<kiln pid>/fd/<n>`, open in kiln until the container has
//!   exited) instead of a fresh loopback-only one;
//! - SIGTERM (and SIGINT/SIGHUP/SIGQUIT) are forwarded to the container,
//!   which gets `--grace-ms` to exit before it is SIGKILLed; the same
//!   happens when the process `--parent-pid` dies. The container's process
//!   dies with this one (`PR_SET_PDEATHSIG`), and a shim killed while
//!   starting one leaves state that the next kiln's sweep removes.
//!
//! A [zygote](crate::zygote) runs the same logic ([`serve`]) in a forked
//! child instead of an exec'd process, on the same fds and messages.

use std::cell::Cell;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::run::{Supervision, pidfd_open, run_supervised};
use crate::config::Global;
use crate::runtime::tty::{WindowSize, send_with_fd};
use crate::runtime::{ContainerSpec, Output, Runtime, Stdin, Stdio};

/// Flags of `kiln __container-shim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The runtime's state directory (`<root>/run`).
    #[arg(long)]
    pub state_root: PathBuf,
    /// Inherited unix socket (SOCK_SEQPACKET) receiving the status messages.
    #[arg(long)]
    pub status_fd: i32,
    /// Inherited fd to read the JSON container spec from.
    #[arg(long)]
    pub spec_fd: i32,
    /// The process this shim works for; the container is stopped when it dies.
    #[arg(long)]
    pub parent_pid: Option<i32>,
    /// Milliseconds between a forwarded SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 10_000)]
    pub grace_ms: u64,
    /// The container reads this process's stdin (else `/dev/null`).
    #[arg(long)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size, `ROWSxCOLS` (`0x0` = unknown).
    #[arg(long, value_name = "ROWSxCOLS")]
    pub tty: Option<String>,
    /// Send `exit <code>` as soon as the container has exited and its
    /// upperdir holds only its diff, and close stdout/stderr then; the
    /// teardown (libcontainer state, state directory) follows unobserved.
    #[arg(long)]
    pub report_exit_early: bool,
    /// Join this network namespace (e.g. `/proc/<pid>/fd/<n>`) instead of
    /// making a fresh loopback-only one (ignored with host networking).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
}

/// What a shim runs besides its fds: the flags of `kiln __container-shim`,
/// or a [zygote](crate::zygote)'s request.
pub(crate) struct ShimJob {
    /// The runtime's state directory.
    pub state_root: PathBuf,
    /// Between a forwarded SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The container reads this process's stdin (else `/dev/null`).
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size.
    pub tty: Option<WindowSize>,
    /// See [`Args::report_exit_early`].
    pub report_exit_early: bool,
    /// See [`Args::netns`].
    pub netns: Option<PathBuf>,
}

/// Run the container; the process exits with its exit code (125 when it
/// could not be run).
pub fn run(_global: &Global, args: Args) -> anyhow::Result<i32> {
    // SAFETY: the parent passed these fds to us for exactly this purpose.
    let status = unsafe { OwnedFd::from_raw_fd(args.status_fd) };
    // SAFETY: as above.
    let spec_fd = unsafe { OwnedFd::from_raw_fd(args.spec_fd) };
    serve(status, spec_fd, || {
        let parent = match args.parent_pid {
            Some(pid) => {
                let fd = pidfd_open(pid).ok();
                // Reparented already: the parent died before we could watch it.
                anyhow::ensure!(
                    fd.is_some() && nix::unistd::getppid().as_raw() == pid,
                    "the process that started this shim is gone"
                );
                fd
            }
            None => None,
        };
        let job = ShimJob {
            state_root: args.state_root.clone(),
            grace: Duration::from_millis(args.grace_ms),
            stdin: args.stdin,
            tty: args.tty.as_deref().map(parse_size).transpose()?,
            report_exit_early: args.report_exit_early,
            netns: args.netns.clone(),
        };
        Ok((job, parent))
    })
}

/// The shim's work, exec'd or forked by a zygote: read the spec from
/// `spec_fd`, run it as `setup` says (the job, and a pidfd of the process
/// whose death stops the container), report on `status`; returns the exit
/// code for this process.
pub(crate) fn serve(
    status: OwnedFd,
    spec_fd: OwnedFd,
    setup: impl FnOnce() -> anyhow::Result<(ShimJob, Option<OwnedFd>)>,
) -> anyhow::Result<i32> {
    // Keep them out of the container.
    for fd in [status.as_raw_fd(), spec_fd.as_raw_fd()] {
        // SAFETY: fcntl on fds we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let reported = Rc::new(Cell::new(None));
    let result = setup()
        .and_then(|(job, parent)| run_spec(&job, parent, spec_fd, status.as_fd(), &reported));
    if let Some(code) = reported.get() {
        // The caller has its answer; what went wrong after it is only logged.
        if let Err(e) = result {
            tracing::warn!("tearing down after the container exited: {e:#}");
        }
        return Ok(code);
    }
    let (line, code) = match result {
        Ok(code) => (format!("exit {code}"), code),
        Err(e) => (format!("error {e:#}"), 125),
    };
    send_with_fd(status.as_fd(), line.as_bytes(), None).context("writing the shim status")?;
    Ok(code)
}

fn run_spec(
    job: &ShimJob,
    parent: Option<OwnedFd>,
    spec_fd: OwnedFd,
    status: BorrowedFd<'_>,
    reported: &Rc<Cell<Option<i32>>>,
) -> anyhow::Result<i32> {
    let mut json = Vec::new();
    std::fs::File::from(spec_fd)
        .read_to_end(&mut json)
        .context("reading the container spec")?;
    let spec: ContainerSpec =
        serde_json::from_slice(&json).context("parsing the container spec")?;
    let runtime = Runtime::open(&job.state_root)?.joining_netns(job.netns.clone());
    let output = match job.tty {
        Some(size) => Output::Terminal(size),
        None => Output::Inherit,
    };
    let stdio = Stdio {
        stdin: if job.stdin {
            Stdin::Inherit
        } else {
            Stdin::Null
        },
        output,
    };
    let exited = job.report_exit_early.then(|| {
        let reported = reported.clone();
        let status_fd = status.as_raw_fd();
        Box::new(move |code: i32| -> anyhow::Result<()> {
            // The caller's output readers see their EOF now, not after the
            // teardown: the container's processes held the only other copies.
            let null = std::fs::File::options().write(true).open("/dev/null")?;
            for fd in [1, 2] {
                // SAFETY: dup2 onto this process's own stdout/stderr.
                if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                    return Err(std::io::Error::last_os_error()).context("closing the shim's output");
                }
            }
            // SAFETY: the status socket stays open until `run` returns.
            let status = unsafe { BorrowedFd::borrow_raw(status_fd) };
            send_with_fd(status, format!("exit {code}").as_bytes(), None)?;
            reported.set(Some(code));
            Ok(())
        }) as Box<dyn FnOnce(i32) -> anyhow::Result<()>>
    });
    let sup = Supervision {
        grace: job.grace,
        parent,
        exited,
    };
    run_supervised(&runtime, &spec, stdio, sup, |running| {
        let pid = running.pid().unwrap_or(0);
        // Sent, then closed here: the caller holds the only master.
        let master = running.take_terminal();
        send_with_fd(
            status,
            format!("started {pid}").as_bytes(),
            master.as_ref().map(|m| m.as_fd()),
        )
    })
}

/// `ROWSxCOLS`.
fn parse_size(s: &str) -> anyhow::Result<WindowSize> {
    let parsed = s
        .split_once('x')
        .and_then(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)));
    let (rows, cols) = parsed.with_context(|| format!("--tty {s:?}: expected ROWSxCOLS"))?;
    Ok(WindowSize { rows, cols })
}
