//! `ADD http://...`: fetch one file over plain HTTP/1.1.
//!
//! Kept deliberately small (GET, redirects, chunked or sized bodies); the
//! result is one file in a fresh layer, keyed by its content digest, so a
//! changed download changes the key of everything that copies it.
//! HTTPS needs a TLS client the solver does not carry: it is refused with
//! a clear error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

const MAX_REDIRECTS: usize = 10;

/// Download `url`; returns the body.
pub fn fetch(url: &str) -> anyhow::Result<Vec<u8>> {
    let mut url = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        match get(&url)? {
            Response::Body(b) => return Ok(b),
            Response::Redirect(to) => url = absolute(&url, &to),
        }
    }
    bail!("{url}: too many redirects")
}

enum Response {
    Body(Vec<u8>),
    Redirect(String),
}

fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    if url.starts_with("https://") {
        bail!("{url}: https downloads are not supported yet (only http://)");
    }
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: not an http URL"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    anyhow::ensure!(!host.is_empty(), "{url}: no host");
    Ok((host.to_string(), path.to_string()))
}

fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let host = split_url(base).map(|(h, _)| h).unwrap_or_default();
    format!("http://{host}{location}")
}

fn get(url: &str) -> anyhow::Result<Response> {
    let (host, path) = split_url(url)?;
    let addr = if host.contains(':') { host.clone() } else { format!("{host}:80") };
    let mut stream = TcpStream::connect(&addr).with_context(|| format!("{url}: connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kiln\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{url}: bad HTTP status line {status:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut location = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => length = v.parse::<u64>().ok(),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "location" => location = Some(v.to_string()),
                _ => {}
            }
        }
    }
    if (300..400).contains(&code) {
        return Ok(Response::Redirect(location.with_context(|| format!("{url}: redirect without Location"))?));
    }
    if !(200..300).contains(&code) {
        bail!("{url}: HTTP {code}");
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = u64::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("{url}: bad chunk size {size:?}"))?;
            if n == 0 {
                break;
            }
            (&mut reader).take(n).read_to_end(&mut body)?;
            let mut crlf = String::new();
            reader.read_line(&mut crlf)?;
        }
    } else if let Some(n) = length {
        (&mut reader).take(n).read_to_end(&mut body)?;
        anyhow::ensure!(body.len() as u64 == n, "{url}: body cut short ({} of {n} bytes)", body.len());
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response::Body(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve(responses: Vec<&'static str>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for response in responses {
                let (mut s, _) = listener.accept().unwrap();
                // Read the whole request head before answering.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                s.write_all(response.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn sized_chunked_redirect_and_errors() {
        let addr = serve(vec![
            "HTTP/1.1 302 Found\r\nLocation: /real\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ]);
        assert_eq!(fetch(&format!("http://{addr}/file")).unwrap(), b"hello");
        assert_eq!(fetch(&format!("http://{addr}/c")).unwrap(), b"abcde");
        assert!(fetch(&format!("http://{addr}/missing")).unwrap_err().to_string().contains("404"));
        assert!(fetch("https://example.invalid/x").unwrap_err().to_string().contains("https"));
    }
}
