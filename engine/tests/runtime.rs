//! The container runtime on real containers (needs root and busybox-static).

mod runtime_common;

use kiln_engine::runtime::{ContainerSpec, Stdio};
use runtime_common::{Capture, Scratch, mounts_below, tree};

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[test]
fn echo_goes_to_stdout_and_exit_code_propagates() {
    require_containers!();
    let s = Scratch::new();
    let rt = s.runtime();
    let base = s.busybox_layer("base");
    let cap = Capture::default();
    let spec = ContainerSpec::new(s.rootfs(vec![base.clone()], "a"), sh("echo hello; echo oops >&2; exit 3"));
    let code = rt.run(&spec, Stdio::stream(cap.sink())).unwrap();
    assert_eq!(code, 3);
    assert_eq!(cap.out(), "hello\n");
    assert_eq!(cap.err(), "oops\n");
    assert!(mounts_below(s.path()).is_empty(), "mounts left: {:?}", mounts_below(s.path()));
}

#[test]
fn run_like_exec_leaves_exact_diff() {
    require_containers!();
    let s = Scratch::new();
    let rt = s.runtime();
    let base = s.busybox_layer("base");
    let cap = Capture::default();
    let rootfs = s.rootfs(vec![base], "a");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, sh("echo hi > /hello"));
    let code = rt.run(&spec, Stdio::stream(cap.sink())).unwrap();
    assert_eq!(code, 0, "stderr: {}", cap.err());
    assert_eq!(tree(&upper), vec!["hello".to_string()]);
}
