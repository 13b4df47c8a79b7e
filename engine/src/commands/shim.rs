//! `kiln __container-shim` (hidden): run one container in this process.
//!
//! libcontainer must clone the container from a process with one thread
//! (see [`crate::runtime::Runtime::start`]); kiln's builder and daemon have
//! many, so they run each container through this subcommand (see
//! [`crate::executor::Shim`]). Protocol: the [`ContainerSpec`] as JSON on
//! stdin; the container's stdout/stderr are this process's; the result is
//! one line on the fd given by `--status-fd`: `exit <code>` or
//! `error <message>`. SIGTERM (and SIGINT/SIGHUP/SIGQUIT) are forwarded to
//! the container, which is then reaped and cleaned up as usual.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::Global;
use crate::runtime::{ContainerSpec, Output, Runtime, Stdin, Stdio};

/// Flags of `kiln __container-shim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The runtime's state directory (`<root>/run`).
    #[arg(long)]
    pub state_root: PathBuf,
    /// Inherited fd receiving the result line.
    #[arg(long)]
    pub status_fd: i32,
}

/// Run the container; the process exits with its exit code (125 when it
/// could not be run).
pub fn run(_global: &Global, args: Args) -> anyhow::Result<i32> {
    // SAFETY: the parent passed this fd to us for exactly this purpose.
    let mut status = unsafe { std::fs::File::from_raw_fd(args.status_fd) };
    // Keep it out of the container.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(args.status_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let result = run_spec(&args.state_root);
    let (line, code) = match result {
        Ok(code) => (format!("exit {code}\n"), code),
        Err(e) => (format!("error {e:#}\n"), 125),
    };
    status
        .write_all(line.as_bytes())
        .context("writing the shim status")?;
    Ok(code)
}

fn run_spec(state_root: &std::path::Path) -> anyhow::Result<i32> {
    let mut json = Vec::new();
    std::io::stdin()
        .read_to_end(&mut json)
        .context("reading the container spec from stdin")?;
    let spec: ContainerSpec =
        serde_json::from_slice(&json).context("parsing the container spec")?;
    let runtime = Runtime::new(state_root)?;
    let stdio = Stdio {
        stdin: Stdin::Null,
        output: Output::Inherit,
    };
    super::run::run_forwarding_signals(&runtime, &spec, stdio)
}
