//! Test seams: a fake executor that records requests and writes files into
//! the upper dir it is given, and a fake image source that makes snapshots
//! from in-memory layer descriptions.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_cache::Store;
use kiln_cache::snapshots::SnapshotMeta;
use kiln_frontend::graph::*;
use kiln_frontend::{Definition, Span};
use kiln_solver::{ExecRequest, Executor, HostMountSource, ImageSource, LogSink, LogStream, ResolvedImage, Solver};

/// One finished (or started) execution.
#[derive(Debug, Clone)]
pub struct Run {
    pub req: ExecRequest,
    pub start: Instant,
    pub end: Option<Instant>,
    /// Contents of mounted files read while running (`read` command).
    pub read: Vec<(String, String)>,
    /// Whether the mounts' host paths existed while running.
    pub mount_paths: Vec<PathBuf>,
}

/// Interprets `args` as `;`-separated commands:
/// `write PATH CONTENT`, `sleep MS`, `echo TEXT`, `fail CODE`,
/// `read MOUNT_TARGET` (records the content of a bind-mounted file).
#[derive(Default)]
pub struct FakeExecutor {
    pub runs: Mutex<Vec<Run>>,
}

impl FakeExecutor {
    pub fn count(&self) -> usize {
        self.runs.lock().unwrap().len()
    }
    pub fn args(&self) -> Vec<Vec<String>> {
        self.runs.lock().unwrap().iter().map(|r| r.req.args.clone()).collect()
    }
}

#[async_trait::async_trait]
impl Executor for FakeExecutor {
    async fn exec(&self, req: ExecRequest, log: LogSink) -> anyhow::Result<i32> {
        let idx = {
            let mut runs = self.runs.lock().unwrap();
            runs.push(Run { req: req.clone(), start: Instant::now(), end: None, read: vec![], mount_paths: vec![] });
            runs.len() - 1
        };
        for m in &req.mounts {
            if let HostMountSource::Bind(p) = &m.source {
                self.runs.lock().unwrap()[idx].mount_paths.push(p.clone());
            }
        }
        for cmd in req.args.split(|a| a == ";") {
            match cmd.first().map(String::as_str) {
                Some("write") => {
                    let path = req.upper.join(cmd[1].trim_start_matches('/'));
                    std::fs::create_dir_all(path.parent().unwrap())?;
                    std::fs::write(path, &cmd[2])?;
                }
                Some("sleep") => tokio::time::sleep(Duration::from_millis(cmd[1].parse()?)).await,
                Some("echo") => log(LogStream::Stdout, format!("{}\n", cmd[1..].join(" ")).as_bytes()),
                Some("fail") => return Ok(cmd[1].parse()?),
                Some("read") => {
                    let m = req.mounts.iter().find(|m| m.target == cmd[1]).expect("mount exists");
                    let HostMountSource::Bind(p) = &m.source else { panic!("bind expected") };
                    let content = std::fs::read_to_string(p)?;
                    self.runs.lock().unwrap()[idx].read.push((cmd[1].clone(), content));
                }
                Some(other) => anyhow::bail!("fake executor: unknown command {other}"),
                None => {}
            }
        }
        self.runs.lock().unwrap()[idx].end = Some(Instant::now());
        Ok(0)
    }
}

/// Images as lists of layers, each a list of (path, content).
pub struct FakeImages {
    pub store: Arc<Store>,
    pub images: Mutex<HashMap<String, (String, Vec<Vec<(String, String)>>)>>,
    pub resolves: Mutex<usize>,
}

impl FakeImages {
    pub fn new(store: Arc<Store>) -> FakeImages {
        FakeImages { store, images: Mutex::new(HashMap::new()), resolves: Mutex::new(0) }
    }
    pub fn add(&self, reference: &str, digest: &str, layers: Vec<Vec<(&str, &str)>>) {
        let layers = layers.into_iter().map(|l| l.into_iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()).collect();
        self.images.lock().unwrap().insert(reference.to_string(), (digest.to_string(), layers));
    }
}

#[async_trait::async_trait]
impl ImageSource for FakeImages {
    async fn resolve(&self, reference: &str, _platform: &Platform) -> anyhow::Result<ResolvedImage> {
        *self.resolves.lock().unwrap() += 1;
        let (digest, layers) =
            self.images.lock().unwrap().get(reference).cloned().ok_or_else(|| anyhow::anyhow!("no such image {reference}"))?;
        let mut ids = Vec::new();
        for (i, files) in layers.iter().enumerate() {
            let id = format!("img-{}-{i}", digest.trim_start_matches("sha256:"));
            if !self.store.snapshots.exists(&id) {
                let active = self.store.snapshots.prepare()?;
                for (path, content) in files {
                    let p = active.fs().join(path.trim_start_matches('/'));
                    std::fs::create_dir_all(p.parent().unwrap())?;
                    if let Some(dir) = path.strip_suffix('/') {
                        std::fs::create_dir_all(active.fs().join(dir.trim_start_matches('/')))?;
                    } else {
                        std::fs::write(p, content)?;
                    }
                }
                self.store.snapshots.commit(active, &id, &SnapshotMeta::default())?;
            }
            ids.push(id);
        }
        Ok(ResolvedImage { manifest_digest: digest, config: b"{}".to_vec(), layers: ids })
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub exec: Arc<FakeExecutor>,
    pub images: Arc<FakeImages>,
    pub solver: Solver,
}

pub fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("store")).unwrap());
    let exec = Arc::new(FakeExecutor::default());
    let images = Arc::new(FakeImages::new(store.clone()));
    let solver = Solver::with_parallelism(store.clone(), exec.clone(), images.clone(), 4);
    Harness { dir, store, exec, images, solver }
}

impl Harness {
    /// A fresh solver on the same store (as a new process would be).
    pub fn reopen(&self) -> Solver {
        let store = Arc::new(Store::open(self.store.root()).unwrap());
        Solver::with_parallelism(store, self.exec.clone(), self.images.clone(), 4)
    }
    pub fn context(&self) -> PathBuf {
        let p = self.dir.path().join("ctx");
        std::fs::create_dir_all(&p).unwrap();
        p
    }
    pub fn layer_paths(&self, layers: &[String]) -> Vec<PathBuf> {
        layers.iter().map(|l| self.store.snapshots.path(l)).collect()
    }
}

/// Builds definitions op by op.
#[derive(Default)]
pub struct Graph {
    pub def: Definition,
}

impl Graph {
    pub fn add(&mut self, op: Op, inputs: Vec<usize>, description: &str, line: usize) -> usize {
        self.def.ops.push(OpNode {
            op,
            inputs,
            meta: OpMeta {
                description: description.into(),
                span: (line > 0).then_some(Span { start_line: line, start_col: 1, end_line: line, end_col: 1 }),
                ..Default::default()
            },
        });
        self.def.target = self.def.ops.len() - 1;
        self.def.target
    }
    pub fn scratch(&mut self) -> usize {
        self.add(Op::Source(SourceOp::Scratch), vec![], "scratch", 0)
    }
    pub fn image(&mut self, reference: &str) -> usize {
        self.add(
            Op::Source(SourceOp::Image { reference: reference.into(), platform: Platform::default() }),
            vec![],
            &format!("FROM {reference}"),
            1,
        )
    }
    pub fn context(&mut self, exclude: &[&str]) -> usize {
        self.add(
            Op::Source(SourceOp::Local {
                name: "context".into(),
                include: vec![],
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
            }),
            vec![],
            "[internal] load build context",
            0,
        )
    }
    pub fn run(&mut self, root: usize, script: &str, line: usize) -> usize {
        let args: Vec<String> = script.split(' ').map(String::from).collect();
        self.run_with(root, args, vec![], vec![], line)
    }
    pub fn run_with(&mut self, root: usize, args: Vec<String>, mounts: Vec<Mount>, extra_inputs: Vec<usize>, line: usize) -> usize {
        let desc = format!("RUN {}", args.join(" "));
        let mut inputs = vec![root];
        inputs.extend(extra_inputs);
        self.add(
            Op::Exec(ExecOp {
                args,
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: String::new(),
                network: NetworkMode::Default,
                insecure: false,
                mounts,
            }),
            inputs,
            &desc,
            line,
        )
    }
    pub fn copy(&mut self, base: usize, ctx: usize, action: CopyAction, line: usize) -> usize {
        let desc = format!("COPY {:?} {}", action.sources, action.dest);
        self.add(Op::File(FileOp { base: Some(0), actions: vec![FileAction::Copy(action)] }), vec![base, ctx], &desc, line)
    }
    pub fn merge(&mut self, inputs: Vec<usize>) -> usize {
        self.add(Op::Merge(MergeOp {}), inputs, "merge", 0)
    }
}

/// A COPY action reading input 1 (Docker's defaults).
pub fn copy(sources: &[&str], dest: &str) -> CopyAction {
    CopyAction::new(1, sources.iter().map(|s| s.to_string()).collect(), dest)
}

pub fn locals(ctx: &Path) -> HashMap<String, PathBuf> {
    HashMap::from([("context".to_string(), ctx.to_path_buf())])
}

/// Read a file from the merged view of `layers`.
pub fn read_merged(h: &Harness, layers: &[String], path: &str) -> Option<String> {
    let view = kiln_cache::layered::LayeredView::new(h.layer_paths(layers));
    let e = view.lookup(Path::new(path)).unwrap()?;
    std::fs::read_to_string(e.host_path).ok()
}
