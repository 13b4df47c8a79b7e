//! The Docker Engine API subset the stock `docker` CLI (API 1.41) needs for
//! `version`, `info`, `images`, `pull`, `push`, `tag`, `rmi`, `image inspect`
//! and `run --rm IMAGE CMD`. Paths may carry a `/v1.NN` prefix (the CLI adds
//! the version it negotiated through `/_ping`). Errors use Docker's shape,
//! `{"message": ...}`, and status codes (404 for a missing image makes
//! `docker run` pull it first).

use std::sync::Arc;

use http::{Method, StatusCode, header};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_cache::images::{ImageRecord, familiar_name};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::State;
use super::api::{blocking, pull_image};
use super::containers::{Container, RunRequest, leased_spec, run_streamed};
use super::web::{ApiError, ApiResult, Query, empty, full, json_response, ok_json, read_body, streaming, MAX_JSON_BODY, parse_json};
use crate::commands;
use crate::runtime::LogStream;

/// The newest Docker API version served.
pub const DOCKER_API_VERSION: &str = "1.41";
/// The oldest Docker API version accepted.
pub const DOCKER_MIN_API_VERSION: &str = "1.24";

/// Split `/v1.41/images/json` into (`Some("1.41")`, `/images/json`).
pub fn strip_version(path: &str) -> (Option<&str>, &str) {
    if let Some(rest) = path.strip_prefix("/v") {
        let end = rest.find('/').unwrap_or(rest.len());
        let version = &rest[..end];
        if version.split('.').count() == 2 && version.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            let tail = &rest[end..];
            return (Some(version), if tail.is_empty() { "/" } else { tail });
        }
    }
    (None, path)
}

/// Dispatch a Docker API request.
pub async fn route(state: Arc<State>, req: Request<Incoming>, full_path: &str) -> ApiResult {
    let (version, path) = strip_version(full_path);
    if let Some(v) = version {
        let (major, minor) = v.split_once('.').unwrap_or(("0", "0"));
        let minor: u32 = minor.parse().unwrap_or(0);
        if major != "1" || minor > 41 || minor < 24 {
            return Err(ApiError::bad_request(format!(
                "client version {v} is not supported: this daemon speaks Docker API {DOCKER_MIN_API_VERSION} to {DOCKER_API_VERSION}"
            )));
        }
    }
    let path = path.to_string();
    let method = req.method().clone();
    let query = Query::parse(req.uri().query())?;
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/_ping") => Ok(hyper::Response::builder()
            .header("Api-Version", DOCKER_API_VERSION)
            .header("OSType", "linux")
            .header("Docker-Experimental", "false")
            .header("Builder-Version", "1")
            .header("Cache-Control", "no-cache, no-store, must-revalidate")
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full(if method == Method::HEAD { "" } else { "OK" }))
            .expect("static response")),
        (&Method::GET, "/version") => ok_json(&version_json()),
        (&Method::GET, "/info") => info(&state).await,
        (&Method::GET, "/images/json") => images_list(&state).await,
        (&Method::POST, "/images/create") => images_create(state, &query).await,
        (&Method::POST, "/build") => {
            let body = read_body(req.into_body(), super::web::MAX_UPLOAD_BODY).await?;
            build(state, &query, body).await
        }
        (&Method::GET, "/containers/json") => containers_list(&state, &query),
        (&Method::POST, "/containers/create") => {
            let body = read_body(req.into_body(), MAX_JSON_BODY).await?;
            containers_create(&state, &query, parse_json(&body)?).await
        }
        (_, p) if p.starts_with("/images/") => {
            let name = p["/images/".len()..].to_string();
            images_route(state, &method, &name, &query).await
        }
        (_, p) if p.starts_with("/containers/") => {
            let rest = p["/containers/".len()..].to_string();
            containers_route(state, req, &method, &rest, &query).await
        }
        _ => Err(ApiError::not_found(format!("page not found: {method} {full_path} is not part of the Docker API subset kiln serves"))),
    }
}

fn version_json() -> Value {
    let version = format!("{}-kiln", env!("CARGO_PKG_VERSION"));
    json!({
        "Platform": { "Name": "kiln" },
        "Components": [{
            "Name": "Engine",
            "Version": version,
            "Details": { "ApiVersion": DOCKER_API_VERSION, "MinAPIVersion": DOCKER_MIN_API_VERSION, "Os": "linux", "Arch": go_arch() },
        }],
        "Version": version,
        "ApiVersion": DOCKER_API_VERSION,
        "MinAPIVersion": DOCKER_MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": go_arch(),
        "KernelVersion": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        "BuildTime": "",
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn info(state: &State) -> ApiResult {
    let store = state.store.clone();
    let images = blocking(move || store.images.list()).await?;
    let ids: std::collections::BTreeSet<_> = images.iter().map(|r| r.config_digest.clone()).collect();
    ok_json(&json!({
        "ID": "kiln",
        "Containers": state.containers.len(),
        "Images": ids.len(),
        "Driver": "overlay",
        "OSType": "linux",
        "OperatingSystem": "kiln",
        "Architecture": std::env::consts::ARCH,
        "NCPU": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "ServerVersion": format!("{}-kiln", env!("CARGO_PKG_VERSION")),
        "DockerRootDir": state.global.root,
        "IndexServerAddress": "https://index.docker.io/v1/",
        "Name": nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        "RegistryConfig": { "InsecureRegistryCIDRs": [], "IndexConfigs": {}, "Mirrors": [] },
    }))
}

/// `GET /images/json`: one entry per image ID with all its names.
async fn images_list(state: &State) -> ApiResult {
    let store = state.store.clone();
    let records = blocking(move || store.images.list()).await?;
    let mut by_id: std::collections::BTreeMap<String, Vec<&ImageRecord>> = Default::default();
    for r in &records {
        by_id.entry(r.config_digest.clone()).or_default().push(r);
    }
    let list: Vec<Value> = by_id
        .iter()
        .map(|(id, names)| {
            let tags: Vec<&str> = names.iter().filter(|r| !r.name.contains('@')).map(|r| familiar_name(&r.name)).collect();
            let digests: Vec<String> = names
                .iter()
                .map(|r| format!("{}@{}", repository_of(familiar_name(&r.name)), r.target.digest))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let first = names[0];
            json!({
                "Id": id,
                "ParentId": "",
                "RepoTags": tags,
                "RepoDigests": digests,
                "Created": first.created.as_deref().and_then(unix_seconds).unwrap_or(0),
                "Size": first.size,
                "VirtualSize": first.size,
                "SharedSize": -1,
                "Labels": null,
                "Containers": -1,
            })
        })
        .collect();
    ok_json(&list)
}

/// `repo:tag` or `repo@digest` → `repo`.
fn repository_of(name: &str) -> &str {
    let name = name.split('@').next().unwrap_or(name);
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    match name[slash..].rfind(':') {
        Some(i) => &name[..slash + i],
        None => name,
    }
}

/// RFC 3339 (`2024-01-02T03:04:05[.frac](Z|±hh:mm)`) to Unix seconds.
pub fn unix_seconds(t: &str) -> Option<i64> {
    let num = |s: &str| s.parse::<i64>().ok();
    let (y, mo, d) = (num(t.get(0..4)?)?, num(t.get(5..7)?)?, num(t.get(8..10)?)?);
    let (h, mi, s) = (num(t.get(11..13)?)?, num(t.get(14..16)?)?, num(t.get(17..19)?)?);
    let zone = t[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match zone {
        "" | "Z" | "z" => 0,
        z if z.len() == 6 => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            sign * (num(z.get(1..3)?)? * 3600 + num(z.get(4..6)?)? * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + s - offset)
}

/// A Docker-style streamed error line.
fn error_line(message: &str) -> Value {
    json!({ "errorDetail": { "message": message }, "error": message })
}

/// `POST /images/create?fromImage=NAME&tag=TAG`: pull, streaming status lines.
async fn images_create(state: Arc<State>, query: &Query) -> ApiResult {
    let from = query.get("fromImage").filter(|f| !f.is_empty()).ok_or_else(|| {
        ApiError::bad_request("POST /images/create: only pulling (fromImage=...) is supported, not importing (fromSrc)")
    })?;
    let reference = match query.get("tag").filter(|t| !t.is_empty()) {
        Some(tag) if tag.starts_with("sha256:") => format!("{from}@{tag}"),
        Some(tag) => format!("{from}:{tag}"),
        None => from.to_string(),
    };
    let platform = query.get("platform").filter(|p| !p.is_empty()).map(str::to_string);
    let tag = query.get("tag").filter(|t| !t.is_empty()).unwrap_or("latest").to_string();
    let (response, mut lines) = streaming("application/json");
    tokio::spawn(async move {
        lines.send(&json!({ "status": format!("Pulling from {}", repository_of(&reference)), "id": tag })).await;
        let pull = pull_image(&state, &reference, platform.as_deref());
        let result = tokio::select! {
            r = pull => r,
            _ = lines.closed() => { tracing::info!(%reference, "pull: client went away"); return; }
        };
        match result {
            Ok(pulled) => {
                lines.send(&json!({ "status": format!("Digest: {}", pulled.manifest_digest) })).await;
                lines.send(&json!({ "status": format!("Status: Downloaded newer image for {}", familiar_name(&pulled.name)) })).await;
            }
            Err(e) => {
                lines.send(&error_line(&e.message)).await;
            }
        }
    });
    Ok(response)
}

/// `/images/{name}/json|tag|push` and `DELETE /images/{name}`.
async fn images_route(state: Arc<State>, method: &Method, name: &str, query: &Query) -> ApiResult {
    let no_such = |e: ApiError, name: &str| {
        if e.status == StatusCode::NOT_FOUND { ApiError::not_found(format!("No such image: {name}")) } else { e }
    };
    if let (&Method::GET, Some(name)) = (method, name.strip_suffix("/json")) {
        let (store, owned) = (state.store.clone(), name.to_string());
        let described = blocking(move || {
            let record = store.images.resolve(&owned)?;
            commands::inspect::describe(&store, &store.images.list()?, &record)
        })
        .await
        .map_err(|e| no_such(e, name))?;
        return ok_json(&described);
    }
    if let (&Method::POST, Some(name)) = (method, name.strip_suffix("/tag")) {
        let repo = query.get("repo").filter(|r| !r.is_empty()).ok_or_else(|| ApiError::bad_request("tag: repo is required"))?;
        let target = match query.get("tag").filter(|t| !t.is_empty()) {
            Some(tag) => format!("{repo}:{tag}"),
            None => repo.to_string(),
        };
        let (store, owned) = (state.store.clone(), name.to_string());
        blocking(move || store.images.tag(&owned, &target)).await.map_err(|e| no_such(e, name))?;
        return Ok(empty(StatusCode::CREATED));
    }
    if let (&Method::POST, Some(name)) = (method, name.strip_suffix("/push")) {
        let reference = match query.get("tag").filter(|t| !t.is_empty()) {
            Some(tag) => format!("{name}:{tag}"),
            None => name.to_string(),
        };
        let tag = query.get("tag").unwrap_or("latest").to_string();
        let (response, mut lines) = streaming("application/json");
        tokio::spawn(async move {
            lines.send(&json!({ "status": format!("The push refers to repository [{}]", repository_of(&reference)) })).await;
            match commands::push::push_local(&state.registry, &state.store, &reference).await {
                Ok(pushed) => {
                    let size = state.store.content.read(&pushed.manifest_digest).map(|b| b.len()).unwrap_or(0);
                    lines.send(&json!({ "status": format!("{tag}: digest: {} size: {size}", pushed.manifest_digest) })).await;
                    lines.send(&json!({ "progressDetail": {}, "aux": { "Tag": tag, "Digest": pushed.manifest_digest, "Size": size } })).await;
                }
                Err(e) => {
                    lines.send(&error_line(&format!("{e:#}"))).await;
                }
            }
        });
        return Ok(response);
    }
    if method == Method::DELETE {
        let (store, owned) = (state.store.clone(), name.to_string());
        let untagged = blocking(move || {
            let record = store.images.resolve(&owned)?;
            commands::rmi::untag(&store, &owned, &record)
        })
        .await
        .map_err(|e| no_such(e, name))?;
        let list: Vec<Value> = untagged.iter().map(|n| json!({ "Untagged": familiar_name(n) })).collect();
        return ok_json(&list);
    }
    Err(ApiError::not_found(format!("page not found: {method} /images/{name}")))
}

/// A string or a list of strings (Docker accepts both for Entrypoint/Cmd).
fn string_list(v: Option<&Value>) -> Result<Option<Vec<String>>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request("expected a list of strings")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(ApiError::bad_request("expected a string or a list of strings")),
    }
}

/// `POST /containers/create?name=N`.
async fn containers_create(state: &State, query: &Query, body: Value) -> ApiResult {
    let image = body.get("Image").and_then(Value::as_str).filter(|i| !i.is_empty()).ok_or_else(|| ApiError::bad_request("create: Image is required"))?;
    let host = body.get("HostConfig").cloned().unwrap_or(Value::Null);
    let nonempty = |key: &str| body.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let nano_cpus = host.get("NanoCpus").and_then(Value::as_i64).unwrap_or(0);
    let memory = host.get("Memory").and_then(Value::as_i64).unwrap_or(0);
    let request = RunRequest {
        image: image.to_string(),
        cmd: string_list(body.get("Cmd"))?.unwrap_or_default(),
        entrypoint: string_list(body.get("Entrypoint"))?,
        env: string_list(body.get("Env"))?.unwrap_or_default(),
        workdir: nonempty("WorkingDir"),
        user: nonempty("User"),
        network: host.get("NetworkMode").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string),
        memory_bytes: (memory > 0).then_some(memory),
        cpus: (nano_cpus > 0).then(|| nano_cpus as f64 / 1e9),
        hostname: nonempty("Hostname"),
        name: None,
        volumes: string_list(host.get("Binds"))?.unwrap_or_default(),
        interactive: body.get("OpenStdin").and_then(Value::as_bool).unwrap_or(false),
        tty: body.get("Tty").and_then(Value::as_bool).unwrap_or(false),
        console_size: host.get("ConsoleSize").and_then(|c| serde_json::from_value::<[u16; 2]>(c.clone()).ok()).filter(|[r, c]| *r > 0 && *c > 0),
    };
    let (store, owned) = (state.store.clone(), image.to_string());
    blocking(move || store.images.resolve(&owned)).await.map_err(|e| {
        if e.status == StatusCode::NOT_FOUND { ApiError::not_found(format!("No such image: {image}")) } else { e }
    })?;
    let auto_remove = host.get("AutoRemove").and_then(Value::as_bool).unwrap_or(false);
    let container = state.containers.create(query.get("name").filter(|n| !n.is_empty()).map(str::to_string), request, auto_remove);
    tracing::info!(id = %container.id, image, "container created");
    Ok(json_response(StatusCode::CREATED, &json!({ "Id": container.id, "Warnings": [] })))
}

/// `/containers/{id}/attach|start|wait|json` and `DELETE /containers/{id}`.
async fn containers_route(state: Arc<State>, mut req: Request<Incoming>, method: &Method, rest: &str, query: &Query) -> ApiResult {
    let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
    let container = state.containers.get(id).ok_or_else(|| ApiError::not_found(format!("No such container: {id}")))?;
    match (method, action) {
        (&Method::POST, "attach") => {
            let upgrade = hyper::upgrade::on(&mut req);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<super::containers::OutputChunk>();
            *container.attach.lock().unwrap() = Some(tx);
            let want_stdout = query.flag("stdout");
            let want_stderr = query.flag("stderr");
            // With a tty, output is the terminal's raw bytes, not frames.
            let tty = container.request.tty;
            let stdin = if query.flag("stdin") { container.stdin.lock().unwrap().0.take() } else { None };
            tokio::spawn(async move {
                let upgraded = match upgrade.await {
                    Ok(u) => u,
                    Err(e) => return tracing::warn!("attach: the connection was not upgraded: {e}"),
                };
                let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                // The client's stdin until it half-closes (docker's CloseWrite).
                let input = stdin.map(|stdin| {
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        let mut buf = vec![0u8; 32 << 10];
                        while let Ok(n) = read.read(&mut buf).await {
                            if n == 0 || stdin.send(bytes::Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                                break;
                            }
                        }
                    })
                });
                while let Some((stream, bytes)) = rx.recv().await {
                    let (kind, wanted) = match stream {
                        LogStream::Stdout => (1u8, want_stdout),
                        LogStream::Stderr => (2u8, want_stderr),
                    };
                    if !wanted {
                        continue;
                    }
                    let header_ok = tty || write.write_all(&frame_header(kind, bytes.len())).await.is_ok();
                    if !header_ok || write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                let _ = write.shutdown().await;
                if let Some(input) = input {
                    input.abort();
                }
            });
            let content_type = if tty { "application/vnd.docker.raw-stream" } else { "application/vnd.docker.multiplexed-stream" };
            Ok(hyper::Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "tcp")
                .header(header::CONTENT_TYPE, content_type)
                .body(full(""))
                .expect("static response"))
        }
        (&Method::POST, "resize") => {
            let size = |key: &str| query.get(key).and_then(|v| v.parse::<u16>().ok());
            let (Some(rows), Some(cols)) = (size("h"), size("w")) else {
                return Err(ApiError::bad_request("resize: h and w must be numbers of rows and columns"));
            };
            let _ = container.resize.lock().unwrap().0.send(crate::runtime::tty::WindowSize { rows, cols });
            Ok(empty(StatusCode::OK))
        }
        (&Method::POST, "start") => start(state, container).await,
        (&Method::POST, "wait") => {
            let removed = query.get("condition") == Some("removed");
            let (response, mut lines) = streaming("application/json");
            // `next-exit` (docker start -a, docker run) on an exited
            // container waits for the exit of its next run.
            let next = query.get("condition") == Some("next-exit");
            tokio::spawn(async move {
                let mut exit = container.exit.subscribe();
                let current = *exit.borrow_and_update();
                let code = match current {
                    Some(code) if !next => code,
                    // Any change from here is seen (a quick None then
                    // Some(code) may show as one): the next exit is the
                    // first Some after a change.
                    Some(_) => loop {
                        if exit.changed().await.is_err() {
                            return;
                        }
                        if let Some(code) = *exit.borrow_and_update() {
                            break code;
                        }
                    },
                    None => match exit.wait_for(|e| e.is_some()).await {
                        Ok(code) => code.unwrap_or(0),
                        Err(_) => return,
                    },
                };
                if removed {
                    let mut gone = container.removed.subscribe();
                    let _ = gone.wait_for(|r| *r).await;
                }
                lines.send(&json!({ "StatusCode": code, "Error": null })).await;
            });
            Ok(response)
        }
        (&Method::GET, "json") => ok_json(&inspect_container(&container)),
        (&Method::GET, "logs") => logs(container, query),
        (&Method::DELETE, "") => {
            let running = *container.started.lock().unwrap() && container.exit.borrow().is_none();
            if running && !query.flag("force") {
                return Err(ApiError::new(StatusCode::CONFLICT, format!("container {} is running: stop it first or use force", container.id)));
            }
            if let Some(kill) = container.kill.lock().unwrap().take() {
                let _ = kill.send(());
            }
            state.containers.remove(&container.id);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(ApiError::not_found(format!("page not found: {method} /containers/{rest}"))),
    }
}

/// `GET /containers/{id}/logs?stdout=1&stderr=1&follow=1&tail=N`: the
/// output so far as a multiplexed stream; with `follow`, then what comes
/// until the container exits.
fn logs(container: Arc<Container>, query: &Query) -> ApiResult {
    let (want_stdout, want_stderr, follow) = (query.flag("stdout"), query.flag("stderr"), query.flag("follow"));
    if !want_stdout && !want_stderr {
        return Err(ApiError::bad_request("logs: you must choose at least one stream (stdout=1 or stderr=1)"));
    }
    if query.flag("timestamps") {
        return Err(ApiError::bad_request("logs: timestamps are not supported by kiln"));
    }
    let tail = match query.get("tail").filter(|t| !t.is_empty() && *t != "all") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| ApiError::bad_request(format!("logs: tail={n:?}: expected a number or all")))?),
        None => None,
    };
    let wanted = move |stream: &LogStream| match stream {
        LogStream::Stdout => want_stdout,
        LogStream::Stderr => want_stderr,
    };
    let (response, mut sink) = streaming("application/vnd.docker.multiplexed-stream");
    tokio::spawn(async move {
        let mut changed = container.log.subscribe();
        let mut exit = container.exit.subscribe();
        let (chunks, mut next) = container.log.since(0);
        let mut chunks: Vec<_> = chunks.into_iter().filter(|(s, _)| wanted(s)).collect();
        if let Some(n) = tail {
            chunks = last_lines(chunks, n);
        }
        for chunk in chunks {
            if !send_frame(&mut sink, &chunk).await {
                return;
            }
        }
        while follow {
            let exited = exit.borrow_and_update().is_some();
            let (more, after) = container.log.since(next);
            next = after;
            for chunk in more.iter().filter(|(s, _)| wanted(s)) {
                if !send_frame(&mut sink, chunk).await {
                    return;
                }
            }
            if exited {
                break;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = exit.changed() => {}
                _ = sink.closed() => return,
            }
        }
    });
    Ok(response)
}

/// The chunks holding the last `n` lines (per docker's `--tail`).
fn last_lines(chunks: Vec<super::containers::OutputChunk>, n: usize) -> Vec<super::containers::OutputChunk> {
    let mut lines: Vec<super::containers::OutputChunk> = Vec::new();
    for (stream, bytes) in chunks {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            match lines.last_mut() {
                // Continue a line this stream left unfinished.
                Some((s, last)) if *s == stream && last.last() != Some(&b'\n') => {
                    *last = [&last[..], piece].concat().into();
                }
                _ => lines.push((stream, bytes::Bytes::copy_from_slice(piece))),
            }
        }
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

async fn send_frame(sink: &mut super::web::LineSender, (stream, bytes): &super::containers::OutputChunk) -> bool {
    let kind = match stream {
        LogStream::Stdout => 1u8,
        LogStream::Stderr => 2u8,
    };
    let mut frame = frame_header(kind, bytes.len()).to_vec();
    frame.extend_from_slice(bytes);
    sink.send_raw(frame.into()).await
}

/// Docker's 8-byte frame header: stream (1 stdout, 2 stderr), three zero
/// bytes, the payload length big-endian.
pub fn frame_header(stream: u8, len: usize) -> [u8; 8] {
    let n = (len as u32).to_be_bytes();
    [stream, 0, 0, 0, n[0], n[1], n[2], n[3]]
}

/// `POST /containers/{id}/start`: run a created container, or run an
/// exited one again (as dockerd does: same command, same filesystem, the
/// log continues); 304 if it is running.
async fn start(state: Arc<State>, container: Arc<Container>) -> ApiResult {
    let exited_before = {
        let mut started = container.started.lock().unwrap();
        let exited = *container.exit.borrow();
        if *started && exited.is_none() {
            return Ok(empty(StatusCode::NOT_MODIFIED));
        }
        *started = true;
        // Running from here on (the exit code is the next run's).
        container.exit.send_replace(None);
        exited
    };
    let undo = |container: &Container| {
        *container.started.lock().unwrap() = exited_before.is_some();
        container.exit.send_replace(exited_before);
    };
    let (store, request, table, id) = (state.store.clone(), container.request.clone(), state.containers.clone(), container.id.clone());
    // The lease is held until the container exits: GC keeps its layers.
    let prepared = blocking(move || {
        let (mut spec, lease) = leased_spec(&store, &request)?;
        if let Some((upper, work)) = table.filesystem(&id)? {
            spec.rootfs.upper = upper;
            spec.rootfs.work = work;
        }
        Ok((spec, lease))
    })
    .await;
    let (spec, lease) = match prepared {
        Ok(spec_and_lease) => spec_and_lease,
        Err(e) => {
            undo(&container);
            return Err(e);
        }
    };
    state.containers.save(&container);
    // Output goes to the container's log and to the attached client, if any.
    let attached = container.attach.lock().unwrap().take();
    let (output, mut output_rx) = tokio::sync::mpsc::unbounded_channel::<super::containers::OutputChunk>();
    let logger = {
        let container = container.clone();
        tokio::spawn(async move {
            while let Some(chunk) = output_rx.recv().await {
                container.log.push(&chunk);
                if let Some(attached) = &attached {
                    let _ = attached.send(chunk);
                }
            }
        })
    };
    let io = super::containers::ContainerIo {
        stdin: container.stdin.lock().unwrap().1.take(),
        tty: container.request.tty.then(|| {
            let [rows, cols] = container.request.console_size.unwrap_or_default();
            crate::runtime::tty::WindowSize { rows, cols }
        }),
        resize: container.resize.lock().unwrap().1.take(),
    };
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    *container.kill.lock().unwrap() = Some(kill_tx);
    tokio::spawn(async move {
        let _lease = lease;
        let cancel = {
            let state = state.clone();
            async move {
                tokio::select! {
                    _ = state.cancelled() => {}
                    _ = kill_rx => {}
                }
            }
        };
        let code = match run_streamed(state.shim.clone(), spec, io, output, cancel).await {
            Ok(code) => code,
            Err(e) => {
                tracing::warn!(id = %container.id, "container failed: {e:#}");
                125
            }
        };
        // All output is logged before the exit shows.
        let _ = logger.await;
        tracing::info!(id = %container.id, code, "container exited");
        container.rearm();
        container.exit.send_replace(Some(code));
        if container.auto_remove {
            state.containers.remove(&container.id);
        } else {
            state.containers.save(&container);
        }
    });
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `created`, `running` or `exited`, and the exit code once exited.
fn container_state(c: &Container) -> (&'static str, Option<i32>) {
    let started = *c.started.lock().unwrap();
    let exit = *c.exit.borrow();
    let status = match (started, exit) {
        (false, _) => "created",
        (true, None) => "running",
        (true, Some(_)) => "exited",
    };
    (status, exit)
}

/// `GET /containers/json[?all=1]` (`docker ps [-a]`): running containers,
/// or all with `all`. Filters are not supported (refused, not ignored).
fn containers_list(state: &State, query: &Query) -> ApiResult {
    if query.get("filters").is_some_and(|f| !f.is_empty() && f != "{}") {
        return Err(ApiError::bad_request("containers: filters are not supported by kiln"));
    }
    let all = query.flag("all");
    let list: Vec<Value> = state
        .containers
        .list()
        .iter()
        .filter_map(|c| {
            let (status, exit) = container_state(c);
            if !all && status != "running" {
                return None;
            }
            let shown = match (status, exit) {
                ("running", _) => "Up".to_string(),
                ("exited", Some(code)) => format!("Exited ({code})"),
                _ => "Created".to_string(),
            };
            let command: Vec<String> = c.request.entrypoint.iter().flatten().chain(&c.request.cmd).cloned().collect();
            Some(json!({
                "Id": c.id,
                "Names": [c.name],
                "Image": c.request.image,
                "Command": command.join(" "),
                "Created": c.created,
                "State": status,
                "Status": shown,
                "Ports": [],
                "Labels": {},
                "Mounts": [],
                "HostConfig": { "NetworkMode": c.request.network.as_deref().unwrap_or("default") },
            }))
        })
        .collect();
    ok_json(&Value::Array(list))
}

fn inspect_container(c: &Container) -> Value {
    let (status, exit) = container_state(c);
    json!({
        "Id": c.id,
        "Name": c.name,
        "Image": c.request.image,
        "Created": kiln_exporter::time::rfc3339(c.created),
        "State": {
            "Status": status,
            "Running": status == "running",
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": false,
            "Pid": 0,
            "ExitCode": exit.unwrap_or(0),
            "Error": "",
        },
        "Config": {
            "Image": c.request.image,
            "Cmd": c.request.cmd,
            "Entrypoint": c.request.entrypoint,
            "Env": c.request.env,
            "Tty": c.request.tty,
            "OpenStdin": c.request.interactive,
        },
        "HostConfig": { "AutoRemove": c.auto_remove },
    })
}

/// A JSON object of strings in a query parameter (`buildargs`, `labels`);
/// `null` values (docker's "take it from the environment") are skipped.
fn json_map(query: &Query, key: &str) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let Some(text) = query.get(key).filter(|t| !t.is_empty() && *t != "null") else { return Ok(Default::default()) };
    let map: std::collections::BTreeMap<String, Option<String>> = parse_json(text.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("query parameter {key}: {}", e.message)))?;
    Ok(map.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
}

/// `POST /build`: the classic builder endpoint. The body is the context as
/// a tar (plain or gzip); progress goes out as `{"stream": ...}` lines, the
/// image ID as `{"aux": {"ID": ...}}`.
async fn build(state: Arc<State>, query: &Query, body: bytes::Bytes) -> ApiResult {
    if query.get("remote").is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request("build: remote contexts are not supported; send the context as a tar"));
    }
    let dockerfile_name = query.get("dockerfile").filter(|d| !d.is_empty()).unwrap_or("Dockerfile").to_string();
    let rel = super::context::safe_relative(&dockerfile_name).map_err(|m| ApiError::bad_request(format!("build: dockerfile: {m}")))?;
    let tags: Vec<String> = query.all("t").into_iter().filter(|t| !t.is_empty()).map(str::to_string).collect();
    for t in &tags {
        kiln_cache::images::normalize_reference(t).map_err(|e| ApiError::bad_request(format!("build: invalid tag {t:?}: {e:#}")))?;
    }
    let opts = super::build::BuildOptions {
        context: Vec::new(),
        context_key: None,
        dockerfile: String::new(),
        dockerfile_name: Some(dockerfile_name.clone()),
        dockerignore: None,
        tags: tags.clone(),
        build_args: json_map(query, "buildargs")?,
        target: query.get("target").filter(|t| !t.is_empty()).map(str::to_string),
        no_cache: query.flag("nocache"),
        pull: query.flag("pull"),
        labels: json_map(query, "labels")?,
        network: query.get("networkmode").filter(|n| !n.is_empty() && *n != "default").map(str::to_string),
        platform: query.get("platform").filter(|p| !p.is_empty()).map(str::to_string),
        secrets: Default::default(),
        source_date_epoch: None,
        cache_to: Vec::new(),
        // docker build --cache-from: a JSON list of image references.
        cache_from: match query.get("cachefrom").filter(|v| !v.is_empty()) {
            Some(v) => serde_json::from_str(v).map_err(|e| ApiError::bad_request(format!("build: cachefrom: {e}")))?,
            None => Vec::new(),
        },
        output: None,
        keep_storage: None,
    };
    let dir = super::build::context_dir(&state).map_err(ApiError::from)?;
    let path = dir.path().to_path_buf();
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let mut opts = opts;
        super::context::unpack_tar(&body, &path)?;
        let file = path.join(&rel);
        let text = std::fs::read(&file)
            .map_err(|e| ApiError::bad_request(format!("build: cannot read {} in the context: {e}", rel.display())))?;
        opts.dockerfile =
            String::from_utf8(text).map_err(|_| ApiError::bad_request(format!("build: {} is not UTF-8", rel.display())))?;
        opts.dockerignore = crate::commands::build::read_dockerignore(&path, &file.to_string_lossy());
        Ok((opts, dir))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))?;
    let (opts, dir) = prepared?;
    let (response, mut lines) = streaming("application/json");
    tokio::spawn(async move {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let mut plain = crate::progress::Plain::new();
        let gone = lines.clone();
        let context = dir.path().to_path_buf();
        let work = async { super::build::run_build(&state, opts, context, None, tx).await.map(|done| done.image_id) };
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                Some(event) = events.recv() => {
                    for line in plain.lines(&event) {
                        lines.send(&json!({ "stream": format!("{line}\n") })).await;
                    }
                }
                r = &mut work => break Some(r),
                _ = gone.closed() => { tracing::info!("docker build: client went away, cancelling its build"); break None; }
                _ = state.cancelled() => break Some(Err(anyhow::anyhow!("the daemon is shutting down: build cancelled"))),
            }
        };
        let Some(result) = result else { return };
        while let Ok(event) = events.try_recv() {
            for line in plain.lines(&event) {
                lines.send(&json!({ "stream": format!("{line}\n") })).await;
            }
        }
        match result {
            Ok(Some(id)) => {
                lines.send(&json!({ "aux": { "ID": id } })).await;
                let short = id.trim_start_matches("sha256:").get(..12).unwrap_or_default().to_string();
                lines.send(&json!({ "stream": format!("Successfully built {short}\n") })).await;
                for t in &tags {
                    let name = kiln_cache::images::normalize_reference(t).map(|n| familiar_name(&n).to_string()).unwrap_or_else(|_| t.clone());
                    lines.send(&json!({ "stream": format!("Successfully tagged {name}\n") })).await;
                }
            }
            Ok(None) => {
                lines.send(&error_line("build: no image was produced")).await;
            }
            Err(e) => {
                lines.send(&error_line(&format!("{e:#}"))).await;
            }
        }
        drop(dir);
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stripped() {
        assert_eq!(strip_version("/v1.41/images/json"), (Some("1.41"), "/images/json"));
        assert_eq!(strip_version("/_ping"), (None, "/_ping"));
        assert_eq!(strip_version("/v1.41"), (Some("1.41"), "/"));
        assert_eq!(strip_version("/vx.1/a"), (None, "/vx.1/a"));
        assert_eq!(strip_version("/v1/images"), (None, "/v1/images"));
    }

    #[test]
    fn rfc3339_to_unix() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2024-02-29T12:00:00.123456789Z"), Some(1709208000));
        assert_eq!(unix_seconds("2024-02-29T13:00:00+01:00"), Some(1709208000));
        assert_eq!(unix_seconds("garbage"), None);
    }

    #[test]
    fn frames() {
        assert_eq!(frame_header(2, 258), [2, 0, 0, 0, 0, 0, 1, 2]);
    }
}
