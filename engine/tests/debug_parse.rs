//! `kiln debug parse` runs the real binary: AST out on success (dump and
//! JSON with ranges), error with file:line:column on stderr and exit 1.

use std::process::Command;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

#[test]
fn prints_dump_and_json_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("Dockerfile");
    std::fs::write(&f, "FROM busybox AS base\nRUN echo \\\n  hi\nCMD [\"sh\"]\n").unwrap();
    let out = kiln(&["debug", "parse", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "(from \"busybox\" \"AS\" \"base\")\n(run \"echo   hi\")\n(cmd \"sh\")\n"
    );

    let out = kiln(&["debug", "parse", "--json", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &v["children"][1];
    assert_eq!(run["value"], "RUN");
    assert_eq!(run["span"]["start_line"], 2);
    assert_eq!(run["span"]["end_line"], 3);
    assert_eq!(v["children"][2]["json"], true);
}

#[test]
fn invalid_input_exits_1_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("Dockerfile");
    std::fs::write(&f, "FROM busybox\nCMD [[\"nested\"]]\n").unwrap();
    let out = kiln(&["debug", "parse", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("Dockerfile:2:1: when using JSON array syntax"), "{err}");
    assert!(err.contains("CMD [[\"nested\"]]"), "{err}");
}
