//! `kiln build`'s glue with a real container: a hand-made definition (the
//! lowering of `FROM scratch; COPY busybox; RUN ...; COPY`), solved with the
//! container executor, exported into the local store and named.
//! Needs root (containers) and a static busybox on the host.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_cache::Store;
use kiln_engine::build::{BuildRequest, build, new_solver};
use kiln_frontend::graph::*;
use kiln_frontend::{Definition, History, Span};
use kiln_solver::{Event, EventSink, ImageSource, ResolvedImage};

struct NoImages;

#[async_trait::async_trait]
impl ImageSource for NoImages {
    async fn resolve(&self, reference: &str, _: &Platform) -> anyhow::Result<ResolvedImage> {
        anyhow::bail!("this test pulls no images ({reference})")
    }
}

fn node(op: Op, inputs: Vec<usize>, description: &str, line: usize) -> OpNode {
    OpNode {
        op,
        inputs,
        meta: OpMeta {
            description: description.into(),
            span: Some(Span { start_line: line, start_col: 1, end_line: line, end_col: 1 }),
            ..Default::default()
        },
    }
}

fn copy(sources: &[&str], dest: &str, mode: Option<u32>) -> FileAction {
    FileAction::Copy(CopyAction { mode, ..CopyAction::new(1, sources.iter().map(|s| s.to_string()).collect(), dest) })
}

fn definition(script: &str) -> Definition {
    let ctx = Op::Source(SourceOp::Local { name: "context".into(), include: vec![], exclude: vec![] });
    let ops = vec![
        node(Op::Source(SourceOp::Scratch), vec![], "FROM scratch", 1),
        node(ctx, vec![], "[internal] load build context", 0),
        node(
            Op::File(FileOp {
                base: Some(0),
                actions: vec![
                    copy(&["busybox"], "/bin/busybox", Some(0o755)),
                    FileAction::Symlink { target: "busybox".into(), path: "/bin/sh".into() },
                ],
            }),
            vec![0, 1],
            "[2/4] COPY busybox /bin/busybox",
            2,
        ),
        node(
            Op::Exec(ExecOp {
                args: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: String::new(),
                network: NetworkMode::None,
                insecure: false,
                mounts: vec![],
            }),
            vec![2],
            &format!("[3/4] RUN {script}"),
            3,
        ),
        node(Op::File(FileOp { base: Some(0), actions: vec![copy(&["greeting.txt"], "/greeting.txt", None)] }), vec![3, 1], "[4/4] COPY greeting.txt /", 4),
    ];
    let mut def = Definition { target: ops.len() - 1, ops, ..Default::default() };
    def.image.config.cmd = Some(vec!["/bin/sh".into()]);
    def.image.history = ["COPY busybox /bin/busybox", "RUN", "COPY greeting.txt /"]
        .iter()
        .map(|c| History { created_by: c.to_string(), ..Default::default() })
        .collect();
    def
}

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("containers need root");
    }
    if !std::path::Path::new("/usr/bin/busybox").exists() {
        return Some("no static busybox at /usr/bin/busybox");
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_runs_exports_and_caches() {
    if let Some(why) = skip_reason() {
        println!("skipped: build glue test because {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ctx: PathBuf = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/usr/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("greeting.txt"), "hello\n").unwrap();
    let store = Arc::new(Store::open(&tmp.path().join("root")).unwrap());
    let solver = new_solver(store.clone(), Arc::new(NoImages)).unwrap();
    let script = "echo built > /out.txt && busybox mkdir -p /made/dir && echo to-stdout";
    let req = BuildRequest {
        definition: definition(script),
        locals: HashMap::from([("context".to_string(), ctx.clone())]),
        tags: vec!["kiln-test/glue:1".into()],
        iidfile: Some(tmp.path().join("iid")),
        ..Default::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = build(&solver, req.clone(), EventSink(Some(tx))).await.unwrap();
    assert_eq!(result.layers.len(), 3);
    let view = kiln_cache::layered::LayeredView::new(result.layers.iter().map(|l| store.snapshots.path(l)).collect());
    let read = |p: &str| std::fs::read_to_string(view.lookup(std::path::Path::new(p)).unwrap().unwrap().host_path).unwrap();
    assert_eq!(read("out.txt"), "built\n");
    assert_eq!(read("greeting.txt"), "hello\n");
    assert!(view.lookup(std::path::Path::new("made/dir")).unwrap().unwrap().metadata.is_dir());
    // The RUN layer holds only what the process wrote (no runtime stubs).
    let run_layer = store.snapshots.path(&result.layers[1]);
    let mut names: Vec<String> =
        std::fs::read_dir(&run_layer).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["made", "out.txt"], "RUN layer content");
    let id = result.image_id().unwrap();
    assert_eq!(std::fs::read_to_string(tmp.path().join("iid")).unwrap(), id);
    let record = store.images.get("kiln-test/glue:1").unwrap().expect("image named");
    assert_eq!(record.config_digest, id);
    let mut logs = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let Event::Log { line, .. } = e {
            logs.push(line);
        }
    }
    assert!(logs.contains(&"to-stdout".to_string()), "{logs:?}");

    // Again, a second later: everything cached, same image (the config's
    // created time is the newest layer's, not the clock's).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let again = build(&solver, req.clone(), EventSink(Some(tx))).await.unwrap();
    assert_eq!(again.layers, result.layers);
    assert_eq!(again.image_id(), result.image_id());
    let mut started = 0;
    while let Ok(e) = rx.try_recv() {
        started += matches!(e, Event::Started { .. }) as usize;
    }
    assert_eq!(started, 0, "a rebuild with nothing changed executes nothing");

    // A failing RUN names its step and line and carries its output.
    let mut bad = req.clone();
    bad.definition = definition("echo about to fail; exit 3");
    let err = build(&solver, bad, EventSink::default()).await.unwrap_err();
    let err = err.downcast::<kiln_solver::SolveError>().expect("a solve error");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("exit code: 3"), "{}", err.message);
    assert_eq!(err.log_tail, ["about to fail"]);
}
