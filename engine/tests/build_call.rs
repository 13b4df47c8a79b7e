//! `kiln build --call outline|targets|check`: inspects a Dockerfile without
//! building (no store, registry or container involved).

use std::path::Path;
use std::process::Command;

const DOCKERFILE: &str = "\
# VERSION the release to build
ARG VERSION=1.0
# build compiles the program
FROM busybox as build
MAINTAINER me
RUN echo hi
FROM scratch AS final
COPY --from=build /bin/busybox /busybox
CMD run it
";

fn call(ctx: &Path, method: &str) -> (i32, String, String) {
    let root = ctx.join("root");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--root", root.to_str().unwrap(), "build", "--call", method, ctx.to_str().unwrap()])
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn context() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).unwrap();
    dir
}

#[test]
fn outline_lists_the_target_and_its_args() {
    let ctx = context();
    let (code, stdout, stderr) = call(ctx.path(), "outline");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("TARGET:      final"), "{stdout}");
    assert!(stdout.contains("VERSION\t1.0\tthe release to build"), "{stdout}");
}

#[test]
fn targets_lists_stages_with_the_default_last() {
    let ctx = context();
    let (code, stdout, stderr) = call(ctx.path(), "targets");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("build\tcompiles the program"), "{stdout}");
    assert!(stdout.contains("final (default)"), "{stdout}");
}

#[test]
fn check_reports_lint_warnings_with_locations_and_exits_1() {
    let ctx = context();
    let (code, stdout, _) = call(ctx.path(), "check");
    assert_eq!(code, 1, "{stdout}");
    for (rule, line) in [("FromAsCasing", 4), ("MaintainerDeprecated", 5), ("JSONArgsRecommended", 9)] {
        assert!(stdout.contains(&format!("WARNING: {rule}")), "{rule} missing:\n{stdout}");
        assert!(stdout.contains(&format!("Dockerfile:{line}:1")), "line {line} missing:\n{stdout}");
    }
    let (code, stdout, _) = call(ctx.path(), "check,format=json");
    assert_eq!(code, 1);
    let warnings: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    assert_eq!(warnings.as_array().map(Vec::len), Some(3), "{stdout}");
    // A clean Dockerfile passes.
    std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY a /a\n").unwrap();
    let (code, stdout, _) = call(ctx.path(), "check");
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("no warnings found"), "{stdout}");
}

#[test]
fn unknown_method_is_a_clear_error() {
    let ctx = context();
    let (code, _, stderr) = call(ctx.path(), "bogus");
    assert_eq!(code, 1);
    assert!(stderr.contains("--call \"bogus\": expected build, outline, targets or check"), "{stderr}");
}
