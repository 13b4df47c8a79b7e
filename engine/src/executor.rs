//! [`ContainerExecutor`]: the solver's [`kiln_solver::Executor`] on top of
//! the container [`runtime`](crate::runtime).
//!
//! Each container runs in its own `kiln __container-shim` process
//! ([`Shim`]): libcontainer's cloned child exits through
//! `std::process::exit`, which takes std-internal locks that other threads
//! of a multi-threaded process (tokio's workers, log readers...) may hold
//! at the moment of the clone, and then hangs forever. The shim has a
//! single thread around the clone.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio as ProcStdio;
use std::time::Duration;

use anyhow::Context;
use kiln_solver::worker::LogStream;
use kiln_solver::{ExecRequest, Executor, HostMountSource, LogSink};

use crate::runtime::{ContainerSpec, Mount, MountSource, Rootfs, Runtime};

/// Env var naming the `kiln` binary that runs containers (see [`Shim::find`]).
pub const SHIM_ENV: &str = "KILN_SHIM";

/// How long a cancelled container gets after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Runs containers, each in a `kiln __container-shim` child process.
#[derive(Debug, Clone)]
pub struct Shim {
    exe: PathBuf,
    state_root: PathBuf,
}

impl Shim {
    /// A shim running `exe __container-shim` with state under `state_root`.
    pub fn new(exe: impl Into<PathBuf>, state_root: impl Into<PathBuf>) -> Self {
        Shim {
            exe: exe.into(),
            state_root: state_root.into(),
        }
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

    /// Run `spec` to the end in a shim, its output going to `log`; returns
    /// its exit code (128+N if killed by signal N). Dropping the future
    /// stops the container: SIGTERM to the shim (which forwards it and
    /// cleans up), SIGKILL after a grace period.
    pub async fn run(&self, spec: &ContainerSpec, log: LogSink) -> anyhow::Result<i32> {
        let json = serde_json::to_vec(spec).context("encoding the container spec")?;
        let (status_read, status_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
        let status_fd = status_write.as_raw_fd();
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("__container-shim")
            .arg("--state-root")
            .arg(&self.state_root)
            .arg("--status-fd")
            .arg("3")
            .stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .stderr(ProcStdio::piped());
        // SAFETY: dup2 is async-signal-safe; it also clears CLOEXEC on fd 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(status_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} __container-shim", self.exe.display()))?;
        drop(status_write);
        let killer = KillOnDrop::new(child.id());
        let mut stdin = child.stdin.take().expect("piped stdin");
        let readers = [
            (child.stdout.take().map(OwnedFd::from), LogStream::Stdout),
            (child.stderr.take().map(OwnedFd::from), LogStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(fd, stream)| fd.map(|fd| spawn_reader(fd, stream, log.clone())))
        .collect::<Vec<_>>();
        let waited = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            // A shim that died early closes its stdin: its status says why.
            let _ = stdin.write_all(&json);
            drop(stdin);
            let status = child.wait().context("waiting for the container shim")?;
            for r in readers {
                let _ = r.join();
            }
            let mut line = String::new();
            let _ = std::fs::File::from(status_read).read_to_string(&mut line);
            Ok((status, line))
        })
        .await
        .context("container shim task panicked")?;
        killer.disarm();
        let (status, line) = waited?;
        let line = line.trim_end();
        if let Some(code) = line.strip_prefix("exit ") {
            return code
                .parse()
                .with_context(|| format!("container shim status {line:?}"));
        }
        if let Some(msg) = line.strip_prefix("error ") {
            anyhow::bail!("{msg}");
        }
        match (status.code(), status.signal()) {
            (_, Some(sig)) => anyhow::bail!("container shim killed by signal {sig}"),
            (code, _) => anyhow::bail!("container shim exited with {code:?} without a status"),
        }
    }
}

/// Stops a shim whose [`Shim::run`] future is dropped before it ends.
struct KillOnDrop {
    /// pidfd of the shim (signals can never reach a recycled pid).
    pidfd: Option<OwnedFd>,
}

impl KillOnDrop {
    fn new(pid: u32) -> Self {
        // SAFETY: pidfd_open(2) with no flags; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        KillOnDrop {
            // SAFETY: a fresh fd we own.
            pidfd: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        }
    }

    fn disarm(mut self) {
        self.pidfd = None;
    }
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

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(fd) = self.pidfd.take() else { return };
        pidfd_signal(&fd, libc::SIGTERM);
        // The blocking task still reaps the shim; this only escalates.
        std::thread::spawn(move || {
            // A pidfd becomes readable when its process exits.
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, TERM_GRACE.as_millis() as i32) };
            if ready == 0 {
                pidfd_signal(&fd, libc::SIGKILL);
            }
        });
    }
}

fn spawn_reader(read: OwnedFd, stream: LogStream, sink: LogSink) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(read);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink(stream, &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

/// Runs the solver's RUN steps as containers, each through a [`Shim`].
#[derive(Debug, Clone)]
pub struct ContainerExecutor {
    shim: Shim,
}

impl ContainerExecutor {
    /// An executor keeping container state under `state_root` (e.g.
    /// `<kiln root>/run`); cleans up what dead kiln processes left there and
    /// locates the `kiln` binary with [`Shim::find`].
    pub fn new(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let runtime = Runtime::new(state_root)?;
        Ok(ContainerExecutor {
            shim: Shim::find(runtime.state_root())?,
        })
    }

    /// An executor running containers through `shim`.
    pub fn with_shim(shim: Shim) -> Self {
        ContainerExecutor { shim }
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
        self.shim.run(&container_spec(req), log).await
    }
}
