//! Lowering: typed stages → the op graph of [`crate::graph`] plus the target
//! stage's image config and history (BuildKit's `dockerfile2llb`).

use std::collections::{BTreeMap, HashMap};

use crate::error::FrontendError;
use crate::graph::*;
use crate::image::{Empty, Healthcheck, History, ImageConfig};
use crate::instructions::{self, Command, CommandLine, CopyCommand, Instruction, RunCommand, Stage};
use crate::parser::Span;
use crate::shell::{EnvList, Lex};

/// Looks up a base image's config and history (the engine implements this
/// by pulling the image's manifest and config).
pub trait ImageMetaResolver {
    /// `reference` is normalized (e.g. `docker.io/library/busybox:latest`).
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<(ImageConfig, Vec<History>), String>;
}

/// Options of one lowering.
#[derive(Debug, Clone, Default)]
pub struct LowerOptions {
    /// `--target` stage name (or index); default: the last stage.
    pub target: Option<String>,
    /// `--build-arg K=V` values.
    pub build_args: BTreeMap<String, String>,
    /// Platform to build for; default: `build_platform`.
    pub target_platform: Option<Platform>,
    /// Platform of the builder.
    pub build_platform: Platform,
    /// Text of the ignore file (`<Dockerfile>.dockerignore` or
    /// `.dockerignore`), read by the caller.
    pub dockerignore: Option<String>,
    /// `--no-cache`: mark every op to be re-executed.
    pub no_cache: bool,
    /// File name used in error messages (default `Dockerfile`).
    pub filename: Option<String>,
}

/// The default `PATH` BuildKit gives images that have none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy",
    "ALL_PROXY", "all_proxy",
];

/// Turn a Dockerfile into a [`Definition`].
///
/// Shape of the graph (the solver relies on it):
/// - one shared `Source::Local { name: "context", exclude: <ignore patterns> }`
///   node for the build context, created only when something reads it;
///   base images are `Source::Image` nodes with normalized references;
///   `Source::Scratch` stands in for an empty rootfs that a RUN needs;
/// - RUN → `Exec` with input 0 = the rootfs (its changes are the result);
///   `args` already wrapped in SHELL for shell form (a heredoc script is
///   passed to the shell unexpanded, as BuildKit does); `env` = image env followed by the
///   ARGs in scope not overridden by ENV (and proxy build args); mounts name
///   further inputs by position (`Bind.input`, `Cache.from`);
/// - COPY/ADD → one `File` op with `base: Some(0)` (input 0 = previous
///   state) and `CopyAction.src_input` naming the source input (context,
///   stage, image, HTTP or git source); heredoc sources become `Mkfile`;
///   `COPY --link` → a `File` op with `base: None` and a `Merge` of
///   `[previous, that]`;
/// - WORKDIR → a `File` op with one `Mkdir` (as BuildKit does);
/// - `Definition.image.history` has the base image's entries, then one entry
///   per instruction as BuildKit writes them (`RUN /bin/sh -c make # buildkit`);
///   entries with `empty_layer == false` match the layer-producing ops
///   (Exec, File, Merge) on the target's chain one to one, in order;
/// - `OpMeta.description` is buildx's `[stage 2/5] RUN make` and `OpMeta.span`
///   the instruction's range. Stages the target does not need are dropped.
pub fn lower(
    dockerfile: &[u8],
    opts: &LowerOptions,
    resolver: &dyn ImageMetaResolver,
) -> Result<Definition, FrontendError> {
    let text = String::from_utf8_lossy(dockerfile);
    let file = opts.filename.clone().unwrap_or_else(|| "Dockerfile".into());
    let fix = |e: FrontendError| e.in_file(file.clone()).with_source(&text);
    let parsed = crate::parser::parse(dockerfile).map_err(fix)?;
    let df = instructions::from_ast(&parsed).map_err(fix)?;
    let mut b = Builder::new(df, opts, resolver, parsed.escape_token).map_err(fix)?;
    let target = b.target_index().map_err(fix)?;
    let res = b.lower_stage(target).map_err(fix)?;
    let op = match res.op {
        Some(op) => op,
        None => b.add(Op::Source(SourceOp::Scratch), vec![], OpMeta::default()),
    };
    Ok(Definition { ops: b.ops, target: op, image: res.image })
}

#[derive(Clone)]
struct StageResult {
    op: Option<OpIndex>,
    image: ImageSpec,
}

struct Builder<'a> {
    opts: &'a LowerOptions,
    resolver: &'a dyn ImageMetaResolver,
    stages: Vec<Stage>,
    done: Vec<Option<StageResult>>,
    in_progress: Vec<bool>,
    ops: Vec<OpNode>,
    dedup: HashMap<String, OpIndex>,
    context: Option<OpIndex>,
    global_args: Vec<(String, String)>,
    target_platform: Platform,
    escape: char,
}

/// Per-stage dispatch state.
struct State {
    op: Option<OpIndex>,
    image: ImageSpec,
    /// ARGs declared in this stage: name and value (if any).
    args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    prefix: String,
    step: usize,
    total: usize,
    platform: Platform,
}

fn platform_args(prefix: &str, p: &Platform) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}PLATFORM"), p.to_string()),
        (format!("{prefix}OS"), p.os.clone()),
        (format!("{prefix}ARCH"), p.architecture.clone()),
        (format!("{prefix}VARIANT"), p.variant.clone()),
    ]
}

/// Parse `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Result<Platform, String> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] => Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: String::new() }),
        [os, arch, v] => Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: v.to_string() }),
        _ => Err(format!("invalid platform {s:?}: expected os/arch[/variant]")),
    }
}

/// Normalize an image reference like Docker: `busybox` →
/// `docker.io/library/busybox:latest`, `user/app` → `docker.io/user/app:latest`,
/// `host:5000/app` kept with its registry, `:latest` added when there is no
/// tag or digest.
pub fn normalize_reference(r: &str) -> Result<String, String> {
    if r.is_empty() || r.chars().any(|c| c.is_whitespace()) {
        return Err(format!("invalid reference format: {r:?}"));
    }
    let (first, rest) = match r.split_once('/') {
        Some((f, rest)) if f.contains('.') || f.contains(':') || f == "localhost" => (f.to_string(), rest.to_string()),
        _ => ("docker.io".to_string(), r.to_string()),
    };
    let mut repo = rest;
    let (name_part, suffix) = match repo.find('@') {
        Some(i) => (repo[..i].to_string(), repo[i..].to_string()),
        None => match repo.rfind(':') {
            Some(i) if !repo[i..].contains('/') => (repo[..i].to_string(), repo[i..].to_string()),
            _ => (repo.clone(), ":latest".to_string()),
        },
    };
    if name_part.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("invalid reference format: repository name must be lowercase".into());
    }
    if name_part.is_empty()
        || !name_part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
    {
        return Err(format!("invalid reference format: {r:?}"));
    }
    repo = name_part;
    if first == "docker.io" && !repo.contains('/') {
        repo = format!("library/{repo}");
    }
    Ok(format!("{first}/{repo}{suffix}"))
}

/// Go's `%q` of a `[]string`: `["a" "b"]`.
fn go_q_slice(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| crate::goquote::quote(s)).collect();
    format!("[{}]", items.join(" "))
}

fn join_path(workdir: &str, p: &str) -> String {
    let trailing = p.ends_with('/') || p.ends_with("/.") || p == ".";
    let joined = if p.starts_with('/') {
        crate::dockerignore::clean_path(p)
    } else {
        crate::dockerignore::clean_path(&format!("/{}/{}", workdir, p))
    };
    if trailing && !joined.ends_with('/') { format!("{joined}/") } else { joined }
}

impl<'a> Builder<'a> {
    fn new(
        df: instructions::Dockerfile,
        opts: &'a LowerOptions,
        resolver: &'a dyn ImageMetaResolver,
        escape: char,
    ) -> Result<Self, FrontendError> {
        let target_platform = opts.target_platform.clone().unwrap_or_else(|| opts.build_platform.clone());
        let mut global: Vec<(String, String)> = platform_args("TARGET", &target_platform);
        global.extend(platform_args("BUILD", &opts.build_platform));
        let lex = Lex::new(escape);
        for (decl, cmd) in &df.meta_args {
            let value = match opts.build_args.get(&decl.name) {
                Some(v) => Some(v.clone()),
                None => match &decl.default {
                    Some(d) => Some(expand(&lex, d, &env_of(&global), cmd.span)?),
                    None => None,
                },
            };
            global.retain(|(k, _)| *k != decl.name);
            if let Some(v) = value {
                global.push((decl.name.clone(), v));
            }
        }
        if df.stages.is_empty() {
            return Err(FrontendError::new("file with no stages"));
        }
        let n = df.stages.len();
        Ok(Builder {
            opts,
            resolver,
            stages: df.stages,
            done: vec![None; n],
            in_progress: vec![false; n],
            ops: Vec::new(),
            dedup: HashMap::new(),
            context: None,
            global_args: global,
            target_platform,
            escape,
        })
    }

    fn target_index(&self) -> Result<usize, FrontendError> {
        match &self.opts.target {
            None => Ok(self.stages.len() - 1),
            Some(t) => self.find_stage(t, self.stages.len()).ok_or_else(|| {
                let names = self.stages.iter().filter_map(|s| s.name.as_deref());
                let hint = crate::error::suggest(t, names).map(|s| format!(" (did you mean {s}?)")).unwrap_or_default();
                FrontendError::new(format!("target stage {} could not be found{hint}", crate::goquote::quote(t)))
            }),
        }
    }

    /// A stage by name (case-insensitive) or index, among the first `limit`.
    fn find_stage(&self, name: &str, limit: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self.stages[..limit.min(self.stages.len())]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Some(i);
        }
        name.parse::<usize>().ok().filter(|i| *i < limit.min(self.stages.len()))
    }

    fn add(&mut self, op: Op, inputs: Vec<OpIndex>, mut meta: OpMeta) -> OpIndex {
        meta.ignore_cache |= self.opts.no_cache;
        self.ops.push(OpNode { op, inputs, meta });
        self.ops.len() - 1
    }

    /// Sources are shared: the same source op appears once.
    fn add_source(&mut self, op: SourceOp) -> OpIndex {
        let key = serde_json::to_string(&op).unwrap_or_default();
        if let Some(&i) = self.dedup.get(&key) {
            return i;
        }
        let i = self.add(Op::Source(op), vec![], OpMeta::default());
        self.dedup.insert(key, i);
        i
    }

    fn context(&mut self) -> OpIndex {
        if let Some(c) = self.context {
            return c;
        }
        let exclude = self.opts.dockerignore.as_deref().map(crate::dockerignore::parse).unwrap_or_default();
        let i = self.add_source(SourceOp::Local { name: "context".into(), include: vec![], exclude });
        self.ops[i].meta.description = "[internal] load build context".into();
        self.context = Some(i);
        i
    }

    fn stage_label(&self, i: usize) -> String {
        match &self.stages[i].name {
            Some(n) => n.clone(),
            None => format!("stage-{i}"),
        }
    }

    fn lower_stage(&mut self, i: usize) -> Result<StageResult, FrontendError> {
        if let Some(r) = &self.done[i] {
            return Ok(r.clone());
        }
        if self.in_progress[i] {
            return Err(FrontendError::at(
                format!("circular dependency detected on stage: {}", self.stage_label(i)),
                self.stages[i].span,
            ));
        }
        self.in_progress[i] = true;
        let r = self.dispatch_stage(i);
        self.in_progress[i] = false;
        let r = r?;
        self.done[i] = Some(r.clone());
        Ok(r)
    }

    fn dispatch_stage(&mut self, i: usize) -> Result<StageResult, FrontendError> {
        let stage = self.stages[i].clone();
        let lex = Lex::new(self.escape);
        let genv = env_of(&self.global_args);
        let base = expand(&lex, &stage.base, &genv, stage.span)?;
        let platform = match &stage.platform {
            Some(p) => {
                let p = expand(&lex, p, &genv, stage.span)?;
                parse_platform(&p).map_err(|e| FrontendError::at(e, stage.span))?
            }
            None => self.target_platform.clone(),
        };
        let (op, mut image) = if let Some(j) = self.find_stage(&base, i) {
            let r = self.lower_stage(j)?;
            (r.op, r.image)
        } else if base.eq_ignore_ascii_case("scratch") {
            (None, ImageSpec { platform: platform.clone(), ..ImageSpec::default() })
        } else {
            let reference = normalize_reference(&base).map_err(|e| FrontendError::at(e, stage.span))?;
            let (config, history) = self
                .resolver
                .resolve(&reference, &platform)
                .map_err(|e| FrontendError::at(format!("failed to resolve {reference}: {e}"), stage.span))?;
            let op = self.add_source(SourceOp::Image { reference: reference.clone(), platform: platform.clone() });
            if self.ops[op].meta.description.is_empty() {
                let single = self.stages.len() == 1 && stage.name.is_none();
                let prefix = if single { String::new() } else { format!("{} ", self.stage_label(i)) };
                self.ops[op].meta = OpMeta {
                    description: format!("[{prefix}1/{}] FROM {reference}", stage.commands.len() + 1),
                    span: Some(stage.span),
                    stage: Some(self.stage_label(i)),
                    ignore_cache: self.opts.no_cache,
                };
            }
            (Some(op), ImageSpec { config, history, platform: platform.clone() })
        };
        image.platform = platform.clone();
        if !image.config.env.iter().any(|e| e.starts_with("PATH=")) {
            image.config.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        // ONBUILD triggers of the base run first, then are cleared.
        let triggers = std::mem::take(&mut image.config.on_build);
        let mut commands = Vec::new();
        for t in &triggers {
            let parsed = crate::parser::parse(t.as_bytes())
                .map_err(|e| FrontendError::at(format!("invalid ONBUILD trigger {t:?}: {}", e.message), stage.span))?;
            for node in &parsed.ast.children {
                let mut c = instructions::parse_command(node).map_err(|e| {
                    FrontendError::at(format!("invalid ONBUILD trigger {t:?}: {}", e.message), stage.span)
                })?;
                c.span = stage.span;
                commands.push(c);
            }
        }
        commands.extend(stage.commands.iter().cloned());
        let single = self.stages.len() == 1 && stage.name.is_none();
        let mut st = State {
            op,
            image,
            args: Vec::new(),
            cmd_set: false,
            prefix: if single { String::new() } else { format!("{} ", self.stage_label(i)) },
            step: 1,
            total: commands.len() + 1,
            platform,
        };
        for c in &commands {
            st.step += 1;
            self.dispatch(&mut st, c, i)?;
        }
        Ok(StageResult { op: st.op, image: st.image })
    }

    fn meta(&self, st: &State, c: &Command, stage: usize) -> OpMeta {
        OpMeta {
            description: format!("[{}{}/{}] {}", st.prefix, st.step, st.total, c.original.trim()),
            span: Some(c.span),
            stage: Some(self.stage_label(stage)),
            ignore_cache: false,
        }
    }

    /// The environment words are expanded with: ARGs in scope, then ENV
    /// (which wins).
    fn word_env(&self, st: &State) -> EnvList {
        let mut list: Vec<String> =
            st.args.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}"))).collect();
        list.extend(st.image.config.env.iter().cloned());
        EnvList::from_slice(&list)
    }

    fn history(st: &mut State, created_by: String, layer: bool) {
        st.image.history.push(History {
            created: None,
            created_by: if layer { format!("{created_by} # buildkit") } else { created_by },
            comment: HISTORY_COMMENT.into(),
            empty_layer: !layer,
        });
    }

    fn set_env(config: &mut ImageConfig, k: &str, v: &str) {
        let entry = format!("{k}={v}");
        match config.env.iter_mut().find(|e| e.split_once('=').map_or(e.as_str(), |p| p.0) == k) {
            Some(e) => *e = entry,
            None => config.env.push(entry),
        }
    }

    fn dispatch(&mut self, st: &mut State, c: &Command, stage: usize) -> Result<(), FrontendError> {
        let lex = Lex::new(self.escape);
        let env = self.word_env(st);
        let x = |w: &str| expand(&lex, w, &env, c.span);
        match &c.instruction {
            Instruction::Env { pairs } => {
                let mut parts = Vec::new();
                for (k, v) in pairs {
                    let (k, v) = (x(k)?, x(v)?);
                    Self::set_env(&mut st.image.config, &k, &v);
                    parts.push(format!("{k}={v}"));
                }
                Self::history(st, format!("ENV {}", parts.join(" ")), false);
            }
            Instruction::Arg { args } => {
                let mut parts = Vec::new();
                for a in args {
                    let auto = platform_args("TARGET", &self.target_platform)
                        .into_iter()
                        .chain(platform_args("BUILD", &self.opts.build_platform))
                        .find(|(k, _)| *k == a.name)
                        .map(|(_, v)| v);
                    let value = match self.opts.build_args.get(&a.name) {
                        Some(v) => Some(v.clone()),
                        None => match &a.default {
                            Some(d) => Some(x(d)?),
                            None => auto.or_else(|| {
                                self.global_args.iter().find(|(k, _)| *k == a.name).map(|(_, v)| v.clone())
                            }),
                        },
                    };
                    parts.push(match &value {
                        Some(v) => format!("{}={v}", a.name),
                        None => a.name.clone(),
                    });
                    st.args.retain(|(k, _)| *k != a.name);
                    st.args.push((a.name.clone(), value));
                }
                Self::history(st, format!("ARG {}", parts.join(" ")), false);
            }
            Instruction::Label { pairs } => {
                let mut parts = Vec::new();
                for (k, v) in pairs {
                    let (k, v) = (x(k)?, x(v)?);
                    parts.push(format!("{k}={v}"));
                    st.image.config.labels.insert(k, v);
                }
                Self::history(st, format!("LABEL {}", parts.join(" ")), false);
            }
            Instruction::Expose { ports } => {
                let mut added = Vec::new();
                for p in ports {
                    for p in lex.process_words(p, &env).map_err(|e| FrontendError::at(e.0, c.span))? {
                        let p = if p.contains('/') { p.to_ascii_lowercase() } else { format!("{p}/tcp") };
                        st.image.config.exposed_ports.insert(p.clone(), Empty {});
                        added.push(format!("{p}:{{}}"));
                    }
                }
                added.sort();
                Self::history(st, format!("EXPOSE map[{}]", added.join(" ")), false);
            }
            Instruction::Volume { paths } => {
                let mut v = Vec::new();
                for p in paths {
                    let p = x(p)?;
                    if p.is_empty() {
                        return Err(FrontendError::at("VOLUME specified can not be an empty string", c.span));
                    }
                    st.image.config.volumes.insert(p.clone(), Empty {});
                    v.push(p);
                }
                Self::history(st, format!("VOLUME [{}]", v.join(" ")), false);
            }
            Instruction::User { user } => {
                let u = x(user)?;
                st.image.config.user = u.clone();
                Self::history(st, format!("USER {u}"), false);
            }
            Instruction::StopSignal { signal } => {
                let s = x(signal)?;
                st.image.config.stop_signal = s.clone();
                Self::history(st, format!("STOPSIGNAL {s}"), false);
            }
            Instruction::Maintainer { name } => {
                Self::history(st, format!("MAINTAINER {name}"), false);
            }
            Instruction::Workdir { path } => {
                let p = x(path)?;
                let wd = join_path(&st.image.config.working_dir, &p);
                let wd = if wd.len() > 1 { wd.trim_end_matches('/').to_string() } else { wd };
                st.image.config.working_dir = wd.clone();
                let owner = (!st.image.config.user.is_empty()).then(|| owner_of(&st.image.config.user));
                let action = FileAction::Mkdir { path: wd.clone(), mode: 0o755, make_parents: true, owner };
                let meta = self.meta(st, c, stage);
                let (base, inputs) = match st.op {
                    Some(op) => (Some(0), vec![op]),
                    None => (None, vec![]),
                };
                st.op = Some(self.add(Op::File(FileOp { base, actions: vec![action] }), inputs, meta));
                Self::history(st, format!("WORKDIR {wd}"), true);
            }
            Instruction::Cmd(cl) => {
                let args = self.with_shell(st, cl);
                st.image.config.cmd = Some(args.clone());
                st.cmd_set = true;
                Self::history(st, format!("CMD {}", go_q_slice(&args)), false);
            }
            Instruction::Entrypoint(cl) => {
                let args = self.with_shell(st, cl);
                st.image.config.entrypoint = Some(args.clone());
                if !st.cmd_set {
                    st.image.config.cmd = None;
                }
                Self::history(st, format!("ENTRYPOINT {}", go_q_slice(&args)), false);
            }
            Instruction::Shell { shell } => {
                st.image.config.shell = shell.clone();
                Self::history(st, format!("SHELL {}", go_q_slice(shell)), false);
            }
            Instruction::Healthcheck(h) => {
                st.image.config.healthcheck = Some(Healthcheck {
                    test: h.test.clone(),
                    interval: h.interval,
                    timeout: h.timeout,
                    start_period: h.start_period,
                    start_interval: h.start_interval,
                    retries: h.retries,
                });
                Self::history(st, format!("HEALTHCHECK &{{{} }}", go_q_slice(&h.test)), false);
            }
            Instruction::Onbuild { expression } => {
                st.image.config.on_build.push(expression.clone());
                Self::history(st, format!("ONBUILD {expression}"), false);
            }
            Instruction::Run(r) => self.dispatch_run(st, c, r, stage, &env)?,
            Instruction::Copy(cp) => self.dispatch_copy(st, c, cp, stage, &env)?,
        }
        Ok(())
    }

    fn shell(st: &State) -> Vec<String> {
        if st.image.config.shell.is_empty() {
            vec!["/bin/sh".into(), "-c".into()]
        } else {
            st.image.config.shell.clone()
        }
    }

    fn with_shell(&self, st: &State, cl: &CommandLine) -> Vec<String> {
        if cl.prepend_shell {
            let mut a = Self::shell(st);
            a.extend(cl.args.iter().cloned());
            a
        } else {
            cl.args.clone()
        }
    }

    /// The state a `from=` / `--from` names: a stage, or an image.
    fn source_input(&mut self, from: &str, stage: usize, span: Span, platform: &Platform) -> Result<OpIndex, FrontendError> {
        if let Some(j) = self.find_stage(from, self.stages.len()) {
            if j == stage {
                return Err(FrontendError::at(
                    format!("circular dependency detected on stage: {}", self.stage_label(j)),
                    span,
                ));
            }
            let r = self.lower_stage(j)?;
            return Ok(match r.op {
                Some(op) => op,
                None => self.add_source(SourceOp::Scratch),
            });
        }
        if from.parse::<usize>().is_ok() {
            return Err(FrontendError::at(format!("invalid stage index {from}: no such stage"), span));
        }
        let reference = normalize_reference(from).map_err(|e| FrontendError::at(e, span))?;
        Ok(self.add_source(SourceOp::Image { reference, platform: platform.clone() }))
    }

    fn dispatch_run(
        &mut self,
        st: &mut State,
        c: &Command,
        r: &RunCommand,
        stage: usize,
        env: &EnvList,
    ) -> Result<(), FrontendError> {
        let lex = Lex::new(self.escape);
        let x = |w: &str| expand(&lex, w, env, c.span);
        let mut cmd = r.cmd.args.clone();
        if !r.heredocs.is_empty() && r.cmd.prepend_shell {
            let first = cmd.first().cloned().unwrap_or_default();
            let is_single = crate::parser::parse_heredoc(&first).ok().flatten().is_some();
            if is_single {
                // BuildKit runs the body itself in the shell, unexpanded
                // (the shell expands it at run time).
                let h = &r.heredocs[0];
                let data = if h.chomp { crate::parser::chomp_heredoc_content(&h.content) } else { h.content.clone() };
                cmd = vec![data];
            } else {
                let mut full = first;
                for h in &r.heredocs {
                    full.push('\n');
                    full.push_str(&h.content);
                    full.push_str(&h.name);
                }
                cmd = vec![full];
            }
        }
        let args = self.with_shell(st, &CommandLine { args: cmd, prepend_shell: r.cmd.prepend_shell });
        let rootfs = match st.op {
            Some(op) => op,
            None => self.add_source(SourceOp::Scratch),
        };
        let mut inputs = vec![rootfs];
        let mut mounts = Vec::new();
        let mut ssh_n = 0;
        for m in &r.mounts {
            let target = x(&m.target)?;
            let target = if target.is_empty() || target.starts_with('/') {
                target
            } else {
                join_path(&st.image.config.working_dir, &target)
            };
            let mut input_for = |b: &mut Self, from: &str| -> Result<usize, FrontendError> {
                let op = if from.is_empty() { b.context() } else { b.source_input(from, stage, c.span, &st.platform)? };
                inputs.push(op);
                Ok(inputs.len() - 1)
            };
            let kind = match m.kind.as_str() {
                "bind" => {
                    let from = x(&m.from)?;
                    let input = input_for(self, &from)?;
                    MountKind::Bind { input, source: x(&m.source)?, readwrite: !m.readonly }
                }
                "cache" => {
                    let from = x(&m.from)?;
                    let from = if from.is_empty() {
                        None
                    } else {
                        let input = input_for(self, &from)?;
                        Some((input, x(&m.source)?))
                    };
                    let id = x(&m.id)?;
                    MountKind::Cache {
                        id: if id.is_empty() { target.clone() } else { id },
                        sharing: match m.sharing.as_str() {
                            "private" => CacheSharing::Private,
                            "locked" => CacheSharing::Locked,
                            _ => CacheSharing::Shared,
                        },
                        from,
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                        mode: m.mode.unwrap_or(0o755),
                        readonly: m.readonly,
                    }
                }
                "tmpfs" => MountKind::Tmpfs { size: m.size },
                "secret" => MountKind::Secret {
                    id: x(&m.id)?,
                    env: (!m.env.is_empty()).then(|| m.env.clone()),
                    required: m.required,
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                    mode: m.mode.unwrap_or(0o400),
                },
                _ => {
                    ssh_n += 1;
                    MountKind::Ssh { id: x(&m.id)?, required: m.required }
                }
            };
            let target = if target.is_empty() && m.kind == "ssh" {
                format!("/run/buildkit/ssh_agent.{}", ssh_n - 1)
            } else {
                target
            };
            mounts.push(Mount { target, kind });
        }
        let network = match r.network.as_deref().map(&x).transpose()?.as_deref() {
            None | Some("default") => NetworkMode::Default,
            Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            Some(n) => return Err(FrontendError::at(format!("unsupported network mode {n:?}"), c.span)),
        };
        let insecure = r.security.as_deref().map(&x).transpose()?.as_deref() == Some("insecure");
        // Environment: image env, then ARGs in scope not set by ENV, then
        // proxy build args.
        let mut run_env = st.image.config.env.clone();
        let env_has = |k: &str, e: &[String]| e.iter().any(|x| x.split_once('=').map_or(x.as_str(), |p| p.0) == k);
        let mut used_args = Vec::new();
        for (k, v) in &st.args {
            if let Some(v) = v {
                if !env_has(k, &st.image.config.env) {
                    run_env.push(format!("{k}={v}"));
                }
                let shown = env.get_value(k).unwrap_or(v.as_str()).to_string();
                used_args.push(format!("{k}={shown}"));
            }
        }
        for p in PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(*p)
                && !env_has(p, &run_env)
            {
                run_env.push(format!("{p}={v}"));
            }
        }
        let op = Op::Exec(ExecOp {
            args: args.clone(),
            env: run_env,
            cwd: if st.image.config.working_dir.is_empty() { "/".into() } else { st.image.config.working_dir.clone() },
            user: st.image.config.user.clone(),
            network,
            insecure,
            mounts,
        });
        let meta = self.meta(st, c, stage);
        st.op = Some(self.add(op, inputs, meta));
        let prefix = if used_args.is_empty() {
            String::new()
        } else {
            format!("|{} {} ", used_args.len(), used_args.join(" "))
        };
        Self::history(st, format!("RUN {prefix}{}", args.join(" ")), true);
        Ok(())
    }

    fn dispatch_copy(
        &mut self,
        st: &mut State,
        c: &Command,
        cp: &CopyCommand,
        stage: usize,
        env: &EnvList,
    ) -> Result<(), FrontendError> {
        let lex = Lex::new(self.escape);
        let x = |w: &str| expand(&lex, w, env, c.span);
        let kw = if cp.add { "ADD" } else { "COPY" };
        let dest_raw = x(&cp.dest)?;
        let dest = join_path(&st.image.config.working_dir, &dest_raw);
        let dest = if dest_raw.ends_with('/') && !dest.ends_with('/') { format!("{dest}/") } else { dest };
        let owner = cp.chown.as_deref().map(&x).transpose()?.filter(|o| !o.is_empty()).map(|o| owner_of(&o));
        let mode = match cp.chmod.as_deref().map(&x).transpose()? {
            Some(m) => Some(
                u32::from_str_radix(&m, 8)
                    .map_err(|_| FrontendError::at(format!("invalid chmod parameter: {m}"), c.span))?,
            ),
            None => None,
        };
        let mut exclude = Vec::new();
        for e in &cp.exclude {
            exclude.push(x(e)?);
        }
        // Inputs: 0 = previous state unless --link.
        let mut inputs: Vec<OpIndex> = Vec::new();
        let base = if cp.link {
            None
        } else {
            match st.op {
                Some(op) => {
                    inputs.push(op);
                    Some(0)
                }
                None => None,
            }
        };
        let mut actions = Vec::new();
        let mut shown_sources = Vec::new();
        let mut local_sources = Vec::new();
        let multi = cp.sources.len() + cp.heredocs.len() > 1;
        for s in &cp.sources {
            let s = x(s)?;
            shown_sources.push(s.clone());
            if cp.add && (s.starts_with("http://") || s.starts_with("https://")) && !is_git(&s) {
                let filename = s.rsplit('/').next().filter(|f| !f.is_empty()).unwrap_or("index.html").to_string();
                let checksum = cp.checksum.as_deref().map(&x).transpose()?;
                let op = self.add_source(SourceOp::Http { url: s.clone(), checksum, filename: filename.clone(), mode });
                inputs.push(op);
                actions.push(copy_action(inputs.len() - 1, vec![format!("/{filename}")], &dest, &owner, mode, cp, exclude.clone(), false));
            } else if cp.add && is_git(&s) {
                let (remote, reference) = match s.split_once('#') {
                    Some((r, f)) => (r.to_string(), Some(f.to_string())),
                    None => (s.clone(), None),
                };
                let op = self.add_source(SourceOp::Git { remote, reference, keep_git_dir: cp.keep_git_dir });
                inputs.push(op);
                actions.push(copy_action(inputs.len() - 1, vec!["/".into()], &dest, &owner, mode, cp, exclude.clone(), false));
            } else {
                local_sources.push(s);
            }
        }
        if !local_sources.is_empty() {
            let src = match &cp.from {
                Some(f) => {
                    let f = x(f)?;
                    self.source_input(&f, stage, c.span, &st.platform)?
                }
                None => self.context(),
            };
            inputs.push(src);
            let extract = cp.add && cp.unpack.unwrap_or(true);
            actions.insert(0, copy_action(inputs.len() - 1, local_sources, &dest, &owner, mode, cp, exclude, extract));
        }
        for h in &cp.heredocs {
            let mut data = if h.chomp { crate::parser::chomp_heredoc_content(&h.content) } else { h.content.clone() };
            if h.expand {
                data = expand_raw(&data, env, c.span)?;
            }
            let path = if dest.ends_with('/') || multi { format!("{}/{}", dest.trim_end_matches('/'), h.name) } else { dest.clone() };
            shown_sources.push(format!("<<{}", h.name));
            actions.push(FileAction::Mkfile { path, data: data.into_bytes(), mode: mode.unwrap_or(0o644), owner: owner.clone() });
        }
        let meta = self.meta(st, c, stage);
        let file = self.add(Op::File(FileOp { base, actions }), inputs, meta.clone());
        st.op = Some(match (cp.link, st.op) {
            (true, Some(prev)) => self.add(Op::Merge(MergeOp {}), vec![prev, file], meta),
            _ => file,
        });
        Self::history(st, format!("{kw} {} {dest_raw}", shown_sources.join(" ")), true);
        Ok(())
    }
}

fn is_git(s: &str) -> bool {
    s.starts_with("git@") || s.starts_with("git://") || s.ends_with(".git") || s.contains(".git#")
}

#[allow(clippy::too_many_arguments)]
fn copy_action(
    src_input: usize,
    sources: Vec<String>,
    dest: &str,
    owner: &Option<Owner>,
    mode: Option<u32>,
    cp: &CopyCommand,
    exclude: Vec<String>,
    extract: bool,
) -> FileAction {
    FileAction::Copy(CopyAction {
        owner: owner.clone(),
        mode,
        parents: cp.parents,
        exclude,
        extract_archives: extract,
        allow_empty_wildcard: true,
        ..CopyAction::new(src_input, sources, dest)
    })
}

fn owner_of(s: &str) -> Owner {
    match s.split_once(':') {
        Some((u, g)) => Owner { user: u.into(), group: Some(g.into()) },
        None => Owner { user: s.into(), group: None },
    }
}

fn env_of(pairs: &[(String, String)]) -> EnvList {
    let list: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    EnvList::from_slice(&list)
}

fn expand(lex: &Lex, word: &str, env: &EnvList, span: Span) -> Result<String, FrontendError> {
    lex.process_word(word, env).map(|(s, _)| s).map_err(|e| FrontendError::at(e.0, span))
}

/// Expand `$VAR`s in heredoc bodies without touching quotes (BuildKit's
/// `ExpandRaw` with `SkipProcessQuotes`).
fn expand_raw(data: &str, env: &EnvList, span: Span) -> Result<String, FrontendError> {
    let mut lex = Lex::new('\\');
    lex.skip_process_quotes = true;
    lex.raw_escapes = true;
    expand(&lex, data, env, span)
}

trait GetValue {
    fn get_value(&self, k: &str) -> Option<&str>;
}

impl GetValue for EnvList {
    fn get_value(&self, k: &str) -> Option<&str> {
        crate::shell::EnvGetter::get(self, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver with canned configs (the engine's real one pulls).
    pub(crate) struct Fake;
    impl ImageMetaResolver for Fake {
        fn resolve(&self, reference: &str, _p: &Platform) -> Result<(ImageConfig, Vec<History>), String> {
            match reference {
                "docker.io/library/busybox:latest" => Ok((
                    ImageConfig {
                        env: vec!["PATH=/bin".into()],
                        cmd: Some(vec!["sh".into()]),
                        ..ImageConfig::default()
                    },
                    vec![History { created_by: "ADD rootfs".into(), ..History::default() }],
                )),
                "docker.io/library/onbuild:latest" => Ok((
                    ImageConfig { on_build: vec!["RUN echo trigger".into()], ..ImageConfig::default() },
                    vec![],
                )),
                _ => Err("not found".into()),
            }
        }
    }

    fn opts() -> LowerOptions {
        LowerOptions::default()
    }

    #[test]
    fn normalizes_references() {
        assert_eq!(normalize_reference("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(normalize_reference("user/app:1").unwrap(), "docker.io/user/app:1");
        assert_eq!(normalize_reference("localhost:5000/a/b").unwrap(), "localhost:5000/a/b:latest");
        assert_eq!(normalize_reference("busybox@sha256:abc").unwrap(), "docker.io/library/busybox@sha256:abc");
        assert!(normalize_reference("BusyBox").is_err());
    }

    #[test]
    fn lowers_a_multi_stage_build() {
        let df = b"ARG BASE=busybox\nFROM ${BASE} AS build\nARG V=1\nWORKDIR /src\nCOPY . .\nRUN make $V\n\
FROM scratch AS unused\nRUN never\n\
FROM busybox\nCOPY --from=build /src/out /out\nENTRYPOINT [\"/out\"]\n";
        let d = lower(df, &opts(), &Fake).unwrap();
        assert!(d.ops.iter().all(|o| !matches!(&o.op, Op::Exec(e) if e.args.contains(&"never".to_string()))));
        let exec = d.ops.iter().find_map(|o| if let Op::Exec(e) = &o.op { Some((e, o)) } else { None }).unwrap();
        assert_eq!(exec.0.args, ["/bin/sh", "-c", "make $V"]);
        assert_eq!(exec.0.env, ["PATH=/bin", "V=1"]);
        assert_eq!(exec.0.cwd, "/src");
        assert_eq!(exec.1.meta.description, "[build 5/5] RUN make $V");
        assert!(d.ops.iter().any(|o| o.meta.description == "[stage-2 1/3] FROM docker.io/library/busybox:latest"));
        // Context is one shared local source.
        let locals = d.ops.iter().filter(|o| matches!(o.op, Op::Source(SourceOp::Local { .. }))).count();
        assert_eq!(locals, 1);
        // Target image: ENTRYPOINT resets the inherited CMD.
        assert_eq!(d.image.config.cmd, None);
        assert_eq!(d.image.config.entrypoint, Some(vec!["/out".to_string()]));
        // History: base entry + COPY (layer) + ENTRYPOINT (empty).
        let h: Vec<(&str, bool)> = d.image.history.iter().map(|h| (h.created_by.as_str(), h.empty_layer)).collect();
        assert_eq!(h, [("ADD rootfs", false), ("COPY /src/out /out # buildkit", false), ("ENTRYPOINT [\"/out\"]", true)]);
        // Layers on the target chain match non-empty history after the base.
        let Op::File(f) = &d.ops[d.target].op else { panic!("target is the COPY") };
        assert_eq!(f.base, Some(0));
    }

    #[test]
    fn scoping_targets_cycles_and_onbuild() {
        let df = b"ARG G=global\nFROM busybox AS a\nRUN echo $G\nARG G\nRUN echo $G\nFROM a AS b\n";
        let mut o = opts();
        o.target = Some("a".into());
        let d = lower(df, &o, &Fake).unwrap();
        let envs: Vec<Vec<String>> =
            d.ops.iter().filter_map(|o| if let Op::Exec(e) = &o.op { Some(e.env.clone()) } else { None }).collect();
        assert_eq!(envs, [vec!["PATH=/bin".to_string()], vec!["PATH=/bin".to_string(), "G=global".into()]]);
        o.build_args.insert("G".into(), "cli".into());
        let d = lower(df, &o, &Fake).unwrap();
        assert!(d.image.history.iter().any(|h| h.created_by == "RUN |1 G=cli /bin/sh -c echo $G # buildkit"));

        o.target = Some("nope".into());
        let e = lower(df, &o, &Fake).unwrap_err();
        assert_eq!(e.message, "target stage \"nope\" could not be found");

        let cyc = b"FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n";
        let e = lower(cyc, &opts(), &Fake).unwrap_err();
        assert!(e.message.starts_with("circular dependency detected on stage"), "{e}");

        let ob = b"FROM onbuild\nONBUILD RUN echo mine\n";
        let d = lower(ob, &opts(), &Fake).unwrap();
        assert!(matches!(&d.ops[d.target].op, Op::Exec(e) if e.args[2] == "echo trigger"));
        assert_eq!(d.image.config.on_build, ["RUN echo mine"]);

        let e = lower(b"FROM nosuchimage\n", &opts(), &Fake).unwrap_err();
        assert!(e.to_string().starts_with("Dockerfile:1:1: failed to resolve"), "{e}");
    }

    #[test]
    fn mounts_link_heredocs_and_ignore() {
        let df = b"FROM busybox AS a\nFROM busybox\n\
RUN --mount=type=cache,target=/c --mount=type=bind,from=a,source=/x,target=/x --mount=type=secret,id=tok make\n\
COPY --link f /f\nCOPY <<EOF /etc/conf\nv=$HOME\nEOF\nRUN <<EOF\necho hi $HOME\nEOF\n";
        let mut o = opts();
        o.dockerignore = Some("*.tmp\n!keep.tmp\n".into());
        let d = lower(df, &o, &Fake).unwrap();
        let (e, node) = d.ops.iter().find_map(|n| if let Op::Exec(e) = &n.op { Some((e, n)) } else { None }).unwrap();
        assert!(matches!(e.mounts[0].kind, MountKind::Cache { ref id, .. } if id == "/c"));
        assert!(matches!(e.mounts[1].kind, MountKind::Bind { input: 1, .. }));
        assert!(matches!(&d.ops[node.inputs[1]].op, Op::Source(SourceOp::Image { .. })));
        assert!(matches!(e.mounts[2].kind, MountKind::Secret { ref id, .. } if id == "tok"));
        assert_eq!(e.mounts[2].target, "/run/secrets/tok");
        assert!(d.ops.iter().any(|n| matches!(&n.op, Op::Merge(_))));
        assert!(d.ops.iter().any(|n| matches!(&n.op, Op::File(f) if f.base.is_none())));
        assert!(d.ops.iter().any(|n| matches!(&n.op, Op::Source(SourceOp::Local { exclude, .. }) if exclude == &["*.tmp", "!keep.tmp"])));
        assert!(d.ops.iter().any(|n| matches!(&n.op, Op::File(f) if matches!(&f.actions[0], FileAction::Mkfile { path, data, .. } if path == "/etc/conf" && data == b"v=\n"))));
        assert!(matches!(&d.ops[d.target].op, Op::Exec(e) if e.args == ["/bin/sh", "-c", "echo hi $HOME\n"]));
        // Layer count on the chain equals non-empty history entries.
        let layers = d.image.history.iter().filter(|h| !h.empty_layer).count();
        assert_eq!(layers, 1 + 4);
    }
}
