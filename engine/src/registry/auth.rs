//! Registry credentials in docker's format: `~/.docker/config.json`
//! (or `$DOCKER_CONFIG/config.json`), section `auths`, each entry
//! `{"auth": base64("user:password")}` or `{"identitytoken": ...}`.
//! `kiln login` writes the same file, so docker and kiln share logins.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use oci_client::secrets::RegistryAuth;

/// The docker config file kiln reads and `kiln login` writes.
pub fn docker_config_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".docker").join("config.json")
}

/// The keys docker uses for `host` in `auths`.
fn candidate_keys(host: &str) -> Vec<String> {
    let mut keys = vec![host.to_string(), format!("https://{host}"), format!("http://{host}")];
    if host == "docker.io" || host == "index.docker.io" || host == "registry-1.docker.io" {
        keys.insert(0, "https://index.docker.io/v1/".to_string());
        keys.push("docker.io".to_string());
        keys.push("index.docker.io".to_string());
    }
    keys
}

/// Credentials for `host` from the docker config at `path`; anonymous when
/// there are none. A malformed file is an error naming it.
pub fn credentials_for(path: &Path, host: &str) -> anyhow::Result<RegistryAuth> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    for key in candidate_keys(host) {
        let Some(entry) = auths.get(&key) else { continue };
        if let Some(token) = entry.get("registrytoken").and_then(|t| t.as_str()) {
            return Ok(RegistryAuth::Bearer(token.to_string()));
        }
        if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
            let decoded = BASE64
                .decode(auth.trim())
                .map_err(|e| anyhow::anyhow!("{}: auths.{key}.auth is not base64: {e}", path.display()))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| anyhow::anyhow!("{}: auths.{key}.auth is not UTF-8", path.display()))?;
            let Some((user, password)) = decoded.split_once(':') else {
                anyhow::bail!("{}: auths.{key}.auth must encode user:password", path.display());
            };
            return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
        }
        if let (Some(user), Some(password)) =
            (entry.get("username").and_then(|u| u.as_str()), entry.get("password").and_then(|p| p.as_str()))
        {
            return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
        }
    }
    Ok(RegistryAuth::Anonymous)
}

/// Record `user`/`password` for `host` in the docker config at `path`,
/// keeping everything else in the file. Written atomically, mode 0600.
pub fn store_credentials(path: &Path, host: &str, user: &str, password: &str) -> anyhow::Result<()> {
    let mut config: serde_json::Value = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let obj = config.as_object_mut().ok_or_else(|| anyhow::anyhow!("{}: expected a JSON object", path.display()))?;
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths =
        auths.as_object_mut().ok_or_else(|| anyhow::anyhow!("{}: `auths` must be an object", path.display()))?;
    let key = if host == "docker.io" { "https://index.docker.io/v1/".to_string() } else { host.to_string() };
    auths.insert(key, serde_json::json!({ "auth": BASE64.encode(format!("{user}:{password}")) }));
    let bytes = serde_json::to_vec_pretty(&config)?;
    kiln_cache::fsutil::write_atomic(path, &bytes)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_docker_hub_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"credsStore":"x","auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}}}"#).unwrap();
        assert!(
            matches!(credentials_for(&path, "docker.io").unwrap(), RegistryAuth::Basic(u, p) if u == "u" && p == "p")
        );
        assert!(matches!(credentials_for(&path, "127.0.0.1:5000").unwrap(), RegistryAuth::Anonymous));
        store_credentials(&path, "127.0.0.1:5000", "alice", "s3:cret").unwrap();
        assert!(matches!(credentials_for(&path, "127.0.0.1:5000").unwrap(),
            RegistryAuth::Basic(u, p) if u == "alice" && p == "s3:cret"));
        let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(kept["credsStore"], "x", "other settings are kept");
        std::fs::write(&path, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        assert!(credentials_for(&path, "h").unwrap_err().to_string().contains("auths.h.auth"));
    }
}
