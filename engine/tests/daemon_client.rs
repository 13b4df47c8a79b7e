//! The client's side of the build protocol, against a scripted daemon: a
//! unix socket that answers each request with the next canned answer and
//! records what it got. Only a 412 makes a by-key build send its list
//! again; any other error, a 400 too, is the build's answer at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

/// A request as the scripted daemon saw it: request line and body.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Serve `answers` (status, JSON body) one per connection on `socket`, in
/// a thread, then a 500 to any request beyond them; returns what the
/// requests were.
fn scripted_daemon(socket: &Path, answers: Vec<(u16, &'static str)>) -> Seen {
    let listener = UnixListener::bind(socket).unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        let unexpected = std::iter::repeat((500, r#"{"message": "scripted daemon: no answer left for this request"}"#));
        for (status, body) in answers.into_iter().chain(unexpected) {
            let Ok((stream, _)) = listener.accept() else { return };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut request_body = vec![0; length];
            reader.read_exact(&mut request_body).unwrap();
            record.lock().unwrap().push((request_line.trim().to_string(), String::from_utf8_lossy(&request_body).into_owned()));
            let answer = format!(
                "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = reader.get_mut().write_all(answer.as_bytes());
        }
    });
    seen
}

/// `kiln --host unix://SOCKET build CONTEXT`, its checksum cache kept in `tmp`.
fn build(tmp: &Path, socket: &Path) -> Output {
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\n").unwrap();
    std::fs::write(ctx.join("a.txt"), "a\n").unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--host")
        .arg(format!("unix://{}", socket.display()))
        .args(["build", "--progress", "plain"])
        .arg(&ctx)
        .env("XDG_CACHE_HOME", tmp.join("cache"))
        .output()
        .unwrap()
}

#[test]
fn a_400_to_a_build_by_key_is_reported_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("kiln.sock");
    let seen = scripted_daemon(&socket, vec![(400, r#"{"message": "build: network \"bogus\": expected default, none or host"}"#)]);
    let out = build(tmp.path(), &socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(r#"network "bogus": expected default, none or host"#), "{err}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one request, not retried with the list: {seen:?}");
    assert_eq!(seen[0].0, "POST /v1/build HTTP/1.1");
    assert!(seen[0].1.contains(r#""context_key":""#) && seen[0].1.contains(r#""context":[]"#), "{}", seen[0].1);
}

#[test]
fn a_412_gets_the_list_and_a_400_after_it_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("kiln.sock");
    let seen = scripted_daemon(
        &socket,
        vec![(412, r#"{"message": "the daemon does not keep this context: send the list"}"#), (400, r#"{"message": "context entry 0: scripted refusal"}"#)],
    );
    let out = build(tmp.path(), &socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("context entry 0: scripted refusal"), "{err}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The second request carries the list itself (and no key).
    let second: serde_json::Value = serde_json::from_str(&seen[1].1).unwrap();
    let paths: Vec<&str> = second["context"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["Dockerfile", "a.txt"], "{}", seen[1].1);
    assert!(second.get("context_key").is_none_or(|k| k.is_null()), "{}", seen[1].1);
}
