//! `kiln run`: run a command in a container from an image in the local
//! store (or, for testing and debugging, from a plain rootfs directory).
//!
//! The container's stdout/stderr are kiln's, its exit code becomes kiln's,
//! and SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to kiln are forwarded to it. The
//! container's changes go to a throw-away upper directory: every container
//! is removed when it exits (`--rm` is accepted for compatibility).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, bail};
use kiln_frontend::image::ImageConfig;

use crate::config::Global;
use crate::runtime::{
    ContainerSpec, Limits, Mount, MountSource, NetworkMode, Output, Rootfs, Runtime, Stdin, Stdio,
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
    /// Allocate a pseudo-terminal (not supported yet).
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
    if args.tty {
        bail!("kiln run -t: pseudo-terminals are not supported yet (run without -t)");
    }
    let mut rest = args.args.clone();
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

    let runtime = Runtime::new(global.root.join("run"))?;
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
    let stdio = Stdio {
        stdin: if args.interactive {
            Stdin::Inherit
        } else {
            Stdin::Null
        },
        output: Output::Inherit,
    };
    run_forwarding_signals(&runtime, &spec, stdio)
}

/// Run `spec` to the end with SIGINT/SIGTERM/SIGHUP/SIGQUIT forwarded to
/// the container; returns its exit code. The calling process must have a
/// single thread (see [`Runtime::start`]); `kiln run` and the container
/// shim do.
pub(crate) fn run_forwarding_signals(
    runtime: &Runtime,
    spec: &ContainerSpec,
    stdio: Stdio,
) -> anyhow::Result<i32> {
    forward_signals();
    let running = runtime.start(spec, stdio)?;
    if let Some(pid) = running.pid() {
        CONTAINER_PID.store(pid, Ordering::SeqCst);
    }
    let code = running.wait();
    CONTAINER_PID.store(0, Ordering::SeqCst);
    code
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

extern "C" fn forward(sig: libc::c_int) {
    let pid = CONTAINER_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
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
