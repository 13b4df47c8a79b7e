//! [`ContainerExecutor`]: the solver's [`kiln_solver::Executor`] on top of
//! the container [`runtime`](crate::runtime).
//!
//! libcontainer's work is blocking (clone, wait), so each exec runs on
//! tokio's blocking pool; the container is cloned from that thread, which
//! is safe in a multi-threaded process because libcontainer's child only
//! calls async-signal-safe code until it execs.

use std::path::PathBuf;

use anyhow::Context;
use kiln_solver::{ExecRequest, Executor, HostMountSource, LogSink};

use crate::runtime::{ContainerSpec, Mount, MountSource, Rootfs, Runtime, Stdio};

/// Runs the solver's RUN steps as containers.
#[derive(Debug, Clone)]
pub struct ContainerExecutor {
    runtime: Runtime,
}

impl ContainerExecutor {
    /// An executor keeping container state under `state_root` (e.g.
    /// `<kiln root>/run`); cleans up what dead kiln processes left there.
    pub fn new(state_root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        Ok(ContainerExecutor {
            runtime: Runtime::new(state_root)?,
        })
    }

    /// An executor sharing an existing runtime.
    pub fn with_runtime(runtime: Runtime) -> Self {
        ContainerExecutor { runtime }
    }
}

/// The runtime's view of a solver request.
pub fn container_spec(req: ExecRequest) -> ContainerSpec {
    let mounts = req
        .mounts
        .into_iter()
        .map(|m| Mount {
            target: PathBuf::from(m.target),
            source: match m.source {
                HostMountSource::Bind(p) => MountSource::Bind(p),
                HostMountSource::Layers(l) => MountSource::Layers(l),
                HostMountSource::Tmpfs(size) => MountSource::Tmpfs { size },
            },
            readonly: m.readonly,
        })
        .collect();
    ContainerSpec {
        name: None,
        rootfs: Rootfs {
            lower: req.lower,
            upper: req.upper,
            work: req.work,
        },
        args: req.args,
        env: req.env,
        cwd: req.cwd,
        user: req.user,
        mounts,
        network: req.network,
        hostname: req.hostname,
        limits: Default::default(),
    }
}

#[async_trait::async_trait]
impl Executor for ContainerExecutor {
    async fn exec(&self, req: ExecRequest, log: LogSink) -> anyhow::Result<i32> {
        let runtime = self.runtime.clone();
        let spec = container_spec(req);
        tokio::task::spawn_blocking(move || runtime.run(&spec, Stdio::stream(log)))
            .await
            .context("container task panicked")?
    }
}
