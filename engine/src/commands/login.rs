//! `kiln login [-u USER] [-p PASSWORD | --password-stdin] HOST`: check
//! credentials against a registry and store them in the docker config file
//! (`~/.docker/config.json`, or `$DOCKER_CONFIG/config.json`).

use std::io::Read;

use crate::config::Global;
use crate::registry::Registry;

/// `kiln login` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// User name.
    #[arg(short, long)]
    pub username: String,
    /// Password (prefer --password-stdin: command lines are visible to other users).
    #[arg(short, long, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Registry host, e.g. `127.0.0.1:5000` (default: docker.io).
    #[arg(default_value = "docker.io")]
    pub server: String,
}

/// Log in.
pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let password = password(&args)?;
    let server = server(&args.server);
    let registry = Registry::from_global(global)?;
    super::pull::runtime()?.block_on(registry.login(server, &args.username, &password))?;
    println!("Login succeeded ({})", registry.config().auth_file.display());
    Ok(0)
}

/// The password from `-p` or stdin (`--password-stdin`).
pub fn password(args: &Args) -> anyhow::Result<String> {
    let password = match (&args.password, args.password_stdin) {
        (Some(p), false) => p.clone(),
        (None, true) => {
            let mut p = String::new();
            std::io::stdin().read_to_string(&mut p)?;
            p.trim_end_matches(['\n', '\r']).to_string()
        }
        _ => anyhow::bail!("kiln login: give the password with -p PASSWORD or --password-stdin"),
    };
    anyhow::ensure!(!password.is_empty(), "kiln login: empty password");
    Ok(password)
}

/// The registry host of a `kiln login` argument (scheme and trailing `/` dropped).
pub fn server(arg: &str) -> &str {
    arg.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/')
}
