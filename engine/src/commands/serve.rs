//! `kiln serve`: run the daemon (see [`crate::daemon`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Global;
use crate::daemon::{ServeOptions, serve, tls::TlsFiles};

/// `kiln serve` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen: `unix:///path` or `tcp://ADDR:PORT` (TCP needs the
    /// three TLS flags). Repeatable. Default: unix:///run/kiln.sock.
    #[arg(long = "listen", short = 'H', value_name = "URL")]
    pub listen: Vec<String>,
    /// The daemon's TLS certificate (PEM).
    #[arg(long, requires_all = ["tlskey", "tlscacert"])]
    pub tlscert: Option<PathBuf>,
    /// The daemon's TLS private key (PEM).
    #[arg(long, requires_all = ["tlscert", "tlscacert"])]
    pub tlskey: Option<PathBuf>,
    /// CA that client certificates must be signed by (PEM).
    #[arg(long, requires_all = ["tlscert", "tlskey"])]
    pub tlscacert: Option<PathBuf>,
    /// Seconds running requests get to finish after SIGTERM before they
    /// are cancelled.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
}

/// Serve until SIGTERM/SIGINT.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    init_logging();
    let mut hosts = args.listen;
    // `kiln --host URL serve` (or KILN_HOST) names the address to serve on.
    if hosts.is_empty() {
        hosts.push(global.host.clone().unwrap_or_else(|| "unix:///run/kiln.sock".to_string()));
    }
    let tls = match (args.tlscert, args.tlskey, args.tlscacert) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
        _ => None,
    };
    let mut global = global.clone();
    global.host = None;
    serve(&global, ServeOptions { hosts, tls, drain: Duration::from_secs(args.drain_timeout) })?;
    Ok(0)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
