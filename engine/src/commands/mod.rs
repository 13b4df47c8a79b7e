//! One module per `kiln` subcommand. Each has an `Args` struct (clap) and a
//! `run(&Global, Args) -> anyhow::Result<i32>` returning the exit code.

pub mod build;
pub mod check;
pub mod debug;
pub mod images;
pub mod import;
pub mod inspect;
pub mod load;
pub mod login;
pub mod pull;
pub mod push;
pub mod rmi;
pub mod tag;
pub mod run;
pub mod serve;
pub mod save;
pub mod du;
pub mod prune;
pub mod shim;

use crate::config::Global;

/// All subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Developer tools (e.g. `kiln debug parse`).
    #[command(subcommand)]
    Debug(debug::DebugCommand),
    /// Build an image from a Dockerfile.
    Build(build::Args),
    /// Pull an image from a registry.
    Pull(pull::Args),
    /// Push an image to a registry.
    Push(push::Args),
    /// List local images.
    Images(images::Args),
    /// Give a local image another name.
    Tag(tag::Args),
    /// Remove local image names.
    Rmi(rmi::Args),
    /// Show local images as JSON (like `docker image inspect`).
    Inspect(inspect::Args),
    /// Store registry credentials.
    Login(login::Args),
    /// Make a one-layer image from a root filesystem tarball.
    Import(import::Args),
    /// Load images from an OCI layout or a docker-archive tar.
    Load(load::Args),
    /// Run a command in a new container.
    Run(run::Args),
    /// Run the daemon: kiln's REST API and a Docker API subset.
    Serve(serve::Args),
    /// Write local images to a docker-archive or OCI layout.
    Save(save::Args),
    /// Show build-cache disk usage.
    Du(du::Args),
    /// Remove build cache.
    Prune(prune::Args),
    /// Verify the store and optionally remove what is broken.
    Check(check::Args),
    /// Internal: run one container in this (single-threaded) process.
    #[command(name = "__container-shim", hide = true)]
    ContainerShim(shim::Args),
    /// Internal: fork container shims on request (see `kiln_engine::zygote`).
    #[command(name = "__shim-zygote", hide = true)]
    ShimZygote(crate::zygote::Args),
}

/// Run one subcommand; returns the process exit code.
pub fn dispatch(global: &Global, command: Command) -> anyhow::Result<i32> {
    // With --host / KILN_HOST, commands are requests to a daemon (`serve`
    // listens there instead; `debug` is always local).
    if let Some(host) = &global.host {
        if !matches!(command, Command::Serve(_) | Command::Debug(_) | Command::ContainerShim(_) | Command::ShimZygote(_)) {
            return crate::client::run(global, host, command);
        }
    }
    match command {
        Command::Debug(c) => debug::run(global, c),
        Command::Build(a) => build::run(global, a),
        Command::Pull(a) => pull::run(global, a),
        Command::Push(a) => push::run(global, a),
        Command::Images(a) => images::run(global, a),
        Command::Tag(a) => tag::run(global, a),
        Command::Rmi(a) => rmi::run(global, a),
        Command::Inspect(a) => inspect::run(global, a),
        Command::Login(a) => login::run(global, a),
        Command::Import(a) => import::run(global, a),
        Command::Load(a) => load::run(global, a),
        Command::Run(a) => run::run(global, a),
        Command::Serve(a) => serve::run(global, a),
        Command::Save(a) => save::run(global, a),
        Command::Du(a) => du::run(global, a),
        Command::Prune(a) => prune::run(global, a),
        Command::Check(a) => check::run(global, a),
        Command::ContainerShim(a) => shim::run(global, a),
        Command::ShimZygote(a) => crate::zygote::run(global, a),
    }
}

/// Runs `each` on every one of `references` resolved to its local image, in
/// order. A reference that names no image is reported on stderr as
/// `kiln <command>: <error>` and skipped; the exit code is then 1, else 0.
pub fn for_each_local_image(
    store: &kiln_cache::Store,
    command: &str,
    references: &[String],
    mut each: impl FnMut(&str, kiln_cache::images::ImageRecord) -> anyhow::Result<()>,
) -> anyhow::Result<i32> {
    let mut code = 0;
    for reference in references {
        match store.images.resolve(reference) {
            Ok(record) => each(reference, record)?,
            Err(e) => {
                eprintln!("kiln {command}: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}
