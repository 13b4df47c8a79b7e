//! Settings shared by every command, resolved once from flags, environment
//! and the config file.

use std::path::PathBuf;

/// Global flags, accepted before or after the subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// Store root (default: /var/lib/kiln as root, ~/.local/share/kiln otherwise).
    #[arg(long, global = true, env = "KILN_ROOT")]
    pub root: Option<PathBuf>,
    /// Registry mirror, `HOST=URL`, e.g. `docker.io=http://127.0.0.1:5000`. Repeatable.
    #[arg(long = "registry-mirror", global = true, value_name = "HOST=URL")]
    pub registry_mirrors: Vec<String>,
    /// Registry reachable over plain HTTP, `HOST:PORT`. Repeatable.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Daemon to talk to instead of working in-process, e.g. unix:///run/kiln.sock.
    #[arg(long, global = true, env = "KILN_HOST")]
    pub host: Option<String>,
}

/// The resolved settings.
#[derive(Debug, Clone)]
pub struct Global {
    /// Store root.
    pub root: PathBuf,
    /// `(registry host, mirror URL)` pairs.
    pub registry_mirrors: Vec<(String, String)>,
    /// Hosts that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Daemon address, if any.
    pub host: Option<String>,
}

impl GlobalArgs {
    /// Validate the flags and fill in defaults.
    pub fn resolve(self) -> anyhow::Result<Global> {
        let root = match self.root {
            // Absolute from here on: paths under the root go to container
            // runtimes and mounts, which resolve them elsewhere.
            Some(root) => std::path::absolute(&root)
                .map_err(|e| anyhow::anyhow!("--root {}: {e}", root.display()))?,
            None => default_root(),
        };
        let mut registry_mirrors = Vec::new();
        for m in self.registry_mirrors {
            let Some((host, url)) = m.split_once('=') else {
                anyhow::bail!("--registry-mirror {m:?}: expected HOST=URL, e.g. docker.io=http://127.0.0.1:5000");
            };
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "--registry-mirror {m:?}: the mirror URL must start with http:// or https://"
            );
            registry_mirrors.push((host.to_string(), url.trim_end_matches('/').to_string()));
        }
        Ok(Global {
            root,
            registry_mirrors,
            insecure_registries: self.insecure_registries,
            host: self.host,
        })
    }
}

fn default_root() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/kiln"),
        None => PathBuf::from("/var/lib/kiln"),
    }
}

/// Environment variable with the default disk cap (`10GB`, `512MB`, ...).
pub const KEEP_STORAGE_ENV: &str = "KILN_GC_KEEP_STORAGE";

/// The configured cap on the store root's size, applied after every build
/// (and before one, when the root is already over it): `--keep-storage` on
/// `kiln build` overrides it; otherwise `KILN_GC_KEEP_STORAGE`, else
/// `gc.keep_storage` in `<root>/config.json` (`{"gc": {"keep_storage":
/// "10GB"}}`). `None`: nothing configured, [`default_cap`] applies after
/// builds.
pub fn keep_storage_default(root: &std::path::Path) -> anyhow::Result<Option<u64>> {
    if let Some(value) = std::env::var_os(KEEP_STORAGE_ENV) {
        let value = value.to_string_lossy();
        let bytes = kiln_solver::gc::parse_size(&value).map_err(|e| anyhow::anyhow!("{KEEP_STORAGE_ENV}: {e:#}"))?;
        return Ok(Some(bytes));
    }
    let path = root.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
    match doc.pointer("/gc/keep_storage") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => {
            Ok(Some(kiln_solver::gc::parse_size(s).map_err(|e| anyhow::anyhow!("{}: gc.keep_storage: {e:#}", path.display()))?))
        }
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("{}: gc.keep_storage: {n} is not a byte count", path.display())),
        Some(other) => anyhow::bail!("{}: gc.keep_storage: expected a size like \"10GB\", got {other}", path.display()),
    }
}

/// The cap when none is configured, as BuildKit picks its default GC cap:
/// 10% of the size of the file system that holds `root`, or 2 GB when that
/// size cannot be read.
pub fn default_cap(root: &std::path::Path) -> u64 {
    const FALLBACK: u64 = 2_000_000_000;
    match nix::sys::statvfs::statvfs(root) {
        Ok(fs) => (fs.blocks() as u64).saturating_mul(fs.fragment_size() as u64) / 10,
        Err(_) => FALLBACK,
    }
    .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cap_is_a_tenth_of_the_file_system() {
        let root = tempfile::tempdir().unwrap();
        let fs = nix::sys::statvfs::statvfs(root.path()).unwrap();
        let size = fs.blocks() as u64 * fs.fragment_size() as u64;
        assert_eq!(default_cap(root.path()), size / 10);
        assert_eq!(default_cap(std::path::Path::new("/nonexistent/kiln-root")), 2_000_000_000);
    }

    #[test]
    fn keep_storage_from_the_root_config() {
        if std::env::var_os(KEEP_STORAGE_ENV).is_some() {
            println!("skipped: config file test because {KEEP_STORAGE_ENV} is set and wins");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        assert_eq!(keep_storage_default(root.path()).unwrap(), None);
        let config = root.path().join("config.json");
        std::fs::write(&config, r#"{"gc": {"keep_storage": "2GB"}}"#).unwrap();
        assert_eq!(keep_storage_default(root.path()).unwrap(), Some(2 << 30));
        std::fs::write(&config, r#"{"gc": {"keep_storage": 1000}}"#).unwrap();
        assert_eq!(keep_storage_default(root.path()).unwrap(), Some(1000));
        std::fs::write(&config, r#"{"registry": {}}"#).unwrap();
        assert_eq!(keep_storage_default(root.path()).unwrap(), None);
        std::fs::write(&config, r#"{"gc": {"keep_storage": "lots"}}"#).unwrap();
        let err = format!("{:#}", keep_storage_default(root.path()).unwrap_err());
        assert!(err.contains("config.json: gc.keep_storage") && err.contains("lots"), "{err}");
        std::fs::write(&config, "{\n  \"gc\": {\"keep_storage\": }\n}").unwrap();
        let err = format!("{:#}", keep_storage_default(root.path()).unwrap_err());
        assert!(err.contains("config.json:2:"), "names the place: {err}");
    }
}
