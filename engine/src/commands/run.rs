//! `kiln run`: run a command in a container from an image in the local
//! store (or, for testing and debugging, from a plain rootfs directory).
//!
//! The container's stdout/stderr are kiln's, its exit code becomes kiln's,
//! and SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to kiln are forwarded to it. The
//! container's changes go to a throw-away upper directory: every container
//! is removed when it exits (`--rm` is accepted for compatibility).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_frontend::image::ImageConfig;

use crate::config::Global;
use crate::runtime::tty::{RawMode, WindowSize};
use crate::runtime::{
    ContainerSpec, Limits, Mount, MountSource, NetworkMode, Output, Rootfs, Running, Runtime,
    Stdin, Stdio,
};

/// `kiln run` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove the container when it exits (always done; accepted for compatibility).
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open: the container reads kiln's stdin.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal (with `-i`: kiln's terminal goes raw and
    /// is the container's input).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable, `KEY=VALUE` (or `KEY` to copy kiln's).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Bind mount `HOST:CONTAINER[:ro|rw]`.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volumes: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    pub workdir: Option<String>,
    /// `name|uid[:group|gid]`.
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// `none` (only loopback), `host`, or `default` (for now: only loopback too).
    #[arg(long, default_value = "default")]
    pub network: String,
    /// Memory limit, e.g. `64m`, `1g`, or bytes.
    #[arg(long, short = 'm')]
    pub memory: Option<String>,
    /// CPU limit in CPUs, e.g. `0.5`.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Override the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Container name.
    #[arg(long)]
    pub name: Option<String>,
    /// Container hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Use this directory as the (read-only) rootfs instead of an image.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// `IMAGE [CMD...]`, or just `CMD...` with `--rootfs`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "IMAGE [CMD]..."
    )]
    pub args: Vec<String>,
}

/// What a container is started from: layer dirs and the image config.
pub struct ImageRootfs {
    /// Layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The image's config (env, entrypoint, cmd, workdir, user).
    pub config: ImageConfig,
}

/// Look `image` up in the local image store (name, ID or digest) and
/// unpack its layers if needed. Images are not pulled implicitly.
pub fn resolve_image(global: &Global, image: &str) -> anyhow::Result<ImageRootfs> {
    let store = kiln_cache::Store::open(&global.root)?;
    let (layers, config) =
        crate::daemon::containers::image_rootfs(&store, image).with_context(|| {
            format!("kiln run {image}: not in the local image store (try `kiln pull {image}`)")
        })?;
    anyhow::ensure!(
        !layers.is_empty(),
        "kiln run {image}: the image has no layers to run"
    );
    Ok(ImageRootfs { layers, config })
}

/// Run the container; returns its exit code.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let mut rest = args.args.clone();
    // Held until the container exits: GC keeps the image's layers.
    let mut _lease = None;
    let image = match &args.rootfs {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--rootfs {}: not a directory", dir.display());
            ImageRootfs {
                layers: vec![std::fs::canonicalize(dir)?],
                config: ImageConfig::default(),
            }
        }
        None => {
            anyhow::ensure!(
                !rest.is_empty(),
                "kiln run: give an IMAGE (or --rootfs DIR)"
            );
            let name = rest.remove(0);
            let store = kiln_cache::Store::open(&global.root)?;
            _lease = Some(kiln_cache::lease::Lease::new(&store, "run")?);
            resolve_image(global, &name)?
        }
    };
    let argv = command_line(&image.config, args.entrypoint.as_deref(), &rest)?;
    let network = match args.network.as_str() {
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        "default" | "bridge" => NetworkMode::Default,
        other => bail!("--network {other:?}: expected none, host or default"),
    };
    let mut env = image.config.env.clone();
    for e in &args.env {
        let kv = match e.split_once('=') {
            Some(_) => e.clone(),
            None => match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            },
        };
        let key = kv.split('=').next().unwrap_or_default().to_string();
        env.retain(|old| old.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    let mounts = args
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limits = Limits {
        memory_bytes: args.memory.as_deref().map(parse_bytes).transpose()?,
        cpus: match args.cpus {
            Some(c) if !(c > 0.0) => bail!("--cpus {c}: must be greater than 0"),
            c => c,
        },
    };

    let runtime = Runtime::for_store(&global.root)?;
    let spec = ContainerSpec {
        name: args.name.clone(),
        rootfs: Rootfs::throwaway(image.layers),
        args: argv,
        env,
        cwd: args
            .workdir
            .clone()
            .unwrap_or_else(|| image.config.working_dir.clone()),
        user: args
            .user
            .clone()
            .unwrap_or_else(|| image.config.user.clone()),
        mounts,
        network,
        hostname: args.hostname.clone().unwrap_or_default(),
        limits,
    };
    if args.tty {
        return run_on_terminal(global, &spec, args.interactive);
    }
    let stdio = Stdio {
        stdin: if args.interactive {
            Stdin::Inherit
        } else {
            Stdin::Null
        },
        output: Output::Inherit,
    };
    let sup = Supervision {
        grace: STOP_GRACE,
        parent: None,
        exited: None,
    };
    run_supervised(&runtime, &spec, stdio, sup, |_| Ok(()))
}

/// `kiln run -t`: the container runs on a pty in a shim (a process of its
/// own, as for every container kiln's builder and daemon run); this
/// process copies between the pty and its own stdin/stdout, with its
/// terminal raw (with `-i`) and window size changes passed on.
fn run_on_terminal(
    global: &Global,
    spec: &ContainerSpec,
    interactive: bool,
) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    let runtime = Runtime::for_store(&global.root)?;
    let shim = crate::executor::Shim::new(exe, runtime.state_root());
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let size = WindowSize::of(stdin.as_fd())
        .or_else(|| WindowSize::of(stdout.as_fd()))
        .unwrap_or_default();
    let opts = crate::executor::ShimOptions {
        tty: Some(size),
        grace: STOP_GRACE,
        ..Default::default()
    };
    // The shim's own messages (the container's output is on the pty).
    let log: crate::runtime::LogSink = std::sync::Arc::new(|_, bytes: &[u8]| {
        let _ = std::io::stderr().write_all(bytes);
    });
    forward_signals();
    let winch = winch_pipe()?;
    let mut process = shim.start(spec, opts, log)?;
    if let Some(pid) = process.shim_pid() {
        // The shim forwards them to the container (and enforces the grace).
        CONTAINER_PID.store(pid as i32, Ordering::SeqCst);
    }
    let master = process
        .take_terminal()
        .context("the shim sent no terminal")?;
    let raw = if interactive {
        RawMode::enable(stdin.as_fd()).ok()
    } else {
        RawMode::output_only(stdout.as_fd()).ok()
    };
    let copied = copy_terminal(&master, interactive, &winch);
    drop(raw);
    drop(master);
    let code = process.wait();
    CONTAINER_PID.store(0, Ordering::SeqCst);
    copied?;
    code
}

/// Copy the pty `master` to stdout (and stdin to it, if `input`) until the
/// container closes it; on SIGWINCH (a byte on `winch`), pass the size of
/// our terminal on.
fn copy_terminal(master: &OwnedFd, mut input: bool, winch: &OwnedFd) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = std::io::stdout().lock();
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: winch.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if input {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: poll(2) on valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[1].revents != 0 {
            let _ = nix::unistd::read(winch.as_raw_fd(), &mut buf);
            let stdin = std::io::stdin();
            if let Some(size) = WindowSize::of(stdin.as_fd()) {
                let _ = size.apply(master.as_fd());
            }
        }
        if input && fds[2].revents != 0 {
            match nix::unistd::read(0, &mut buf) {
                Ok(0) | Err(_) => input = false,
                Ok(n) => write_all_fd(master, &buf[..n])
                    .context("writing to the container's terminal")?,
            }
        }
        if fds[0].revents != 0 {
            match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                // EIO: every process on the slave side is gone.
                Ok(0) | Err(nix::errno::Errno::EIO) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("reading the container's terminal"),
                Ok(n) => {
                    out.write_all(&buf[..n])?;
                    out.flush()?;
                }
            }
        }
    }
    Ok(())
}

fn write_all_fd(fd: &OwnedFd, mut data: &[u8]) -> anyhow::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Write end of the pipe the SIGWINCH handler pokes (-1 = none).
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops it.
        unsafe { libc::write(fd, [0u8].as_ptr().cast(), 1) };
    }
}

/// A pipe that receives a byte on every SIGWINCH; returns its read end.
fn winch_pipe() -> anyhow::Result<OwnedFd> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .context("pipe")?;
    // Lives as long as the process: the handler may run any time.
    WINCH_FD.store(std::os::fd::IntoRawFd::into_raw_fd(write), Ordering::SeqCst);
    // SAFETY: installing a handler that only calls async-signal-safe code.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_winch as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGWINCH, &act, std::ptr::null_mut());
    }
    Ok(read)
}

/// How long a container gets between a forwarded SIGTERM (or SIGINT,
/// SIGHUP, SIGQUIT) and SIGKILL, as `docker stop`.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);

/// How [`run_supervised`] stops its container.
pub(crate) struct Supervision {
    /// After the first forwarded terminating signal, the container gets
    /// this long to exit before it is killed.
    pub grace: Duration,
    /// A pidfd of the process that asked for this container: when it dies,
    /// the container is stopped as if SIGTERM had arrived.
    pub parent: Option<OwnedFd>,
    /// Called with the exit code before the teardown (see
    /// [`Running::wait_reporting_exit`]).
    pub exited: Option<Box<dyn FnOnce(i32) -> anyhow::Result<()>>>,
}

/// Seconds a container may take to start before the starting process is
/// ended by SIGALRM (a start takes tens of milliseconds).
pub(crate) const START_TIMEOUT_SECS: u32 = 120;

/// Run `spec` to the end with SIGINT/SIGTERM/SIGHUP/SIGQUIT forwarded to
/// the container, which is SIGKILLed if it is still there `sup.grace`
/// after the first of them; returns its exit code. `started` runs once the
/// container's process runs. The calling process must have a single
/// thread (see [`Runtime::start`]); `kiln run` and the container shim do.
pub(crate) fn run_supervised(
    runtime: &Runtime,
    spec: &ContainerSpec,
    stdio: Stdio,
    mut sup: Supervision,
    started: impl FnOnce(&mut Running) -> anyhow::Result<()>,
) -> anyhow::Result<i32> {
    forward_signals();
    // A watchdog on the start: libcontainer waits on its children's
    // messages with no timeout, and a child that died without a word would
    // hang this process forever. SIGALRM's default action ends it instead
    // (the shim's caller then sees a start that timed out). alarm(2) needs
    // no thread, and fork clears it in the children.
    // SAFETY: alarm(2) has no memory effects.
    unsafe { libc::alarm(START_TIMEOUT_SECS) };
    let started_or_not = runtime.start(spec, stdio);
    // SAFETY: as above; 0 cancels it.
    unsafe { libc::alarm(0) };
    let mut running = started_or_not?;
    let pid = running.pid().context("the container has no process")?;
    CONTAINER_PID.store(pid, Ordering::SeqCst);
    let result = started(&mut running).and_then(|()| supervise(pid, &mut sup));
    CONTAINER_PID.store(0, Ordering::SeqCst);
    // On error `running` drops, which kills the container and cleans up.
    result?;
    match sup.exited.take() {
        Some(exited) => running.wait_reporting_exit(exited),
        None => running.wait(),
    }
}

/// Wait until process `pid` (our child) exits, stopping it as `sup` says.
fn supervise(pid: i32, sup: &mut Supervision) -> anyhow::Result<()> {
    let child = pidfd_open(pid).context("pidfd_open of the container")?;
    let mut deadline: Option<Instant> = None;
    loop {
        let stop = STOP_SIGNAL.load(Ordering::SeqCst);
        if stop != 0 && deadline.is_none() {
            // The handler may have run before the pid was known.
            if !FORWARDED.swap(true, Ordering::SeqCst) {
                // SAFETY: kill(2) of our own unreaped child.
                unsafe { libc::kill(pid, stop) };
            }
            deadline = Some(Instant::now() + sup.grace);
        }
        let timeout = match deadline {
            None => -1,
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32,
        };
        let mut fds = vec![libc::pollfd {
            fd: child.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(parent) = &sup.parent {
            fds.push(libc::pollfd {
                fd: parent.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: poll(2) on valid pollfds; a signal interrupts it (EINTR).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n > 0 && fds[0].revents != 0 {
            return Ok(());
        }
        if n > 0 && fds.get(1).is_some_and(|p| p.revents != 0) {
            tracing::info!("the process that started the container died: stopping it");
            sup.parent = None;
            let _ =
                STOP_SIGNAL.compare_exchange(0, libc::SIGTERM, Ordering::SeqCst, Ordering::SeqCst);
        }
        if n == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("the container outlived its stop grace period: killing it");
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // Now just wait for it to go.
            deadline = Some(Instant::now() + Duration::from_secs(3600 * 24 * 365));
        }
    }
}

/// `pidfd_open(2)`: an fd that becomes readable when process `pid` exits.
pub(crate) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The argv: entrypoint (flag or image) + CMD (given or image's).
fn command_line(
    config: &ImageConfig,
    entrypoint: Option<&str>,
    cmd: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut argv = match entrypoint {
        Some("") => Vec::new(),
        Some(e) => vec![e.to_string()],
        None => config.entrypoint.clone().unwrap_or_default(),
    };
    if !cmd.is_empty() {
        argv.extend(cmd.iter().cloned());
    } else if entrypoint.is_none() {
        argv.extend(config.cmd.clone().unwrap_or_default());
    }
    anyhow::ensure!(
        !argv.is_empty(),
        "kiln run: no command given and the image has none"
    );
    Ok(argv)
}

/// `HOST:CTR[:ro|rw]`.
pub(crate) fn parse_volume(v: &str) -> anyhow::Result<Mount> {
    let parts: Vec<&str> = v.split(':').collect();
    let (host, target, readonly) = match parts.as_slice() {
        [h, c] => (h, c, false),
        [h, c, "ro"] => (h, c, true),
        [h, c, "rw"] => (h, c, false),
        _ => bail!("-v {v:?}: expected HOST:CONTAINER[:ro|rw]"),
    };
    let host =
        std::fs::canonicalize(host).with_context(|| format!("-v {v:?}: host path {host}"))?;
    anyhow::ensure!(
        target.starts_with('/'),
        "-v {v:?}: the container path must be absolute"
    );
    Ok(Mount {
        target: PathBuf::from(target),
        source: MountSource::Bind(host),
        readonly,
    })
}

/// `123`, `64k`, `64m`, `1g` (binary units, case-insensitive, optional `b`).
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("--memory {s:?}: expected e.g. 64m, 1g or a byte count"))?;
    anyhow::ensure!(n > 0.0, "--memory {s:?}: must be positive");
    Ok((n * mult as f64) as i64)
}

/// Host pid of the running container (0 = none), for the signal handler.
static CONTAINER_PID: AtomicI32 = AtomicI32::new(0);

/// The first terminating signal received (0 = none yet).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Whether a terminating signal already reached the container.
static FORWARDED: AtomicBool = AtomicBool::new(false);

extern "C" fn forward(sig: libc::c_int) {
    let _ = STOP_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let pid = CONTAINER_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
        FORWARDED.store(true, Ordering::SeqCst);
    }
}

/// Forward SIGINT, SIGTERM, SIGHUP and SIGQUIT to the container.
fn forward_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing a handler that only calls async-signal-safe code.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512kb").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn parses_volumes() {
        let m = parse_volume("/tmp:/data:ro").unwrap();
        assert!(m.readonly);
        assert_eq!(m.target, PathBuf::from("/data"));
        assert!(parse_volume("/tmp:data").is_err());
        assert!(parse_volume("/tmp").is_err());
    }

    #[test]
    fn command_line_combines_entrypoint_and_cmd() {
        let mut c = ImageConfig::default();
        c.entrypoint = Some(vec!["/bin/sh".into(), "-c".into()]);
        c.cmd = Some(vec!["echo hi".into()]);
        assert_eq!(
            command_line(&c, None, &[]).unwrap(),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(
            command_line(&c, None, &["true".into()]).unwrap(),
            vec!["/bin/sh", "-c", "true"]
        );
        assert_eq!(
            command_line(&c, Some("/bin/true"), &[]).unwrap(),
            vec!["/bin/true"]
        );
        assert!(command_line(&ImageConfig::default(), None, &[]).is_err());
    }
}
