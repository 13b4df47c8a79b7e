//! `kiln serve`: the daemon. It owns one store root and serves two HTTP
//! APIs over the same engine code the embedded commands use:
//!
//! - kiln's own, versioned under `/v1/...` ([`api`], documented in
//!   `docs/API.md`), which `kiln --host URL` speaks ([`crate::client`]);
//! - a subset of the Docker Engine API (`/_ping`, `/version`, `/v1.41/...`,
//!   [`docker`]) so the stock `docker` CLI works against kiln.
//!
//! Listeners: unix sockets (mode 0660) and TCP with mutual TLS only. SIGTERM
//! or SIGINT stops accepting, lets running requests finish for
//! [`ServeOptions::drain`], then cancels what is left (running containers are
//! killed) and exits.

pub mod api;
pub mod build;
pub mod containers;
pub mod context;
pub mod docker;
pub mod web;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kiln_cache::Store;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::config::Global;
use crate::registry::Registry;
use crate::runtime::Runtime;
use web::{ApiError, Body};

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `unix:///path` or `tcp://ADDR:PORT` addresses.
    pub hosts: Vec<String>,
    /// TLS files; required by any `tcp://` host.
    pub tls: Option<tls::TlsFiles>,
    /// How long running requests may take to finish after SIGTERM.
    pub drain: Duration,
}

/// What every request handler can reach.
pub struct State {
    /// The store this daemon owns.
    pub store: Arc<Store>,
    /// Registry access (mirrors, insecure hosts, credentials from the root).
    pub registry: Arc<Registry>,
    /// Runs containers, each in a single-threaded container shim process.
    pub shim: crate::executor::Shim,
    /// Containers created through the Docker API.
    pub containers: containers::ContainerTable,
    /// The solver every build shares (one cache, identical steps run once).
    pub solver: Arc<kiln_solver::Solver>,
    /// Laid-out build contexts, reused while unchanged.
    pub contexts: Arc<build::ContextCache>,
    /// The daemon's settings.
    pub global: Global,
    /// Becomes true when running work must be cancelled (drain timed out).
    pub cancel: watch::Receiver<bool>,
}

impl State {
    /// Resolves once running work must be cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// One parsed listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address, `ADDR:PORT`.
    Tcp(String),
}

impl ListenAddr {
    /// Parse `unix:///path` or `tcp://ADDR:PORT`.
    pub fn parse(host: &str) -> anyhow::Result<ListenAddr> {
        if let Some(path) = host.strip_prefix("unix://") {
            anyhow::ensure!(path.starts_with('/'), "--host {host:?}: the socket path must be absolute (unix:///path)");
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = host.strip_prefix("tcp://") {
            anyhow::ensure!(addr.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()), "--host {host:?}: expected tcp://ADDR:PORT");
            return Ok(ListenAddr::Tcp(addr.to_string()));
        }
        anyhow::bail!("--host {host:?}: expected unix:///path or tcp://ADDR:PORT")
    }
}

/// Run the daemon until SIGTERM/SIGINT. Blocking (starts its own runtime).
pub fn serve(global: &Global, options: ServeOptions) -> anyhow::Result<()> {
    let addrs = options.hosts.iter().map(|h| ListenAddr::parse(h)).collect::<anyhow::Result<Vec<_>>>()?;
    let tls = match (&options.tls, addrs.iter().any(|a| matches!(a, ListenAddr::Tcp(_)))) {
        (None, true) => anyhow::bail!(
            "kiln serve: TCP listeners need mutual TLS: give --tlscert, --tlskey and --tlscacert (refusing to serve plain TCP)"
        ),
        (Some(files), true) => Some(tls::server_config(files)?),
        _ => None,
    };
    let store = Arc::new(Store::open(&global.root)?);
    // One daemon per store root.
    let lock_path = global.root.join("locks").join("daemon.lock");
    let _owner = kiln_cache::lock::FileLock::try_exclusive(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
        .with_context(|| format!("another kiln daemon already serves the store {}", global.root.display()))?;
    let runtime = Runtime::for_store(&global.root)?;
    match runtime.sweep() {
        Ok(0) => {}
        Ok(n) => tracing::info!(containers = n, "removed leftovers of containers from a previous run"),
        Err(e) => tracing::warn!("sweeping old containers: {e:#}"),
    }
    let shim = crate::executor::Shim::find(runtime.state_root())?;
    let registry = Arc::new(Registry::from_global(global)?);
    // Contexts of earlier runs (and of builds a crash interrupted) go.
    let _ = std::fs::remove_dir_all(global.root.join("daemon").join("tmp"));
    let contexts = build::ContextCache::new(global.root.join("daemon").join("contexts"))?;
    let solver = build::shared_solver(store.clone(), registry.clone())?;
    let (containers, known) = containers::ContainerTable::open(global.root.join("daemon").join("containers"))?;
    if known > 0 {
        tracing::info!(containers = known, "containers of an earlier run (running ones are now exited)");
    }
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let state = Arc::new(State {
        store,
        registry,
        shim,
        containers,
        solver,
        contexts,
        global: global.clone(),
        cancel: cancel_rx,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_listeners(state, addrs, tls, options.drain, cancel_tx))
}

async fn run_listeners(
    state: Arc<State>,
    addrs: Vec<ListenAddr>,
    tls: Option<Arc<rustls::ServerConfig>>,
    drain: Duration,
    cancel: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut accept_loops = tokio::task::JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel::<futures::future::BoxFuture<'static, ()>>();
    let mut sockets = Vec::new();
    for addr in &addrs {
        match addr {
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path)?;
                tracing::info!(socket = %path.display(), "listening");
                sockets.push(path.clone());
                let (state, stop, conn_tx) = (state.clone(), stop_rx.clone(), conn_tx.clone());
                accept_loops.spawn(async move {
                    let mut stop2 = stop.clone();
                    loop {
                        tokio::select! {
                            _ = stopped(&mut stop2) => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => {
                                    let _ = conn_tx.send(Box::pin(serve_connection(state.clone(), stream, stop.clone(), "unix".into())));
                                }
                                Err(e) => tracing::warn!("accept on unix socket: {e}"),
                            }
                        }
                    }
                });
            }
            ListenAddr::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding tcp://{addr}"))?;
                tracing::info!(address = %listener.local_addr()?, "listening (mutual TLS)");
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone().context("TLS config missing")?);
                let (state, stop, conn_tx) = (state.clone(), stop_rx.clone(), conn_tx.clone());
                accept_loops.spawn(async move {
                    let mut stop2 = stop.clone();
                    loop {
                        tokio::select! {
                            _ = stopped(&mut stop2) => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, peer)) => {
                                    let (acceptor, state, stop) = (acceptor.clone(), state.clone(), stop.clone());
                                    let _ = conn_tx.send(Box::pin(async move {
                                        // A handshake that never finishes must not hold a slot forever.
                                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                                            Ok(Ok(tls_stream)) => serve_connection(state, tls_stream, stop, peer.to_string()).await,
                                            Ok(Err(e)) => tracing::warn!(%peer, "TLS handshake refused: {e}"),
                                            Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                                        }
                                    }));
                                }
                                Err(e) => tracing::warn!("accept on tcp: {e}"),
                            }
                        }
                    }
                });
            }
        }
    }
    drop(conn_tx);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break; }
            Some(conn) = conn_rx.recv() => { connections.spawn(conn); }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Stop accepting; idle connections close, busy ones finish their request.
    let _ = stop_tx.send(true);
    while accept_loops.join_next().await.is_some() {}
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    let started = Instant::now();
    let deadline = tokio::time::sleep(drain);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = connections.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(requests = connections.len(), "drain timeout: cancelling running requests");
                let _ = cancel.send(true);
                // Give cancelled work a moment to clean up, then drop it.
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while connections.join_next().await.is_some() {}
                }).await;
                connections.abort_all();
                break;
            }
        }
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "stopped");
    Ok(())
}

/// Bind a unix socket at `path` with mode 0660, replacing a stale socket
/// file but refusing when a live daemon answers there.
fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(meta.file_type().is_socket(), "{}: exists and is not a socket", path.display());
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{}: another daemon is listening there",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding unix://{}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

/// Serve HTTP/1 (with upgrades, for Docker's attach) on one connection until
/// it closes; on `stop`, finish the request in flight and close.
async fn serve_connection<S>(state: Arc<State>, stream: S, mut stop: watch::Receiver<bool>, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let (state, peer) = (state.clone(), peer.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(state, req, &peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(1 << 20)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection closed with an error: {e}");
                }
                return;
            }
            _ = stopped(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
                return;
            }
        }
    }
}

/// Resolves once `stop` is true (without holding the watch's lock).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Route one request and log it.
async fn handle(state: Arc<State>, req: hyper::Request<Incoming>, peer: &str) -> hyper::Response<Body> {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = route(state, req).await.unwrap_or_else(ApiError::into_response);
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        tracing::warn!(%method, %path, status = status.as_u16(), peer, ms = started.elapsed().as_millis() as u64, "request failed");
    } else {
        tracing::info!(%method, %path, status = status.as_u16(), peer, ms = started.elapsed().as_millis() as u64, "request");
    }
    response
}

async fn route(state: Arc<State>, req: hyper::Request<Incoming>) -> web::ApiResult {
    let path = web::percent_decode_path(req.uri().path())?;
    if let Some(rest) = path.strip_prefix("/v1/") {
        return api::route(state, req, rest.to_string()).await;
    }
    docker::route(state, req, &path).await
}
