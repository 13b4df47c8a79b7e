//! `--progress auto` on a real terminal: the live view (one line per running
//! step with its elapsed time and the tail of its output, redrawn in place),
//! and plain text when stderr is not a terminal.
//!
//! The terminal is a pty made by util-linux `script`, so kiln sees exactly
//! what it sees in a user's shell.

mod common;

use std::process::Command;

use common::{BuildDirs, kiln};

/// Cut the output at ANSI escape sequences (CSI `ESC [ ... final`) and
/// carriage returns: each redraw of a line becomes a line of its own.
fn split_redraws(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            out.push('\n');
            continue;
        }
        out.push(if c == '\r' { '\n' } else { c });
    }
    out
}

/// Single-quote `s` for sh.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn auto_progress_is_a_live_view_on_a_terminal_and_plain_otherwise() {
    if !common::can_run_containers("tty progress", &["script", "docker-registry"]) {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp: _tmp, root, ctx } = BuildDirs::new();
    // The step runs long enough for several redraws, and its output changes
    // while it runs: the live line must show the newest line.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo first-output-line; sleep 2; echo newest-output-line; sleep 2\n",
    )
    .unwrap();
    let kiln_cmd = [env!("CARGO_BIN_EXE_kiln"), "--root", root.to_str().unwrap(), "--registry-mirror", &mirror, "build", "--progress", "auto", "-t", "tty:1", ctx.to_str().unwrap()]
        .iter()
        .map(|a| quoted(a))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &format!("stty cols 120 rows 40; {kiln_cmd}"), "/dev/null"])
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "build on a pty failed:\n{raw}\n{}", String::from_utf8_lossy(&out.stderr));
    // Redrawn in place: cursor movement / line erase sequences.
    assert!(raw.contains("\u{1b}["), "no terminal control sequences on a tty:\n{raw:?}");
    let text = split_redraws(&raw);
    // Live lines of the running RUN step: its name, an elapsed time, and the
    // newest output line (not only the first).
    let live: Vec<&str> = text.lines().filter(|l| l.contains("RUN echo first-output-line") && !l.contains("DONE")).collect();
    assert!(
        live.iter().any(|l| l.contains("newest-output-line") && l.split_whitespace().any(|w| w.ends_with('s') && w[..w.len() - 1].parse::<u32>().is_ok())),
        "no live line with elapsed time and the output's tail:\n{text}"
    );
    // Finished steps stay above the live area, in the plain format.
    assert!(text.lines().any(|l| l.starts_with('#') && l.contains("RUN echo first-output-line") && l.contains(" DONE ")), "{text}");

    // The same build with stderr on a pipe: plain text, no escape sequences.
    let plain = kiln(&root, &["--registry-mirror", &mirror, "build", "--progress", "auto", "--no-cache", "-t", "tty:2", ctx.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(plain.status.success(), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape sequences on a pipe:\n{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with('#') && l.contains("newest-output-line")), "{stderr}");
}
