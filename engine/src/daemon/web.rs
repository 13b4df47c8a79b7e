//! HTTP plumbing shared by both APIs: the body type, errors that become
//! status codes, size-limited body reading, query strings and JSON-lines
//! streams.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde::Serialize;

/// Every response body: boxed so fixed and streamed bodies share a type.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The largest JSON request body accepted (1 MiB).
pub const MAX_JSON_BODY: usize = 1 << 20;
/// The largest upload (build context, file blobs) accepted (1 GiB; uploads
/// are held in memory while they are checked).
pub const MAX_UPLOAD_BODY: usize = 1 << 30;

/// An error with the HTTP status it maps to. The message is sent to the
/// client as `{"message": ...}` (the Docker API's error shape, which kiln's
/// API shares).
#[derive(Debug)]
pub struct ApiError {
    /// The status code.
    pub status: StatusCode,
    /// What went wrong, for the client.
    pub message: String,
    /// For a build whose context contents the daemon lacks (412): their
    /// digests, sent as `"missing"` beside the message.
    pub missing: Vec<String>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), missing: Vec::new() }
    }
    /// 412: the build's context lists contents the daemon does not hold.
    pub fn contents_missing(missing: Vec<String>) -> ApiError {
        let message = format!("the daemon lacks {} of the context's contents: upload them, then send the build again", missing.len());
        ApiError { status: StatusCode::PRECONDITION_FAILED, message, missing }
    }
    /// 412 for a build naming its context by a key the daemon does not
    /// keep (new, or evicted): send the file list itself.
    pub fn context_unknown() -> ApiError {
        let message = "the daemon does not keep this context: send the build again with its file list".to_string();
        ApiError { status: StatusCode::PRECONDITION_FAILED, message, missing: Vec::new() }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    /// The response for this error.
    pub fn into_response(self) -> Response<Body> {
        if self.missing.is_empty() {
            json_response(self.status, &serde_json::json!({ "message": self.message }))
        } else {
            json_response(self.status, &serde_json::json!({ "message": self.message, "missing": self.missing }))
        }
    }
}

impl From<anyhow::Error> for ApiError {
    /// Engine errors: a missing image is 404, anything else 500.
    fn from(e: anyhow::Error) -> ApiError {
        let not_found = e.chain().any(|c| {
            matches!(c.downcast_ref::<kiln_cache::images::ImageError>(), Some(kiln_cache::images::ImageError::NotFound(_)))
        });
        let status = if not_found { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR };
        ApiError::new(status, format!("{e:#}"))
    }
}

/// What a route handler returns.
pub type ApiResult = Result<Response<Body>, ApiError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"message\":\"serializing: {e}\"}}").into_bytes());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("static response parts are valid")
}

/// 200 with a JSON body.
pub fn ok_json(value: &impl Serialize) -> ApiResult {
    Ok(json_response(StatusCode::OK, value))
}

/// A response with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    Response::builder().status(status).body(full(Bytes::new())).expect("static response parts are valid")
}

/// Read the whole body, refusing more than `limit` bytes with 413.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than the limit of {limit} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

/// The largest archive upload (`import`, `load`) accepted (64 GiB; these
/// go to disk as they arrive, not to memory).
pub const MAX_ARCHIVE_UPLOAD: u64 = 64 << 30;

/// Write the body to a new file at `path` as it arrives, refusing more
/// than `limit` bytes with 413; returns the number of bytes.
pub async fn receive_to_file(mut body: Incoming, path: &std::path::Path, limit: u64) -> Result<u64, ApiError> {
    use tokio::io::AsyncWriteExt;
    let internal = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        let Some(data) = frame.data_ref() else { continue };
        total += data.len() as u64;
        if total > limit {
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than the limit of {limit} bytes")));
        }
        file.write_all(data).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    Ok(total)
}

/// The file at `path` in chunks of at most `chunk` bytes, read on a
/// blocking thread; `keep` (e.g. the temp dir holding the file) is
/// dropped once the file has been read.
pub fn file_chunks(
    path: std::path::PathBuf,
    chunk: usize,
    keep: impl Send + 'static,
) -> tokio::sync::mpsc::Receiver<std::io::Result<Bytes>> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let _keep = keep;
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => return drop(tx.blocking_send(Err(e))),
        };
        loop {
            let mut buf = vec![0u8; chunk];
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return drop(tx.blocking_send(Err(e))),
            }
        }
    });
    rx
}

/// Parse a JSON request body (at most [`MAX_JSON_BODY`]); an empty body is
/// read as `{}`.
pub async fn read_json<T: serde::de::DeserializeOwned>(body: Incoming) -> Result<T, ApiError> {
    let bytes = read_body(body, MAX_JSON_BODY).await?;
    parse_json(&bytes)
}

/// Parse JSON, naming the line and column of a syntax error.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!("malformed JSON request body at line {} column {}: {e}", e.line(), e.column()))
    })
}

/// A parsed query string (`a=1&b=2`, percent-decoded; for [`Query::get`]
/// later keys win, [`Query::all`] sees every value).
#[derive(Debug, Default, Clone)]
pub struct Query(pub BTreeMap<String, String>, Vec<(String, String)>);

impl Query {
    /// Parse the query part of a URI.
    pub fn parse(query: Option<&str>) -> Result<Query, ApiError> {
        let mut map = BTreeMap::new();
        let mut pairs = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k)?, percent_decode(v)?);
            map.insert(k.clone(), v.clone());
            pairs.push((k, v));
        }
        Ok(Query(map, pairs))
    }
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    /// Every value of `key`, in order (e.g. repeated `t=`).
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.1.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }
    /// `key` as a boolean (`1`, `true`, `True` are true; absent is false).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "True" | "TRUE"))
    }
}

/// Decode `%XX` escapes and `+` (as space, as in forms); the result must be UTF-8.
pub fn percent_decode(s: &str) -> Result<String, ApiError> {
    decode(s, true)
}

/// Decode `%XX` escapes in a URI path (`+` stays `+`).
pub fn percent_decode_path(s: &str) -> Result<String, ApiError> {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                    ApiError::bad_request(format!("query string {s:?}: bad percent escape at byte {i}"))
                })?;
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("query string {s:?}: not UTF-8")))
}

/// A sender of JSON-lines messages into a streamed response body. Sends
/// fail once the client has gone away, which is how handlers notice it.
#[derive(Clone)]
pub struct LineSender(tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>);

impl LineSender {
    /// Send one JSON value followed by a newline; `false` if the client is gone.
    pub async fn send(&mut self, value: &impl Serialize) -> bool {
        let mut line = match serde_json::to_vec(value) {
            Ok(l) => l,
            Err(_) => return true,
        };
        line.push(b'\n');
        self.send_raw(Bytes::from(line)).await
    }
    /// Send raw bytes; `false` if the client is gone.
    pub async fn send_raw(&mut self, bytes: Bytes) -> bool {
        self.0.send(Ok(Frame::data(bytes))).await.is_ok()
    }
    /// Resolves once the client has gone away (the body was dropped).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A 200 response whose body is fed by the returned sender, one chunk per
/// message. `content_type` is e.g. `application/x-ndjson`.
pub fn streaming(content_type: &str) -> (Response<Body>, LineSender) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let body = StreamBody::new(stream).boxed();
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("static response parts are valid");
    (response, LineSender(tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = Query::parse(Some("t=a%2Fb%3A1&nocache=1&x&buildargs=%7B%22A%22%3A%22b+c%22%7D")).unwrap();
        assert_eq!(q.get("t"), Some("a/b:1"));
        assert!(q.flag("nocache"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("buildargs"), Some("{\"A\":\"b c\"}"));
        assert!(Query::parse(Some("a=%zz")).is_err());
        assert!(Query::parse(Some("a=%ff")).is_err());
        assert!(Query::parse(Some("a=%f")).is_err());
    }

    #[test]
    fn json_errors_name_the_place() {
        let e = parse_json::<serde_json::Value>(b"{\n  \"a\": }").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("line 2 column"), "{}", e.message);
    }
}
