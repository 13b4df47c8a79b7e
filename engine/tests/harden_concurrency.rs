//! Concurrent builds on one store (issue 9, "Concurrency").
//!
//! Eight `kiln build` processes start at once on one root — some with the
//! same Dockerfile, some sharing a base and first steps — in embedded mode
//! (eight processes, one store) and through one `kiln serve`. Every build
//! must succeed and every step must execute exactly once over all eight,
//! counted twice: from the `--progress=json` events (one `started` per
//! step over all builds, `cached` in the others) and from the steps
//! themselves, which append their name to a file in a shared cache mount.
//! `kiln check` must find the store consistent afterwards.
//!
//! `sharing=locked` cache mounts: writers in two parallel stages of each of
//! two processes write one file in chunks, with sleeps, and fail if they
//! ever see another writer's half-written file. The same writers with
//! `sharing=shared` do see each other, so the check can tell.

mod common;
mod daemon_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use daemon_support::Daemon;

/// Each step appends its name to `/log/runs`, a cache mount every build
/// shares, so executions can be counted on the host afterwards.
fn step(name: &str, extra: &str) -> String {
    format!("RUN --mount=type=cache,id=exec-log,target=/log sh -c 'echo {name} >> /log/runs; echo {name} > /{name}{extra}'\n")
}

/// The eight builds: (context name, Dockerfile, extra context files).
fn eight_builds() -> Vec<(String, String, Vec<(&'static str, &'static str)>)> {
    // The first step is the same everywhere; it sleeps so that the others
    // arrive while it runs and have to wait for it.
    let common = step("common-1", "; sleep 2");
    let same = format!("FROM busybox\n{common}{}", step("same-2", ""));
    let branch = format!("FROM busybox\n{common}{}COPY a.txt /a.txt\n{}", step("branch-2", ""), step("branch-4", "; cat /a.txt"));
    let multi = format!(
        "FROM busybox AS one\n{common}{}FROM busybox AS two\n{}FROM one\nCOPY --from=two /multi-two /from-two\n",
        step("multi-one", ""),
        step("multi-two", "")
    );
    let solo = format!("FROM busybox\n{}", step("solo-1", ""));
    let mut builds = Vec::new();
    for i in 0..3 {
        builds.push((format!("same{i}"), same.clone(), vec![]));
    }
    for i in 0..2 {
        builds.push((format!("branch{i}"), branch.clone(), vec![("a.txt", "a\n")]));
    }
    for i in 0..2 {
        builds.push((format!("multi{i}"), multi.clone(), vec![]));
    }
    builds.push(("solo".into(), solo, vec![]));
    builds
}

/// Every step name in [`eight_builds`].
const STEPS: &[&str] = &["common-1", "same-2", "branch-2", "branch-4", "multi-one", "multi-two", "solo-1"];

/// Write the eight contexts under `dir`; returns their paths.
fn write_contexts(dir: &Path) -> Vec<PathBuf> {
    eight_builds()
        .into_iter()
        .map(|(name, dockerfile, files)| {
            let ctx = dir.join(name);
            std::fs::create_dir_all(&ctx).unwrap();
            std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
            for (file, text) in files {
                std::fs::write(ctx.join(file), text).unwrap();
            }
            ctx
        })
        .collect()
}

/// Start `kiln ARGS...` for every argument list at once; wait for all.
fn kiln_at_once(arg_lists: Vec<Vec<String>>) -> Vec<Output> {
    let children: Vec<_> = arg_lists
        .iter()
        .map(|args| {
            Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// `kiln <target> build --progress json -t concur:I CTX` for every context
/// at once; `target` is `--root R` or `--host H`.
fn build_all_at_once(target: &[&str], contexts: &[PathBuf]) -> Vec<Output> {
    kiln_at_once(
        contexts
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let mut args: Vec<String> = target.iter().map(|s| s.to_string()).collect();
                args.extend(["build", "--progress", "json", "-t", &format!("concur:{i}"), ctx.to_str().unwrap()].map(String::from));
                args
            })
            .collect(),
    )
}

/// Per vertex of a RUN or COPY step: (its name, how many builds started
/// it, how many found it cached).
fn step_counts(outputs: &[Output]) -> BTreeMap<String, (String, usize, usize)> {
    let mut counts: BTreeMap<String, (String, usize, usize)> = BTreeMap::new();
    for out in outputs {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let (Some(kind), Some(vertex), Some(name)) = (event["type"].as_str(), event["vertex"].as_str(), event["name"].as_str()) else {
                continue;
            };
            if !(name.contains("RUN ") || name.contains("COPY ")) {
                continue;
            }
            let entry = counts.entry(vertex.to_string()).or_insert_with(|| (name.to_string(), 0, 0));
            match kind {
                "started" => entry.1 += 1,
                "cached" => entry.2 += 1,
                _ => {}
            }
        }
    }
    counts
}

/// The host directory of cache mount `id` under `root`.
fn cache_mount_dir(root: &Path, id: &str) -> PathBuf {
    let mounts = root.join("cache-mounts");
    std::fs::read_dir(&mounts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{id}-")))
        .unwrap_or_else(|| panic!("no cache mount {id} under {}", mounts.display()))
}

/// The step names the builds' RUNs appended to the shared execution log.
fn executions(root: &Path) -> Vec<String> {
    std::fs::read_to_string(cache_mount_dir(root, "exec-log").join("runs")).unwrap().lines().map(str::to_string).collect()
}

/// All eight succeeded; each step executed once (log and events agree);
/// each image has the files of its steps.
fn assert_each_step_ran_once(outputs: &[Output], root: &Path, how: &str) {
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "{how} build {i} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut ran = executions(root);
    ran.sort();
    let mut want: Vec<String> = STEPS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(ran, want, "{how}: each step must execute exactly once over the eight builds");

    let counts = step_counts(outputs);
    // 7 RUN steps and the two COPYs.
    assert_eq!(counts.len(), 9, "{how}: distinct RUN/COPY vertices: {counts:#?}");
    for (vertex, (name, started, _)) in &counts {
        assert_eq!(*started, 1, "{how}: {name} ({vertex}) started {started} times over all builds: {counts:#?}");
    }
    // Every build that has a step and did not run it reports it cached:
    // common-1 in 6 more builds, same-2 in 2, the branch and multi steps
    // (3 each) in 1.
    let total_cached: usize = counts.values().map(|c| c.2).sum();
    assert_eq!(total_cached, 6 + 2 + 3 + 3, "{how}: cached reports: {counts:#?}");
    // The first step is in seven of the eight builds: once run, six times cached.
    let (_, started, cached) = counts.values().find(|(n, ..)| n.contains("echo common-1")).expect("common-1 reported");
    assert_eq!((*started, *cached), (1, 6), "{how}: common-1 runs once and six builds report it cached");
    println!("{how}: {} step executions over 8 builds, {total_cached} cached reports", counts.values().map(|c| c.1).sum::<usize>());
}

fn assert_store_consistent(root: &Path) {
    let out = common::kiln(root, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("store is consistent"), "kiln check:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn eight_embedded_builds_on_one_root_run_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    common::kiln_ok(&root, &["load", "-i", common::busybox_layout().to_str().unwrap(), "-t", "busybox:latest"]);
    let contexts = write_contexts(&dir.path().join("contexts"));
    let started = Instant::now();
    let outputs = build_all_at_once(&["--root", root.to_str().unwrap()], &contexts);
    println!("eight embedded builds took {:?}", started.elapsed());
    assert_each_step_ran_once(&outputs, &root, "embedded");
    assert_store_consistent(&root);
    // The images work: a build that shared steps has the files of all.
    let run = common::kiln_ok(&root, &["run", "--rm", "concur:5", "cat", "/common-1", "/multi-one", "/from-two"]);
    assert_eq!(run, "common-1\nmulti-one\nmulti-two\n");
    let locks = root.join("locks").join("keys");
    assert_eq!(std::fs::read_dir(&locks).map(|d| d.count()).unwrap_or(0), 0, "per-key lock files left behind");
}

#[test]
fn eight_builds_through_one_daemon_run_each_step_once() {
    let d = Daemon::start(true, &[]);
    let contexts = write_contexts(&d.dir.path().join("contexts"));
    let started = Instant::now();
    let outputs = build_all_at_once(&["--host", &d.host()], &contexts);
    println!("eight daemon builds took {:?}", started.elapsed());
    assert_each_step_ran_once(&outputs, &d.root, "daemon");
    let run = d.client(&["run", "--rm", "concur:3", "cat", "/common-1", "/branch-4", "/a.txt"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "common-1\nbranch-4\na\n", "{}", String::from_utf8_lossy(&run.stderr));
    let mut d = d;
    assert!(d.stop(), "the daemon stops cleanly: {}", d.log());
    assert_store_consistent(&d.root);
}

/// Writes `/c/file` in five chunks with sleeps; fails when it finds the
/// file half-written by someone else, or its own chunks mixed with
/// another's. It first waits (up to 3 s) for a second writer to arrive, so
/// that writers not kept apart by a lock do overlap.
const WRITER: &str = r#"#!/bin/sh
me=$1
touch /c/arrived-$me
i=0
while [ $i -lt 30 ] && [ "$(ls /c | grep -c '^arrived-')" -lt 2 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /c/file ] && [ "$(tail -n 1 /c/file)" != end ]; then
  echo "$me saw a half-written file: $(cat /c/file | tr '\n' ' ')"; exit 1
fi
: > /c/file
expect=""
for n in 1 2 3 4 5; do
  echo "$me $n" >> /c/file
  expect="$expect$me $n
"
  sleep 0.2
  if [ "$(cat /c/file)" != "$(printf %s "$expect")" ]; then
    echo "$me saw another writer in its file: $(cat /c/file | tr '\n' ' ')"; exit 1
  fi
done
echo end >> /c/file
echo $me >> /c/writers
"#;

/// A context whose two parallel stages run [`WRITER`] on one cache mount
/// with `sharing`; `--build-arg WHO=` makes each process's steps distinct.
fn writer_context(dir: &Path, sharing: &str) -> PathBuf {
    let ctx = dir.join(format!("writers-{sharing}"));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("w.sh"), WRITER).unwrap();
    let run = |stage: &str| {
        format!("FROM base AS {stage}\nARG WHO\nRUN --mount=type=cache,id=chunks,target=/c,sharing={sharing} sh /w.sh $WHO-{stage} && echo $WHO > /{stage}\n")
    };
    let dockerfile = format!(
        "FROM busybox AS base\nCOPY w.sh /w.sh\n{}{}FROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
        run("a"),
        run("b")
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

/// Two processes at once, each building [`writer_context`] with its own
/// `WHO`; returns their outputs.
fn two_writer_builds(root: &Path, ctx: &Path) -> Vec<Output> {
    kiln_at_once(
        ["p1", "p2"]
            .iter()
            .map(|who| {
                ["--root", root.to_str().unwrap(), "build", "--progress", "plain", "--build-arg", &format!("WHO={who}"), ctx.to_str().unwrap()]
                    .map(String::from)
                    .to_vec()
            })
            .collect(),
    )
}

#[test]
fn locked_cache_mount_keeps_parallel_stages_and_processes_apart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    common::kiln_ok(&root, &["load", "-i", common::busybox_layout().to_str().unwrap(), "-t", "busybox:latest"]);

    let ctx = writer_context(dir.path(), "locked");
    let started = Instant::now();
    let outputs = two_writer_builds(&root, &ctx);
    println!("two processes x two stages with sharing=locked took {:?}", started.elapsed());
    for out in &outputs {
        assert!(out.status.success(), "a locked writer saw another:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut writers: Vec<String> = std::fs::read_to_string(cache_mount_dir(&root, "chunks").join("writers")).unwrap().lines().map(str::to_string).collect();
    writers.sort();
    assert_eq!(writers, ["p1-a", "p1-b", "p2-a", "p2-b"], "all four writers finished");
    assert_store_consistent(&root);

    // The control: the same writers with sharing=shared run into each
    // other, so the check above is one that can fail.
    let root2 = dir.path().join("root2");
    common::kiln_ok(&root2, &["load", "-i", common::busybox_layout().to_str().unwrap(), "-t", "busybox:latest"]);
    let shared = two_writer_builds(&root2, &writer_context(dir.path(), "shared"));
    let all_err: String = shared.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert!(
        shared.iter().any(|o| !o.status.success()) && all_err.contains(" saw "),
        "sharing=shared writers should have seen each other:\n{all_err}"
    );
}
