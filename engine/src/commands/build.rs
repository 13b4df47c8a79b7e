//! `kiln build [-f FILE] [-t NAME:TAG]... [--build-arg K=V]... [--target S]
//! [--no-cache] [--pull] [-q] [--progress auto|tty|plain|json|quiet] [--platform P]
//! [--secret id=ID,src=PATH|env=VAR] [--network default|none|host]
//! [--label K=V] [--iidfile F] [-o OUTPUT] [--cache-to SPEC]...
//! [--cache-from SPEC]... CONTEXT`
//!
//! CONTEXT is a directory, a tarball, or `-` (a Dockerfile or a tar on
//! stdin). Flags are parsed here; lowering, solving and exporting are
//! [`crate::build`] and the frontend.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use kiln_cache::Store;
use kiln_frontend::graph::{NetworkMode, Op};
use kiln_frontend::lower::{ImageMetaResolver, LowerOptions, lower, parse_platform};
use kiln_frontend::{History, ImageConfig, Platform};
use kiln_solver::{EventSink, ImageSource, ResolvedImage};

use crate::build::{BuildRequest, build, new_solver};
use crate::config::Global;
use crate::image_source::StoreImageSource;
use crate::progress::{ProgressMode, render};
use crate::registry::Registry;

/// `kiln build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Name the image (repeatable).
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Set a build argument (repeatable).
    #[arg(long = "build-arg", value_name = "K=V")]
    pub build_args: Vec<String>,
    /// Build this stage.
    #[arg(long)]
    pub target: Option<String>,
    /// Execute every step again.
    #[arg(long)]
    pub no_cache: bool,
    /// Always pull base images again.
    #[arg(long)]
    pub pull: bool,
    /// Progress output.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Print only the image ID (on stdout); the build's log only if it fails.
    #[arg(short, long)]
    pub quiet: bool,
    /// Target platform (only the host's is supported).
    #[arg(long)]
    pub platform: Option<String>,
    /// `id=ID,src=PATH` or `id=ID,env=VAR` (repeatable).
    #[arg(long)]
    pub secret: Vec<String>,
    /// Network of RUN steps that do not set one: default, none or host.
    #[arg(long, default_value = "default")]
    pub network: String,
    /// Add a label to the image (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Write the image ID here.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Cap on the store root's size (every byte, as `du -sb`), e.g. `10GB`:
    /// least recently used cache is removed after the build to fit.
    /// Default: `KILN_GC_KEEP_STORAGE`, else `gc.keep_storage` in
    /// `<root>/config.json`, else no cap.
    #[arg(long, value_name = "SIZE")]
    pub keep_storage: Option<String>,
    /// Output (buildx syntax, e.g. `type=oci,dest=out.tar`); default: the
    /// local image store.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    /// What to do instead of building, as buildx's `--call`:
    /// `outline`, `targets` or `check` (append `,format=json` for JSON).
    #[arg(long, value_name = "METHOD[,format=json]", default_value = "build")]
    pub call: String,
    /// Export the build cache: `type=registry,ref=REF[,mode=min|max]`,
    /// `type=local,dest=DIR[,mode=..]` or `type=inline` (repeatable).
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,
    /// Import a build cache: `type=registry,ref=REF`, `type=local,src=DIR`
    /// or a bare `REF` (a cache or an image with an inline cache; repeatable).
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,
    /// Directory, tarball, or `-` for stdin.
    pub context: String,
}

/// A `--call` method other than `build`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallMethod {
    Outline,
    Targets,
    Check,
}

/// `--call` parsed: `None` for a build, else the method and whether to
/// print JSON.
fn parse_call(spec: &str) -> anyhow::Result<Option<(CallMethod, bool)>> {
    let mut parts = spec.split(',');
    let method = match parts.next().unwrap_or_default() {
        "build" if spec == "build" => return Ok(None),
        "build" => bail!("--call build takes no options"),
        "outline" => CallMethod::Outline,
        "targets" => CallMethod::Targets,
        "check" | "lint" => CallMethod::Check,
        other => bail!("--call {other:?}: expected build, outline, targets or check"),
    };
    let mut json = false;
    for part in parts {
        match part {
            "format=json" => json = true,
            "format=text" => json = false,
            other => bail!("--call {spec:?}: unknown option {other:?} (expected format=json or format=text)"),
        }
    }
    Ok(Some((method, json)))
}

/// `--call outline|targets|check`: inspect the Dockerfile without building.
/// `check` exits 1 when it found warnings, as buildx does.
fn run_call(method: CallMethod, json: bool, dockerfile: &[u8], name: &str, target: Option<&str>) -> anyhow::Result<i32> {
    use kiln_frontend::call;
    let located = |e: kiln_frontend::FrontendError| anyhow::anyhow!("{e}");
    let (text, code) = match method {
        CallMethod::Outline => {
            let o = call::outline(dockerfile, target).map_err(located)?;
            (if json { serde_json::to_string_pretty(&o)? } else { call::render_outline(&o) }, 0)
        }
        CallMethod::Targets => {
            let t = call::targets(dockerfile).map_err(located)?;
            (if json { serde_json::to_string_pretty(&t)? } else { call::render_targets(&t) }, 0)
        }
        CallMethod::Check => {
            let w = call::check(dockerfile).map_err(located)?;
            let code = if w.is_empty() { 0 } else { 1 };
            (if json { serde_json::to_string_pretty(&w)? } else { call::render_check(&w, name) }, code)
        }
    };
    print!("{text}");
    if json {
        println!();
    }
    Ok(code)
}

/// Build; exit code 0 on success.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let host = Platform::default();
    let platform = match &args.platform {
        Some(p) => parse_platform(p).map_err(|e| anyhow::anyhow!("--platform: {e}"))?,
        None => host.clone(),
    };
    if platform != host {
        bail!("--platform {platform}: kiln can only build for the host platform ({host})");
    }
    let network = match args.network.as_str() {
        "default" => NetworkMode::Default,
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        other => bail!("--network {other:?}: expected default, none or host"),
    };
    let build_args = key_values("--build-arg", &args.build_args, true)?;
    let labels = key_values("--label", &args.labels, false)?;
    let secrets = read_secrets(&args.secret)?;
    let output = args.output.as_deref().map(kiln_exporter::Output::parse).transpose()?;
    let mut cache = crate::remote_cache::CacheOptions::parse(&args.cache_to, &args.cache_from, None)?;

    let call = parse_call(&args.call)?;
    let (context, dockerfile_bytes, dockerfile_name, _tmp) = prepare_context(&args.context, args.file.as_deref())?;
    if let Some((method, json)) = call {
        return run_call(method, json, &dockerfile_bytes, &dockerfile_name, args.target.as_deref());
    }
    let dockerignore = read_dockerignore(&context, &dockerfile_name);

    let store = Arc::new(Store::open(&global.root)?);
    let registry = Arc::new(Registry::from_global(global)?);
    cache.registry = Some(registry.clone());
    let images: Arc<dyn ImageSource> = if args.pull {
        Arc::new(PullAlways { store: store.clone(), registry: registry.clone() })
    } else {
        Arc::new(StoreImageSource::new(store.clone(), registry.clone()))
    };
    let push = output.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let solver = new_solver(store, images.clone())?;

    let opts = LowerOptions {
        target: args.target.clone(),
        build_args,
        target_platform: Some(platform.clone()),
        build_platform: host,
        dockerignore,
        no_cache: args.no_cache,
        filename: Some(dockerfile_name.clone()),
    };
    let resolver = MetaResolver { images: images.clone(), handle: rt.handle().clone() };
    let definition = rt
        .block_on(async {
            tokio::task::spawn_blocking(move || lower(&dockerfile_bytes, &opts, &resolver)).await
        })?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut definition = definition;
    if network != NetworkMode::Default {
        for node in &mut definition.ops {
            if let Op::Exec(e) = &mut node.op {
                if e.network == NetworkMode::Default {
                    e.network = network;
                }
            }
        }
    }

    let req = BuildRequest {
        definition,
        locals: HashMap::from([("context".to_string(), context)]),
        secrets,
        no_cache: args.no_cache,
        labels,
        tags: args.tags.clone(),
        output,
        iidfile: args.iidfile.clone(),
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()),
        cache,
        keep_storage: args.keep_storage.as_deref().map(kiln_solver::gc::parse_size).transpose()?,
        ..Default::default()
    };
    let result = rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let renderer = tokio::spawn(render(args.progress_mode(), rx));
        let result = build(&solver, req, EventSink(Some(tx))).await;
        let _ = renderer.await;
        result
    })?;
    if let Some(id) = result.image_id() {
        report_image(&args, &id);
    }
    for line in rt.block_on(push_output(&registry, solver.store(), push.as_ref(), &args.tags))? {
        if !args.quiet {
            eprintln!("{line}");
        }
    }
    Ok(0)
}

impl Args {
    /// `--progress`, or quiet with `-q`.
    pub(crate) fn progress_mode(&self) -> ProgressMode {
        if self.quiet { ProgressMode::Quiet } else { self.progress }
    }
}

/// What a finished build says about the image it made: the ID alone on
/// stdout with `-q`, else docker's two closing lines on stderr.
pub(crate) fn report_image(args: &Args, id: &str) {
    if args.quiet {
        println!("{id}");
        return;
    }
    eprintln!("writing image {id} done");
    for t in &args.tags {
        eprintln!("naming to {}", kiln_cache::images::normalize_reference(t).unwrap_or_else(|_| t.clone()));
    }
}

/// `-o type=registry` (or `type=image,push=true`): push the built image
/// under each of its names (`name=` and `-t`); returns the line `kiln push`
/// prints for each. Nothing for other outputs.
pub(crate) async fn push_output(
    registry: &Registry,
    store: &Store,
    output: Option<&kiln_exporter::Output>,
    tags: &[String],
) -> anyhow::Result<Vec<String>> {
    let Some(kiln_exporter::Output::Image { names, push: true, .. }) = output else { return Ok(Vec::new()) };
    let mut lines = Vec::new();
    for name in tags.iter().chain(names) {
        let pushed = super::push::push_local(registry, store, name).await?;
        lines.push(super::push::summary(&pushed));
    }
    Ok(lines)
}

/// `K=V` flags into a map (`K` alone takes the value from the environment
/// when `from_env`, as docker does for build args).
pub(crate) fn key_values(flag: &str, items: &[String], from_env: bool) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            None if from_env && !item.is_empty() => {
                if let Ok(v) = std::env::var(item) {
                    out.insert(item.clone(), v);
                }
            }
            _ => bail!("{flag} {item:?}: expected KEY=VALUE"),
        }
    }
    Ok(out)
}

/// `--secret id=ID,src=PATH` / `id=ID,env=VAR` (`type=file|env`,
/// `source=` accepted too).
pub(crate) fn read_secrets(specs: &[String]) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    for spec in specs {
        let mut id = None;
        let mut src = None;
        let mut env = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", "file" | "env")) => {}
                _ => bail!("--secret {spec:?}: unknown part {part:?} (expected id=, src= or env=)"),
            }
        }
        let id = id.or_else(|| env.clone()).with_context(|| format!("--secret {spec:?}: id= is required"))?;
        let value = match (src, env) {
            (Some(path), _) => std::fs::read(&path).with_context(|| format!("--secret id={id}: reading {path}"))?,
            (None, Some(var)) => std::env::var(&var).with_context(|| format!("--secret id={id}: ${var} is not set"))?.into_bytes(),
            (None, None) => std::env::var(&id).with_context(|| format!("--secret id={id}: no src= and no ${id}"))?.into_bytes(),
        };
        out.insert(id, value);
    }
    Ok(out)
}

/// The context directory, the Dockerfile's bytes and name, and a temp dir
/// to keep alive when the context came from a tarball or stdin.
pub(crate) fn prepare_context(context: &str, file: Option<&Path>) -> anyhow::Result<(PathBuf, Vec<u8>, String, Option<tempfile::TempDir>)> {
    let mut tmp = None;
    let mut stdin_dockerfile = None;
    let dir = if context == "-" {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).context("reading the context from stdin")?;
        let t = tempfile::tempdir()?;
        if !extract_tar(&bytes, t.path())? {
            stdin_dockerfile = Some(bytes);
        }
        let p = t.path().to_path_buf();
        tmp = Some(t);
        p
    } else {
        let path = PathBuf::from(context);
        if path.is_dir() {
            path
        } else if path.is_file() {
            let bytes = std::fs::read(&path)?;
            let t = tempfile::tempdir()?;
            anyhow::ensure!(extract_tar(&bytes, t.path())?, "build context {context}: not a directory or a tar archive");
            let p = t.path().to_path_buf();
            tmp = Some(t);
            p
        } else {
            bail!("build context {context}: no such directory or file");
        }
    };
    let (bytes, name) = match (stdin_dockerfile, file) {
        (Some(bytes), _) => (bytes, "Dockerfile".to_string()),
        (None, Some(f)) if f == Path::new("-") => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes)?;
            (bytes, "Dockerfile".to_string())
        }
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading Dockerfile {}", f.display()))?;
            (bytes, f.to_string_lossy().into_owned())
        }
        (None, None) => {
            let f = dir.join("Dockerfile");
            let bytes = std::fs::read(&f).with_context(|| format!("reading Dockerfile {}", f.display()))?;
            (bytes, "Dockerfile".to_string())
        }
    };
    Ok((dir, bytes, name, tmp))
}

/// Extract `bytes` (a tar, maybe gzip/zstd compressed) into `dir`; `false`
/// if it is not an archive. Paths stay inside `dir` (the tar crate refuses
/// `..` and absolute paths on unpack).
fn extract_tar(bytes: &[u8], dir: &Path) -> anyhow::Result<bool> {
    let plain: Vec<u8> = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out)?;
        out
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::decode_all(bytes)?
    } else {
        bytes.to_vec()
    };
    if plain.len() < 512 || &plain[257..262] != b"ustar" {
        return Ok(false);
    }
    tar::Archive::new(&plain[..]).unpack(dir).context("extracting the build context")?;
    Ok(true)
}

/// `<Dockerfile>.dockerignore` beside the Dockerfile, else `.dockerignore`
/// in the context.
pub(crate) fn read_dockerignore(context: &Path, dockerfile: &str) -> Option<String> {
    let specific = PathBuf::from(format!("{dockerfile}.dockerignore"));
    let base = Path::new(dockerfile).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::read_to_string(&specific)
        .or_else(|_| std::fs::read_to_string(context.join(format!("{base}.dockerignore"))))
        .or_else(|_| std::fs::read_to_string(context.join(".dockerignore")))
        .ok()
}

/// Base image configs for lowering, through the same image source the
/// solver uses (so the image is fetched once).
pub(crate) struct MetaResolver {
    pub(crate) images: Arc<dyn ImageSource>,
    pub(crate) handle: tokio::runtime::Handle,
}

impl ImageMetaResolver for MetaResolver {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<(ImageConfig, Vec<History>), String> {
        #[derive(serde::Deserialize)]
        struct ConfigFile {
            #[serde(default)]
            config: Option<ImageConfig>,
            #[serde(default)]
            history: Vec<History>,
        }
        let image = self.handle.block_on(self.images.resolve(reference, platform)).map_err(|e| format!("{e:#}"))?;
        let file: ConfigFile =
            serde_json::from_slice(&image.config).map_err(|e| format!("config of {reference}: {e}"))?;
        Ok((file.config.unwrap_or_default(), file.history))
    }
}

/// `--pull`: ask the registry even when the store has the image.
pub(crate) struct PullAlways {
    pub(crate) store: Arc<Store>,
    pub(crate) registry: Arc<Registry>,
}

#[async_trait::async_trait]
impl ImageSource for PullAlways {
    async fn resolve(&self, reference: &str, platform: &Platform) -> anyhow::Result<ResolvedImage> {
        let pulled = self.registry.pull(&self.store, reference, platform).await?;
        Ok(ResolvedImage { manifest_digest: pulled.manifest_digest, config: pulled.config, layers: pulled.layers })
    }
}
