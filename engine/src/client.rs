//! The remote side of kiln's commands: with `--host URL` (or `KILN_HOST`)
//! a command sends its request to a `kiln serve` daemon over the `/v1` API
//! (see `docs/API.md`) and prints what the daemon answers exactly as the
//! embedded command would, with the same exit code.
//!
//! Addresses: `unix:///path`, or `tcp://HOST:PORT` with mutual TLS. The TLS
//! files come from `KILN_TLS_CACERT`, `KILN_TLS_CERT` and `KILN_TLS_KEY`, or
//! from `ca.pem`, `cert.pem` and `key.pem` in `KILN_CERT_PATH` (as with
//! Docker's `DOCKER_CERT_PATH`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_cache::images::ImageRecord;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::commands::{self, Command};
use crate::config::Global;
use crate::daemon::api::{LoginRequest, LoginResult, PullRequest, PullResult, PushResult, RunEvent, SaveRequest, TagRequest};
use crate::daemon::containers::RunRequest;
use crate::daemon::tls::{TlsFiles, client_config};
use crate::daemon::web::{Body, full};

/// Where the daemon is.
enum Target {
    Unix(PathBuf),
    Tls { addr: String, server_name: rustls::pki_types::ServerName<'static>, config: Arc<rustls::ClientConfig> },
}

/// A connection factory for one daemon: every request opens a connection.
pub struct Client {
    target: Target,
    host: String,
}

impl Client {
    /// A client for `host` (`unix:///path` or `tcp://HOST:PORT`).
    pub fn new(host: &str) -> anyhow::Result<Client> {
        let target = if let Some(path) = host.strip_prefix("unix://") {
            Target::Unix(PathBuf::from(path))
        } else if let Some(addr) = host.strip_prefix("tcp://") {
            let (name, _port) = addr.rsplit_once(':').with_context(|| format!("--host {host:?}: expected tcp://HOST:PORT"))?;
            let server_name = rustls::pki_types::ServerName::try_from(name.trim_matches(['[', ']']).to_string())
                .with_context(|| format!("--host {host:?}: bad host name"))?;
            let config = client_config(&tls_files_from_env().with_context(|| format!("--host {host}: TCP needs mutual TLS"))?)?;
            Target::Tls { addr: addr.to_string(), server_name, config }
        } else {
            bail!("--host {host:?}: expected unix:///path or tcp://HOST:PORT");
        };
        Ok(Client { target, host: host.to_string() })
    }

    /// Send one request; the response body is left to the caller.
    pub async fn send(&self, method: Method, path: &str, body: Body, content_type: Option<&str>) -> anyhow::Result<Response<Incoming>> {
        self.send_with(method, path, body, content_type, &[]).await
    }

    /// [`Client::send`] with more headers (e.g. an `Upgrade`).
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: Option<&str>,
        headers: &[(header::HeaderName, &str)],
    ) -> anyhow::Result<Response<Incoming>> {
        let mut builder = Request::builder().method(method.clone()).uri(path).header(header::HOST, "kiln");
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        for (name, value) in headers {
            builder = builder.header(name, *value);
        }
        let request = builder.body(body)?;
        let what = || format!("{method} {path} on {}", self.host);
        match &self.target {
            Target::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .with_context(|| format!("connecting to the kiln daemon at unix://{} (is `kiln serve` running?)", socket.display()))?;
                exchange(stream, request).await.with_context(what)
            }
            Target::Tls { addr, server_name, config } => {
                let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to tcp://{addr}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server_name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with tcp://{addr}"))?;
                exchange(tls, request).await.with_context(what)
            }
        }
    }

    /// Send JSON (or nothing) and parse a JSON answer; an error status
    /// becomes an error carrying the daemon's message.
    pub async fn json<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<&impl Serialize>) -> Result<T, RemoteError> {
        let body = match body {
            Some(b) => full(serde_json::to_vec(b).map_err(|e| RemoteError::Other(e.into()))?),
            None => full(Bytes::new()),
        };
        let response = self.send(method, path, body, Some("application/json")).await.map_err(RemoteError::Other)?;
        let response = check(response).await?;
        let bytes = response.into_body().collect().await.map_err(|e| RemoteError::Other(e.into()))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| RemoteError::Other(anyhow::anyhow!("the daemon's answer is not the expected JSON: {e}")))
    }
}

/// Run the HTTP/1 exchange on an open stream.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, request: Request<Body>) -> anyhow::Result<Response<Incoming>> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("daemon connection: {e}");
        }
    });
    Ok(sender.send_request(request).await?)
}

/// An error answer from the daemon, or a failure to get one.
#[derive(Debug)]
pub enum RemoteError {
    /// The daemon answered with this status and message.
    Status(StatusCode, String),
    /// No usable answer.
    Other(anyhow::Error),
}

impl From<RemoteError> for anyhow::Error {
    fn from(e: RemoteError) -> anyhow::Error {
        match e {
            RemoteError::Status(_, message) => anyhow::anyhow!("{message}"),
            RemoteError::Other(e) => e,
        }
    }
}

/// Turn an error status into [`RemoteError::Status`] with the daemon's message.
async fn check(response: Response<Incoming>) -> Result<Response<Incoming>, RemoteError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let bytes = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered {status}: {}", String::from_utf8_lossy(&bytes)));
    Err(RemoteError::Status(status, message))
}

fn tls_files_from_env() -> anyhow::Result<TlsFiles> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let dir = var("KILN_CERT_PATH");
    let pick = |k: &str, file: &str| var(k).or_else(|| dir.as_ref().map(|d| d.join(file)));
    match (pick("KILN_TLS_CERT", "cert.pem"), pick("KILN_TLS_KEY", "key.pem"), pick("KILN_TLS_CACERT", "ca.pem")) {
        (Some(cert), Some(key), Some(ca)) => Ok(TlsFiles { cert, key, ca }),
        _ => bail!("set KILN_CERT_PATH (a directory with ca.pem, cert.pem, key.pem) or KILN_TLS_CACERT, KILN_TLS_CERT and KILN_TLS_KEY"),
    }
}

/// Percent-encode a reference for use as one path part (keeps `/:@`,
/// which the daemon's routes expect verbatim).
pub fn encode_path(s: &str) -> String {
    percent_encode(s, b"-._~/:@")
}

/// Percent-encode a query parameter value.
fn encode_query(s: &str) -> String {
    percent_encode(s, b"-._~/:")
}

/// `s` with every byte but ASCII letters, digits and those in `keep` written
/// as `%XX`.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse the JSON answer of a request sent with [`Client::send`].
async fn read_json_answer<T: DeserializeOwned>(response: Response<Incoming>) -> anyhow::Result<T> {
    let bytes = check(response).await?.into_body().collect().await.context("reading the daemon's answer")?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("the daemon's answer is not the expected JSON: {e}"))
}

/// Run `command` against the daemon at `host`; returns the exit code.
pub fn run(global: &Global, host: &str, command: Command) -> anyhow::Result<i32> {
    // `build --call outline|targets|check` only reads the Dockerfile, before
    // any store or daemon is involved: it runs here, as in embedded mode.
    let command = match command {
        Command::Build(args) if args.call != "build" => return commands::build::run(global, args),
        other => other,
    };
    let client = Client::new(host)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = rt.block_on(run_async(&client, command));
    // Everything the command waits for is done; dropping the runtime
    // would still wait for idle blocking-pool threads to wake and exit
    // (milliseconds of a short command like an unchanged rebuild).
    rt.shutdown_background();
    code
}

async fn run_async(client: &Client, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Images(args) => {
            let images: Vec<ImageRecord> = client.json(Method::GET, "/v1/images", None::<&()>).await?;
            commands::images::print(&args, &images)?;
            Ok(0)
        }
        Command::Inspect(args) => {
            let mut out = Vec::new();
            let mut code = 0;
            for reference in &args.references {
                let path = format!("/v1/images/{}/json", encode_path(reference));
                match client.json::<serde_json::Value>(Method::GET, &path, None::<&()>).await {
                    Ok(v) => out.push(v),
                    Err(RemoteError::Status(StatusCode::NOT_FOUND, message)) => {
                        eprintln!("kiln inspect: {message}");
                        code = 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(code)
        }
        Command::Tag(args) => {
            let path = format!("/v1/images/{}/tag", encode_path(&args.source));
            client.json::<serde_json::Value>(Method::POST, &path, Some(&TagRequest { target: args.target })).await?;
            Ok(0)
        }
        Command::Rmi(args) => {
            let mut code = 0;
            for reference in &args.references {
                let path = format!("/v1/images/{}", encode_path(reference));
                match client.json::<serde_json::Value>(Method::DELETE, &path, None::<&()>).await {
                    Ok(v) => {
                        for name in v.get("untagged").and_then(|u| u.as_array()).into_iter().flatten() {
                            println!("Untagged: {}", kiln_cache::images::familiar_name(name.as_str().unwrap_or_default()));
                        }
                    }
                    Err(RemoteError::Status(StatusCode::NOT_FOUND, message)) => {
                        eprintln!("kiln rmi: {message}");
                        code = 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(code)
        }
        Command::Pull(args) => {
            let request = PullRequest { reference: args.reference, platform: Some(args.platform) };
            let pulled: PullResult = client.json(Method::POST, "/v1/images/pull", Some(&request)).await?;
            println!("{}", commands::pull::summary(&pulled.name, &pulled.manifest_digest, pulled.layers, pulled.blobs_fetched));
            Ok(0)
        }
        Command::Push(args) => {
            let path = format!("/v1/images/{}/push", encode_path(&args.reference));
            let pushed: PushResult = client.json(Method::POST, &path, None::<&()>).await?;
            println!(
                "{}",
                commands::push::summary(&crate::registry::PushedImage {
                    reference: pushed.reference,
                    manifest_digest: pushed.manifest_digest,
                    blobs_uploaded: pushed.blobs_uploaded,
                    blobs_mounted: pushed.blobs_mounted,
                    blobs_skipped: pushed.blobs_skipped,
                })
            );
            Ok(0)
        }
        Command::Run(args) => run_remote(client, args).await,
        Command::Build(args) => build_remote(client, args).await,
        Command::Debug(_) | Command::Serve(_) => bail!("internal: this command always runs locally"),
        Command::Login(args) => {
            let password = commands::login::password(&args)?;
            let request = LoginRequest { server: commands::login::server(&args.server).to_string(), username: args.username, password };
            let done: LoginResult = client.json(Method::POST, "/v1/auth", Some(&request)).await?;
            println!("Login succeeded ({})", done.auth_file);
            Ok(0)
        }
        Command::Du(_) => {
            let u: crate::daemon::api::DiskUsage = client.json(Method::GET, "/v1/system/df", None::<&()>).await?;
            commands::du::print(&kiln_solver::gc::Usage {
                records: u.records,
                snapshots: u.snapshots,
                snapshot_bytes: u.snapshot_bytes,
                unreferenced_snapshots: u.unreferenced_snapshots,
                cache_mount_bytes: u.cache_mount_bytes,
            });
            commands::du::print_root(&kiln_cache::usage::RootUsage { total: u.root_total, parts: u.root_parts });
            Ok(0)
        }
        Command::Prune(args) => {
            // Bad sizes fail here, worded as in embedded mode.
            args.keep_storage.as_deref().map(kiln_solver::gc::parse_size).transpose()?;
            let request = crate::daemon::api::PruneRequest { all: args.all, keep_storage: args.keep_storage };
            let r: crate::daemon::api::PruneResult = client.json(Method::POST, "/v1/system/prune", Some(&request)).await?;
            commands::prune::print(&kiln_solver::gc::PruneReport { records: r.records, snapshots: r.snapshots, bytes: r.bytes });
            Ok(0)
        }
        Command::Check(args) => {
            let r: crate::daemon::api::CheckResult = client.json(Method::POST, "/v1/system/check", Some(&args)).await?;
            print!("{}", r.output);
            Ok(r.code)
        }
        Command::ContainerShim(_) => bail!("kiln __container-shim: internal, never sent to a daemon"),
        Command::ShimZygote(_) => bail!("kiln __shim-zygote: internal, never sent to a daemon"),
        Command::Import(args) => {
            std::fs::metadata(&args.file).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
            let mut path = format!(
                "/v1/images/import?reference={}&source={}",
                encode_query(&args.reference),
                encode_query(&args.file.to_string_lossy())
            );
            // The image's time is the client's, as in embedded mode.
            if let Some(epoch) = commands::import::source_date_epoch() {
                path.push_str(&format!("&source_date_epoch={epoch}"));
            }
            let response = client.send(Method::POST, &path, file_body(args.file.clone()), Some("application/x-tar")).await?;
            let record: ImageRecord = read_json_answer(response).await?;
            println!("{}: imported {}", kiln_cache::images::familiar_name(&record.name), record.config_digest);
            Ok(0)
        }
        Command::Load(args) => {
            let meta = std::fs::metadata(&args.input).map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
            let mut path = format!("/v1/images/load?source={}", encode_query(&args.input.to_string_lossy()));
            if let Some(tag) = &args.tag {
                path.push_str(&format!("&tag={}", encode_query(tag)));
            }
            let body = if meta.is_dir() { dir_tar_body(args.input.clone()) } else { file_body(args.input.clone()) };
            let response = client.send(Method::POST, &path, body, Some("application/x-tar")).await?;
            let records: Vec<ImageRecord> = read_json_answer(response).await?;
            for record in records {
                println!("Loaded image: {} ({})", kiln_cache::images::familiar_name(&record.name), record.config_digest);
            }
            Ok(0)
        }
        Command::Save(args) => {
            let dir = commands::save::writes_dir(args.format, &args.output);
            let to_stdout = commands::save::to_stdout(&args.output);
            // Refuse an existing output before the daemon does any work.
            let mut download = if to_stdout { None } else { Some(Download::new(&args.output, dir)?) };
            let request = SaveRequest { images: args.images.clone(), format: args.format, dir };
            let response = client
                .send(Method::POST, "/v1/images/save", full(serde_json::to_vec(&request)?), Some("application/json"))
                .await?;
            let mut body = check(response).await?.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.context("reading the archive from the daemon")?;
                if let Some(data) = frame.data_ref() {
                    match &mut download {
                        Some(download) => download.write(data)?,
                        None => std::io::stdout().write_all(data).context("writing the archive to stdout")?,
                    }
                }
            }
            let summary = commands::save::summary(args.images.len(), &args.output);
            match download {
                Some(download) => {
                    download.finish()?;
                    println!("{summary}");
                }
                None => {
                    std::io::stdout().flush()?;
                    eprintln!("{summary}");
                }
            }
            Ok(0)
        }
    }
}

async fn run_remote(client: &Client, args: commands::run::Args) -> anyhow::Result<i32> {
    use crate::runtime::tty::{RawMode, WindowSize};
    use std::os::fd::AsFd;
    anyhow::ensure!(args.rootfs.is_none(), "kiln run --rootfs: not available through --host (the daemon has its own filesystem)");
    let mut rest = args.args.clone();
    anyhow::ensure!(!rest.is_empty(), "kiln run: give an IMAGE (or --rootfs DIR)");
    let image = rest.remove(0);
    // Flags are checked here first, worded as in embedded mode.
    if !matches!(args.network.as_str(), "none" | "host" | "default" | "bridge") {
        bail!("--network {:?}: expected none, host or default", args.network);
    }
    if let Some(c) = args.cpus.filter(|c| !(*c > 0.0)) {
        bail!("--cpus {c}: must be greater than 0");
    }
    // `-e KEY` copies the client's value, as in embedded mode.
    let env = args
        .env
        .iter()
        .filter_map(|e| if e.contains('=') { Some(e.clone()) } else { std::env::var(e).ok().map(|v| format!("{e}={v}")) })
        .collect();
    // The terminal's size, found as embedded `kiln run -t` does.
    let terminal_size = || WindowSize::of(std::io::stdin().as_fd()).or_else(|| WindowSize::of(std::io::stdout().as_fd()));
    let console_size = args
        .tty
        .then(terminal_size)
        .flatten()
        .map(|w| [w.rows, w.cols]);
    let request = RunRequest {
        image,
        cmd: rest,
        entrypoint: args.entrypoint.as_deref().map(|e| if e.is_empty() { Vec::new() } else { vec![e.to_string()] }),
        env,
        workdir: args.workdir,
        user: args.user,
        network: Some(args.network),
        memory_bytes: args.memory.as_deref().map(commands::run::parse_bytes).transpose()?,
        cpus: args.cpus,
        hostname: args.hostname,
        name: args.name,
        volumes: args.volumes.iter().map(|v| absolute_volume(v)).collect::<anyhow::Result<_>>()?,
        interactive: args.interactive,
        tty: args.tty,
        console_size,
    };
    let body = full(serde_json::to_vec(&request)?);
    if !(args.interactive || args.tty) {
        let response = client.send(Method::POST, "/v1/containers/run", body, Some("application/json")).await?;
        let mut body = check(response).await?.into_body();
        let mut output = RunOutput::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the container's output from the daemon")?;
            if let Some(data) = frame.data_ref() {
                if let Some(code) = output.feed(data)? {
                    return Ok(code);
                }
            }
        }
        bail!("the daemon closed the connection before the container exited")
    }

    // -i / -t: an upgraded connection carrying output one way, input and
    // terminal sizes the other.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use crate::daemon::api::{ATTACH_PROTOCOL_FRAMES, input_frame};
    let upgrade = [(header::CONNECTION, "Upgrade"), (header::UPGRADE, ATTACH_PROTOCOL_FRAMES)];
    let response = client.send_with(Method::POST, "/v1/containers/run", body, Some("application/json"), &upgrade).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        check(response).await?;
        bail!("the daemon did not switch the connection to {ATTACH_PROTOCOL_FRAMES}");
    }
    let upgraded = hyper::upgrade::on(response).await.context("upgrading the connection")?;
    let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
    // Encoded input frames; bounded, so a fast stdin waits for the daemon.
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        while let Some(frame) = input_rx.recv().await {
            if write.write_all(&frame).await.is_err() || write.flush().await.is_err() {
                break;
            }
        }
    });
    // As in embedded mode: with -it the terminal goes raw while attached
    // (keys such as ^C reach the container); with -t alone only output
    // processing is off (the container's pty already made `\n` `\r\n`).
    // The container's terminal size follows ours.
    let _raw = match (args.tty, args.interactive) {
        (true, true) => RawMode::enable(std::io::stdin().as_fd()).ok(),
        (true, false) => RawMode::output_only(std::io::stdout().as_fd()).ok(),
        _ => None,
    };
    if args.tty {
        let sizes = input_tx.clone();
        let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(w) = terminal_size() {
                    if sizes.send(input_frame::resize(w.rows, w.cols)).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    if args.interactive {
        // A plain thread: it may stay blocked in read(2) after the
        // container ended, which must not hold up kiln's exit.
        let stdin_tx = input_tx.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdin_tx.blocking_send(input_frame::encode(input_frame::STDIN, &buf[..n])).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stdin_tx.blocking_send(input_frame::encode(input_frame::STDIN_EOF, &[]));
        });
    }
    drop(input_tx);
    let mut output = RunOutput::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read.read(&mut buf).await.context("reading the container's output from the daemon")?;
        if n == 0 {
            bail!("the daemon closed the connection before the container exited");
        }
        if let Some(code) = output.feed(&buf[..n])? {
            return Ok(code);
        }
    }
}

/// Turns the daemon's [`RunEvent`] lines into kiln's own stdout/stderr.
#[derive(Default)]
struct RunOutput {
    pending: Vec<u8>,
}

impl RunOutput {
    /// Take more of the stream; `Some(code)` once the container exited.
    fn feed(&mut self, data: &[u8]) -> anyhow::Result<Option<i32>> {
        self.pending.extend_from_slice(data);
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            let event: RunEvent = serde_json::from_slice(&line).context("the daemon sent a malformed run event")?;
            let b64 = base64::engine::general_purpose::STANDARD;
            match event {
                RunEvent::Stdout(d) => {
                    let mut stdout = std::io::stdout();
                    stdout.write_all(&b64.decode(d)?)?;
                    stdout.flush()?;
                }
                RunEvent::Stderr(d) => {
                    let mut stderr = std::io::stderr();
                    stderr.write_all(&b64.decode(d)?)?;
                    stderr.flush()?;
                }
                RunEvent::Exit(code) => return Ok(Some(code)),
                RunEvent::Error(message) => bail!("{message}"),
            }
        }
        Ok(None)
    }
}

/// Where a client-side `-o` output goes on this machine, and whether it
/// is a directory; `None` for outputs the daemon keeps (`image`, `registry`).
fn client_destination(output: &kiln_exporter::Output) -> Option<(PathBuf, bool)> {
    use kiln_exporter::{OciDest, Output};
    match output {
        Output::Image { .. } => None,
        Output::Oci { dest: OciDest::Tar(p), .. } | Output::Docker { dest: p, .. } | Output::Tar { dest: p } => Some((p.clone(), false)),
        Output::Oci { dest: OciDest::Dir(p), .. } | Output::Local { dest: p } => Some((p.clone(), true)),
    }
}

/// A file or directory arriving from the daemon for `dest` on this
/// machine, staged beside it like the embedded outputs (an existing `dest`
/// is refused before anything is sent; a failure leaves nothing behind).
/// A directory comes as a tar, unpacked once complete.
struct Download {
    staged: kiln_exporter::dest::StagedDest,
    sink: DownloadSink,
}

enum DownloadSink {
    File(std::io::BufWriter<std::fs::File>),
    Tar(std::io::BufWriter<std::fs::File>),
}

impl Download {
    fn new(dest: &std::path::Path, is_dir: bool) -> anyhow::Result<Download> {
        use kiln_exporter::dest::StagedDest;
        if is_dir {
            let staged = StagedDest::dir(dest)?;
            let tar = tempfile::tempfile().context("creating a temp file")?;
            Ok(Download { staged, sink: DownloadSink::Tar(std::io::BufWriter::new(tar)) })
        } else {
            let (staged, file) = StagedDest::file(dest)?;
            Ok(Download { staged, sink: DownloadSink::File(file) })
        }
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match &mut self.sink {
            DownloadSink::File(f) | DownloadSink::Tar(f) => f.write_all(bytes).context("writing what the daemon sent"),
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self.sink {
            DownloadSink::File(f) => self.staged.commit(Some(f)),
            DownloadSink::Tar(f) => {
                use std::io::Seek;
                let mut file = f.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                let mut tar = tar::Archive::new(std::io::BufReader::new(file));
                tar.set_preserve_permissions(true);
                tar.set_preserve_ownerships(nix::unistd::geteuid().is_root());
                tar.unpack(self.staged.path()).context("unpacking what the daemon sent")?;
                self.staged.commit(None)
            }
        }
    }
}

/// A request body that `produce` writes from a blocking thread, sent as it
/// is written (uploads of files and directories without holding them in
/// memory). An error of `produce` aborts the request.
fn streamed_body(produce: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + Send + 'static) -> Body {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    type Item = Result<Frame<Bytes>, std::io::Error>;
    struct ChannelWriter(tokio::sync::mpsc::Sender<Item>, Vec<u8>);
    impl ChannelWriter {
        fn send(&mut self) -> std::io::Result<()> {
            if self.1.is_empty() {
                return Ok(());
            }
            let chunk = Bytes::from(std::mem::take(&mut self.1));
            self.0.blocking_send(Ok(Frame::data(chunk))).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the daemon stopped reading"))
        }
    }
    impl Write for ChannelWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(buf);
            if self.1.len() >= UPLOAD_CHUNK {
                self.send()?;
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.send()
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(4);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter(tx.clone(), Vec::with_capacity(UPLOAD_CHUNK));
        if let Err(e) = produce(&mut writer).and_then(|()| writer.flush()) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    StreamBody::new(stream).boxed()
}

/// Bytes per uploaded chunk.
const UPLOAD_CHUNK: usize = 256 << 10;

/// A body streaming the file at `path`.
fn file_body(path: PathBuf) -> Body {
    streamed_body(move |out| {
        let mut file = std::fs::File::open(&path)?;
        std::io::copy(&mut file, out)?;
        Ok(())
    })
}

/// A body streaming a tar of the directory `dir`.
fn dir_tar_body(dir: PathBuf) -> Body {
    streamed_body(move |out| {
        let mut tar = tar::Builder::new(out);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", &dir)?;
        tar.finish()
    })
}

/// `-v HOST:CTR[:ro]` with a relative HOST made absolute against the
/// client's directory (as the docker CLI does); the daemon checks the rest.
fn absolute_volume(v: &str) -> anyhow::Result<String> {
    match v.split_once(':') {
        Some((host, rest)) if !host.starts_with('/') && !host.is_empty() => {
            let abs = std::path::absolute(host).with_context(|| format!("-v {v:?}: host path {host}"))?;
            Ok(format!("{}:{rest}", abs.display()))
        }
        _ => Ok(v.to_string()),
    }
}

/// The `missing` digests of a 412 answer to `POST /v1/build`.
async fn missing_contents(response: Response<Incoming>) -> anyhow::Result<std::collections::HashSet<String>> {
    #[derive(serde::Deserialize)]
    struct Missing {
        /// Empty (left out) when the daemon only lacks the list itself.
        #[serde(default)]
        missing: Vec<String>,
    }
    let bytes = response.into_body().collect().await.context("reading the daemon's answer")?.to_bytes();
    let answer: Missing = serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("the daemon's 412 answer lists no missing contents: {e}"))?;
    Ok(answer.missing.into_iter().collect())
}

/// `kiln build` through the daemon: send the build with the context's file
/// list; if the daemon lacks some contents it names them, they are
/// uploaded and the build is sent again. The build's progress streams into
/// the same renderer the embedded build uses.
async fn build_remote(client: &Client, args: commands::build::Args) -> anyhow::Result<i32> {
    use crate::daemon::build::{BuildLine, BuildOptions};
    use crate::daemon::context;
    let output = args.output.as_deref().map(kiln_exporter::Output::parse).transpose()?;
    // Bad sizes fail here, worded as in embedded mode.
    args.keep_storage.as_deref().map(kiln_solver::gc::parse_size).transpose()?;
    let destination = output.as_ref().and_then(client_destination);
    let build_args = commands::build::key_values("--build-arg", &args.build_args, true)?;
    let labels = commands::build::key_values("--label", &args.labels, false)?;
    // Checked here too, so a typo fails before the context is sent.
    crate::remote_cache::CacheOptions::parse(&args.cache_to, &args.cache_from, None)?;
    let secrets = commands::build::read_secrets(&args.secret)?
        .into_iter()
        .map(|(id, v)| (id, base64::engine::general_purpose::STANDARD.encode(v)))
        .collect();
    let (dir, dockerfile, dockerfile_name, _tmp) = commands::build::prepare_context(&args.context, args.file.as_deref())?;
    let dockerfile = String::from_utf8(dockerfile).map_err(|_| anyhow::anyhow!("Dockerfile {dockerfile_name}: not UTF-8 text"))?;
    let dockerignore = commands::build::read_dockerignore(&dir, &dockerfile_name);
    let matcher = match &dockerignore {
        Some(text) => Some(
            kiln_frontend::dockerignore::Matcher::new(&kiln_frontend::dockerignore::parse(text))
                .map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?,
        ),
        None => None,
    };
    let keep = vec![".dockerignore".to_string(), dockerfile_name.clone()];
    let scan_dir = dir.clone();
    let checksum_file = context::client_checksum_file(&scan_dir);
    let entries =
        tokio::task::spawn_blocking(move || context::scan(&scan_dir, matcher.as_ref(), &keep, checksum_file)).await??;
    // An unchanged context is named by its key alone; the list goes only
    // to a daemon that does not keep it (below).
    let mut options = BuildOptions {
        context: Vec::new(),
        context_key: Some(context::list_key(&entries)),
        dockerfile,
        dockerfile_name: Some(dockerfile_name),
        dockerignore,
        tags: args.tags.clone(),
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        pull: args.pull,
        labels,
        network: Some(args.network.clone()),
        platform: args.platform.clone(),
        secrets,
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()),
        cache_to: args.cache_to.clone(),
        cache_from: args.cache_from.clone(),
        output: args.output.clone(),
        keep_storage: args.keep_storage.clone(),
    };
    let mut request = Bytes::from(serde_json::to_vec(&options)?);
    let mut response = client.send(Method::POST, "/v1/build", full(request.clone()), Some("application/json")).await?;
    // A daemon that does not keep the context (412 with nothing missing)
    // gets the list; one that lacks some contents (new or changed files)
    // gets those uploaded; then the build is sent again (a few times: a
    // collection on the daemon may drop uploads not yet used). An
    // unchanged context is one request. Any other answer, a 400 too, is
    // the build's answer (a bad request stays bad with the list).
    for _ in 0..4 {
        let status = response.status();
        let by_key = options.context.is_empty();
        let wanted = match status {
            StatusCode::PRECONDITION_FAILED => missing_contents(response).await?,
            _ => break,
        };
        if wanted.is_empty() {
            anyhow::ensure!(by_key, "the daemon asked for the build again but lacks nothing");
            options.context = entries.clone();
            options.context_key = None;
            request = Bytes::from(serde_json::to_vec(&options)?);
        } else {
            let (tar_dir, tar_entries) = (dir.clone(), entries.clone());
            let tar = tokio::task::spawn_blocking(move || context::blobs_tar(&tar_dir, &tar_entries, &wanted)).await??;
            let uploaded = client.send(Method::POST, "/v1/build/context/blobs", full(tar), Some("application/x-tar")).await?;
            check(uploaded).await?;
        }
        response = client.send(Method::POST, "/v1/build", full(request.clone()), Some("application/json")).await?;
    }
    let mut body = check(response).await?.into_body();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let renderer = tokio::spawn(crate::progress::render(args.progress_mode(), rx));
    let mut pending = Vec::new();
    let mut outcome: Option<Result<(Option<String>, Vec<String>), String>> = None;
    // A client-side output arrives in pieces before the result.
    let mut received = match &destination {
        Some((dest, is_dir)) => Some(Download::new(dest, *is_dir)?),
        None => None,
    };
    'read: while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the build's progress from the daemon")?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            match serde_json::from_slice::<BuildLine>(&line).context("the daemon sent a malformed build line")? {
                BuildLine::Event(e) => {
                    let _ = tx.send(e);
                }
                BuildLine::Output(data) => {
                    let download = received.as_mut().context("the daemon sent an output nobody asked for")?;
                    let bytes = base64::engine::general_purpose::STANDARD.decode(data).context("the daemon sent a malformed output piece")?;
                    download.write(&bytes)?;
                }
                BuildLine::Result { image_id, pushed } => {
                    outcome = Some(Ok((image_id, pushed)));
                    break 'read;
                }
                BuildLine::Error(message) => {
                    outcome = Some(Err(message));
                    break 'read;
                }
            }
        }
    }
    drop(tx);
    let _ = renderer.await;
    match outcome {
        Some(Ok((image_id, pushed))) => {
            if let Some(download) = received {
                download.finish()?;
            }
            if let Some(id) = image_id {
                if let Some(path) = &args.iidfile {
                    std::fs::write(path, &id).with_context(|| format!("writing {}", path.display()))?;
                }
                crate::commands::build::report_image(&args, &id);
            }
            for line in pushed.iter().filter(|_| !args.quiet) {
                eprintln!("{line}");
            }
            Ok(0)
        }
        Some(Err(message)) => bail!("{message}"),
        None => bail!("the daemon closed the connection before the build finished"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_keep_at_signs_and_queries_do_not() {
        assert_eq!(encode_path("reg:5000/a b@sha256:0f%"), "reg:5000/a%20b@sha256:0f%25");
        assert_eq!(encode_query("reg:5000/a b@sha256:0f&x=1"), "reg:5000/a%20b%40sha256:0f%26x%3D1");
    }
}
