//! Talking to registries (through `oci-client`): pull images into the
//! store, push them out, log in.
//!
//! - [`RegistryConfig`] gathers mirrors, plain-HTTP registries and the
//!   credentials file from the global flags and `<root>/config.json`.
//! - [`Registry::pull`] fetches a manifest (tag or digest; OCI or Docker
//!   schema 2; an index resolves to one platform), then the config and the
//!   layers — in parallel, skipping blobs the store already has, every byte
//!   verified against its digest while it streams in — unpacks each layer
//!   into its snapshot and names the image in the image store.
//! - [`Registry::push`] uploads config and layers (skipping blobs the
//!   registry has) and then the manifest.
//!
//! Failures come back as a [`RegistryError`] inside the `anyhow::Error`,
//! so callers can tell "unknown image" from "registry down".
//!
//! ## Config file
//!
//! `<root>/config.json` (optional) may hold:
//!
//! ```json
//! {
//!   "registry-mirrors": { "docker.io": ["http://127.0.0.1:5000"] },
//!   "insecure-registries": ["127.0.0.1:5000", "localhost:5001"]
//! }
//! ```
//!
//! `registry-mirrors` may also be a plain list of URLs, as in docker's
//! `daemon.json`; they then mirror `docker.io`. Mirrors from
//! `--registry-mirror` come first, then the file's. A mirror given with an
//! `http://` URL is spoken to over plain HTTP; any other registry only when
//! listed in `--insecure-registry` or `insecure-registries` (`HOST:PORT`, or
//! just `HOST` for every port of it, e.g. `"127.0.0.1"` for local test
//! registries).

pub mod auth;
pub mod cache;
pub mod manifest;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use kiln_cache::Store;
use kiln_cache::content::{ContentError, sha256_digest};
use kiln_cache::images::{self, normalize_reference};
use kiln_cache::snapshots::BlobRecord;
use kiln_frontend::Platform;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};

use crate::config::Global;
use manifest::{Descriptor, Manifest};

/// How many blobs move at once, per pull or push.
const PARALLEL_BLOBS: usize = 4;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry does not know the repository, tag or digest.
    #[error("image {reference} not found in {registry}")]
    NotFound {
        /// What was asked for.
        reference: String,
        /// Where (host, or mirror URL).
        registry: String,
    },
    /// Credentials missing or refused.
    #[error("unauthorized: {registry} refused access to {reference} (log in with `kiln login {registry}`)")]
    Unauthorized {
        /// What was asked for.
        reference: String,
        /// Where.
        registry: String,
    },
    /// No connection (down, refused, TLS failure, timeout).
    #[error("registry {registry} is unreachable: {detail}")]
    Unreachable {
        /// Where.
        registry: String,
        /// The underlying error.
        detail: String,
    },
    /// The manifest cannot be used.
    #[error("bad manifest for {reference}: {reason}")]
    BadManifest {
        /// What was asked for.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes received do not match their digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob or manifest.
        what: String,
        /// Announced digest.
        expected: String,
        /// Digest of what arrived.
        actual: String,
    },
    /// Anything else the registry said.
    #[error("registry {registry}: {detail}")]
    Other {
        /// Where.
        registry: String,
        /// What happened.
        detail: String,
    },
}

/// Registry settings: mirrors, plain-HTTP hosts, credentials file.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// `(registry host, mirror URL)`, tried in order before the registry.
    pub mirrors: Vec<(String, String)>,
    /// `HOST[:PORT]` entries that are spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// The docker-format credentials file.
    pub auth_file: PathBuf,
}

impl RegistryConfig {
    /// Whether `host` (`name[:port]`) may be spoken to over plain HTTP: it
    /// is listed as insecure (exactly, or by name without a port, which
    /// allows every port), or it is the host of an `http://` mirror.
    pub fn is_plain_http(&self, host: &str) -> bool {
        let name = host.rsplit_once(':').map(|(n, _)| n).unwrap_or(host);
        self.insecure.iter().any(|entry| entry == host || (!entry.contains(':') && entry == name))
            || self
                .mirrors
                .iter()
                .any(|(_, url)| url.strip_prefix("http://").is_some_and(|rest| rest.split('/').next() == Some(host)))
    }

    /// Flags first, then `<root>/config.json` (see the module docs).
    pub fn from_global(global: &Global) -> anyhow::Result<RegistryConfig> {
        let mut config = RegistryConfig {
            mirrors: global.registry_mirrors.clone(),
            insecure: global.insecure_registries.clone(),
            auth_file: auth::docker_config_path(),
        };
        let path = global.root.join("config.json");
        match std::fs::read(&path) {
            Ok(bytes) => config.merge_file(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        }
        Ok(config)
    }

    fn merge_file(&mut self, path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
        let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        match json.get("registry-mirrors") {
            None => {}
            Some(serde_json::Value::Array(urls)) => {
                for u in urls {
                    let u = u.as_str().filter(|u| url_ok(u)).ok_or_else(|| bad("registry-mirrors: expected URLs"))?;
                    self.mirrors.push(("docker.io".into(), u.trim_end_matches('/').into()));
                }
            }
            Some(serde_json::Value::Object(map)) => {
                for (host, urls) in map {
                    let urls =
                        urls.as_array().ok_or_else(|| bad(&format!("registry-mirrors.{host}: expected a list")))?;
                    for u in urls {
                        let u = u
                            .as_str()
                            .filter(|u| url_ok(u))
                            .ok_or_else(|| bad(&format!("registry-mirrors.{host}: expected http(s) URLs")))?;
                        self.mirrors.push((host.clone(), u.trim_end_matches('/').into()));
                    }
                }
            }
            Some(_) => return Err(bad("registry-mirrors: expected a list or an object")),
        }
        if let Some(list) = json.get("insecure-registries") {
            let list = list.as_array().ok_or_else(|| bad("insecure-registries: expected a list"))?;
            for h in list {
                self.insecure.push(h.as_str().ok_or_else(|| bad("insecure-registries: expected strings"))?.into());
            }
        }
        Ok(())
    }
}

/// One place to fetch from: a mirror or the registry itself.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `host[:port]` as used in URLs.
    host: String,
    /// For messages: the mirror URL or the host.
    label: String,
}

/// A pulled image, as the rest of kiln needs it.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The normalized name it is stored under in the image store.
    pub name: String,
    /// Digest of the platform's image manifest (pins the image).
    pub manifest_digest: String,
    /// Digest of the index (manifest list) it was chosen from, if any.
    pub index_digest: Option<String>,
    /// Digest of the config blob (the image ID).
    pub config_digest: String,
    /// The raw config blob.
    pub config: Vec<u8>,
    /// Snapshot ids of the layers, bottom first.
    pub layers: Vec<String>,
    /// Layer blobs downloaded now (the rest were already in the store).
    pub blobs_fetched: usize,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// Normalized reference pushed to.
    pub reference: String,
    /// Digest of the pushed manifest.
    pub manifest_digest: String,
    /// Blobs uploaded.
    pub blobs_uploaded: usize,
    /// Blobs mounted from another repository of the same registry (no upload).
    pub blobs_mounted: usize,
    /// Blobs the repository already had.
    pub blobs_skipped: usize,
}

/// How one blob got to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobPush {
    Uploaded,
    Mounted,
    AlreadyThere,
}

/// A registry client with kiln's settings.
pub struct Registry {
    config: RegistryConfig,
    /// For everything not listed as insecure; made on first use (building
    /// a TLS client loads the system's root certificates).
    https: std::sync::OnceLock<oci_client::Client>,
    /// For insecure registries and `http://` mirrors only.
    http: std::sync::OnceLock<oci_client::Client>,
}

impl Registry {
    /// A client for `config`.
    pub fn new(config: RegistryConfig) -> Registry {
        Registry { config, https: std::sync::OnceLock::new(), http: std::sync::OnceLock::new() }
    }

    /// The client for `host`: plain HTTP only where the config allows it.
    fn client(&self, host: &str) -> &oci_client::Client {
        let make = |protocol| {
            oci_client::Client::new(oci_client::client::ClientConfig {
                protocol,
                connect_timeout: Some(std::time::Duration::from_secs(10)),
                read_timeout: Some(std::time::Duration::from_secs(120)),
                max_concurrent_download: PARALLEL_BLOBS,
                max_concurrent_upload: PARALLEL_BLOBS,
                ..Default::default()
            })
        };
        if self.config.is_plain_http(host) {
            self.http.get_or_init(|| make(oci_client::client::ClientProtocol::Http))
        } else {
            self.https.get_or_init(|| make(oci_client::client::ClientProtocol::Https))
        }
    }

    /// A client from the global flags and config file.
    pub fn from_global(global: &Global) -> anyhow::Result<Registry> {
        Ok(Registry::new(RegistryConfig::from_global(global)?))
    }

    /// The settings in use.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Mirrors of `registry` (in order), then `registry` itself.
    fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self
            .config
            .mirrors
            .iter()
            .filter(|(host, _)| host == registry || (registry == "docker.io" && host == "index.docker.io"))
            .map(|(_, url)| {
                let host = url.split_once("://").map(|(_, h)| h).unwrap_or(url);
                Endpoint { host: host.split('/').next().unwrap_or(host).to_string(), label: format!("mirror {url}") }
            })
            .collect();
        let origin = if registry == "docker.io" { "index.docker.io" } else { registry };
        out.push(Endpoint { host: origin.to_string(), label: registry.to_string() });
        out
    }

    /// Pull `reference` (`busybox`, `host:port/repo:tag`, `repo@sha256:...`)
    /// for `platform` into `store`: blobs into the content store, layers
    /// unpacked into snapshots, the image named in the image store.
    pub async fn pull(&self, store: &Arc<Store>, reference: &str, platform: &Platform) -> anyhow::Result<PulledImage> {
        let name = normalize_reference(reference)?;
        let parsed = to_oci_reference(&name);
        let mut failures: Vec<(Endpoint, RegistryError)> = Vec::new();
        for endpoint in self.endpoints(parsed.registry()) {
            match self.pull_from(store, &name, &parsed, &endpoint, platform).await {
                Ok(pulled) => return Ok(pulled),
                Err(e) => match e.downcast::<RegistryError>() {
                    // Only "not there" and "cannot reach" make the next endpoint worth a try.
                    Ok(re @ (RegistryError::NotFound { .. } | RegistryError::Unreachable { .. }))
                        if !failures.is_empty() || self.endpoints(parsed.registry()).len() > 1 =>
                    {
                        tracing::warn!(endpoint = %endpoint.label, error = %re, "pull failed, trying next");
                        failures.push((endpoint, re));
                    }
                    Ok(re) => return Err(anyhow::Error::new(re).context(format!("pulling {name}"))),
                    Err(other) => return Err(other.context(format!("pulling {name}"))),
                },
            }
        }
        // Report the most telling failure (not-found beats unreachable) and
        // list the others.
        let rank = |e: &RegistryError| match e {
            RegistryError::NotFound { .. } => 0,
            _ => 1,
        };
        let best_index = (0..failures.len()).min_by_key(|&i| rank(&failures[i].1)).expect("an endpoint was tried");
        let (_, best) = failures.remove(best_index);
        let others: Vec<String> = failures.iter().map(|(ep, e)| format!("{}: {e}", ep.label)).collect();
        Err(anyhow::Error::new(best).context(format!("pulling {name} (also tried {})", others.join("; "))))
    }

    async fn pull_from(
        &self,
        store: &Arc<Store>,
        name: &str,
        parsed: &Reference,
        endpoint: &Endpoint,
        platform: &Platform,
    ) -> anyhow::Result<PulledImage> {
        let target = match (parsed.tag(), parsed.digest()) {
            (_, Some(d)) => Reference::with_digest(endpoint.host.clone(), parsed.repository().into(), d.into()),
            (Some(t), None) => Reference::with_tag(endpoint.host.clone(), parsed.repository().into(), t.into()),
            (None, None) => Reference::with_tag(endpoint.host.clone(), parsed.repository().into(), "latest".into()),
        };
        let classify = |e: OciDistributionError| classify(e, name, &endpoint.label);
        let auth = auth::credentials_for(&self.config.auth_file, &endpoint.host)?;
        self.client(&endpoint.host).auth(&target, &auth, RegistryOperation::Pull).await.map_err(classify)?;

        let (bytes, _) = self
            .client(&endpoint.host)
            .pull_manifest_raw(&target, &auth, manifest::ACCEPTED)
            .await
            .map_err(classify)?;
        let mut digest = sha256_digest(&bytes);
        if let Some(expected) = parsed.digest()
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("manifest of {name}"),
                expected: expected.into(),
                actual: digest,
            }
            .into());
        }
        let bad = |reason: String| RegistryError::BadManifest { reference: name.to_string(), reason };
        let mut manifest = Manifest::parse(&bytes, None).map_err(bad)?;
        let mut manifest_bytes = bytes.to_vec();
        let mut index_digest = None;
        if let Manifest::Index { manifests, .. } = &manifest {
            let chosen = manifest::select_platform(manifests, platform).ok_or_else(|| {
                bad(format!(
                    "no image for platform {platform} (available: {})",
                    manifest::platforms(manifests).join(", ")
                ))
            })?;
            store.content.put_bytes(&bytes, Some(&digest))?;
            index_digest = Some(digest.clone());
            let child = target.clone_with_digest(chosen.digest.clone());
            let (child_bytes, _) = self
                .client(&endpoint.host)
                .pull_manifest_raw(&child, &auth, manifest::ACCEPTED)
                .await
                .map_err(classify)?;
            let child_digest = sha256_digest(&child_bytes);
            if child_digest != chosen.digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest for {platform} of {name}"),
                    expected: chosen.digest.clone(),
                    actual: child_digest,
                }
                .into());
            }
            manifest = Manifest::parse(&child_bytes, Some(&chosen.media_type)).map_err(bad)?;
            manifest_bytes = child_bytes.to_vec();
            digest = child_digest;
        }
        let Manifest::Image { media_type, config, layers } = manifest else {
            return Err(bad("an index inside an index".into()).into());
        };

        // Config first: it lists the diff IDs the layers must unpack to.
        if !store.content.exists(&config.digest) {
            self.fetch_blob(store, &target, &config, name, &endpoint.label).await?;
        }
        let config_bytes = store.content.read(&config.digest)?;
        let diff_ids = diff_ids(&config_bytes).map_err(bad)?;
        if diff_ids.len() != layers.len() {
            return Err(bad(format!(
                "the manifest has {} layers but the config lists {} diff IDs",
                layers.len(),
                diff_ids.len()
            ))
            .into());
        }

        // Layers: download (unless present) and unpack, several at a time,
        // results kept in order.
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let layer_ids: Vec<String> = futures::stream::iter(layers.iter().cloned().zip(diff_ids.iter().cloned()))
            .map(|(layer, diff_id)| {
                let fetched = &fetched;
                let target = &target;
                async move {
                    let id = crate::unpack::snapshot_id_for_diff_id(&diff_id)?;
                    let have_blob = store.content.exists(&layer.digest);
                    if !have_blob {
                        self.fetch_blob(store, target, &layer, name, &endpoint.label).await?;
                        fetched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let store = store.clone();
                    let blob = BlobRecord {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                    };
                    let unpacked = tokio::task::spawn_blocking(move || {
                        crate::unpack::unpack_layer_snapshot(&store, &blob, Some(&diff_id))
                    })
                    .await??;
                    debug_assert_eq!(unpacked, id);
                    anyhow::Ok(unpacked)
                }
            })
            .buffered(PARALLEL_BLOBS)
            .try_collect()
            .await?;

        store.content.put_bytes(&manifest_bytes, Some(&digest))?;
        let descriptor = images::Descriptor { media_type, digest: digest.clone(), size: manifest_bytes.len() as u64 };
        store.images.put(name, &descriptor)?;
        Ok(PulledImage {
            name: name.to_string(),
            manifest_digest: digest,
            index_digest,
            config_digest: config.digest,
            config: config_bytes,
            layers: layer_ids,
            blobs_fetched: fetched.into_inner(),
        })
    }

    /// Stream one blob into the content store, verified on the way.
    async fn fetch_blob(
        &self,
        store: &Store,
        target: &Reference,
        desc: &Descriptor,
        name: &str,
        label: &str,
    ) -> anyhow::Result<()> {
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size as i64,
            ..Default::default()
        };
        let mut sized = self
            .client(target.registry())
            .pull_blob_stream(target, &oci_desc)
            .await
            .map_err(|e| classify(e, name, label))?;
        let mut writer = store.content.writer()?;
        while let Some(chunk) = sized.stream.next().await {
            let chunk = chunk.map_err(|e| {
                if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) =
                    e.get_ref().and_then(|inner| inner.downcast_ref::<oci_client::errors::DigestError>())
                {
                    anyhow::Error::new(RegistryError::DigestMismatch {
                        what: format!("blob {} of {name}", desc.digest),
                        expected: expected.clone(),
                        actual: actual.clone(),
                    })
                } else {
                    anyhow::Error::new(RegistryError::Unreachable {
                        registry: label.to_string(),
                        detail: format!("while downloading {}: {e}", desc.digest),
                    })
                }
            })?;
            writer.write_all(&chunk)?;
        }
        writer.commit(Some(&desc.digest), Some(desc.size)).map_err(|e| match e {
            ContentError::DigestMismatch { expected, actual } => anyhow::Error::new(RegistryError::DigestMismatch {
                what: format!("blob {expected} of {name}"),
                expected,
                actual,
            }),
            ContentError::SizeMismatch { digest, expected, actual } => {
                anyhow::Error::new(RegistryError::DigestMismatch {
                    what: format!("blob {} of {name} (expected {expected} bytes, got {actual})", desc.digest),
                    expected: desc.digest.clone(),
                    actual: digest,
                })
            }
            other => other.into(),
        })?;
        Ok(())
    }

    /// Push the image manifest `manifest_digest` (in the store, with its
    /// config and layer blobs) to `reference`. Blobs the registry already
    /// has are not uploaded again.
    pub async fn push(&self, store: &Store, manifest_digest: &str, reference: &str) -> anyhow::Result<PushedImage> {
        let name = normalize_reference(reference)?;
        let bytes = store.content.read(manifest_digest)?;
        let bad = |reason: String| RegistryError::BadManifest { reference: name.clone(), reason };
        let Manifest::Image { media_type, config, layers } = Manifest::parse(&bytes, None).map_err(bad)? else {
            return Err(bad("pushing an index is not supported; push a single-platform image".into()).into());
        };
        let blobs: Vec<Descriptor> = std::iter::once(config).chain(layers).collect();
        self.push_blobs_and_manifest(store, &name, manifest_digest, bytes, &media_type, blobs).await
    }

    /// Upload `blobs` (from the store; skipping those the registry has,
    /// mounting from another repository where it can), then the manifest
    /// `bytes` of `media_type` as `name` (normalized).
    async fn push_blobs_and_manifest(
        &self,
        store: &Store,
        name: &str,
        manifest_digest: &str,
        bytes: Vec<u8>,
        media_type: &str,
        blobs: Vec<Descriptor>,
    ) -> anyhow::Result<PushedImage> {
        let name = name.to_string();
        let parsed = to_oci_reference(&name);
        let host = if parsed.registry() == "docker.io" { "index.docker.io" } else { parsed.registry() };
        let target = match parsed.tag() {
            Some(t) => Reference::with_tag(host.into(), parsed.repository().into(), t.into()),
            None => Reference::with_digest(host.into(), parsed.repository().into(), manifest_digest.into()),
        };
        let label = parsed.registry().to_string();
        let classify = |e: OciDistributionError| classify(e, &name, &label);
        let bad = |reason: String| RegistryError::BadManifest { reference: name.clone(), reason };

        let auth = auth::credentials_for(&self.config.auth_file, host)?;
        self.client(host).auth(&target, &auth, RegistryOperation::Push).await.map_err(classify)?;
        // Separate tokens for HEAD (pull scope) on registries with token auth.
        self.client(host).auth(&target, &auth, RegistryOperation::Pull).await.map_err(classify)?;

        let mount_sources = mount_sources(store, parsed.registry(), parsed.repository());
        let outcomes: Vec<BlobPush> = futures::stream::iter(blobs)
            .map(|blob| {
                let target = &target;
                let source_repo = mount_sources.get(&blob.digest).cloned();
                async move {
                    let client = self.client(host);
                    if client.blob_exists(target, &blob.digest).await.map_err(classify)? {
                        return anyhow::Ok(BlobPush::AlreadyThere);
                    }
                    // A repository of this registry we pulled it from may
                    // lend it; if the registry declines, upload.
                    if let Some(repo) = source_repo {
                        let source = Reference::with_tag(host.into(), repo, "latest".into());
                        if client.mount_blob(target, &source, &blob.digest).await.is_ok() {
                            return Ok(BlobPush::Mounted);
                        }
                    }
                    let file = store.content.open_blob(&blob.digest)?;
                    client
                        .push_blob_stream(target, file_stream(file), &blob.digest, Some(blob.size))
                        .await
                        .map_err(classify)?;
                    Ok(BlobPush::Uploaded)
                }
            })
            .buffer_unordered(PARALLEL_BLOBS)
            .try_collect()
            .await?;

        let content_type = http::HeaderValue::from_str(media_type)
            .map_err(|_| bad(format!("media type {media_type:?} is not a valid header value")))?;
        self.client(host).push_manifest_raw(&target, bytes, content_type).await.map_err(classify)?;
        let count = |kind| outcomes.iter().filter(|o| **o == kind).count();
        Ok(PushedImage {
            reference: name.clone(),
            manifest_digest: manifest_digest.to_string(),
            blobs_uploaded: count(BlobPush::Uploaded),
            blobs_mounted: count(BlobPush::Mounted),
            blobs_skipped: count(BlobPush::AlreadyThere),
        })
    }

    /// Check `user`/`password` against `host` and, if accepted, store them
    /// in the docker credentials file.
    pub async fn login(&self, host: &str, user: &str, password: &str) -> anyhow::Result<()> {
        let host = if host == "docker.io" || host == "index.docker.io" { "docker.io" } else { host };
        let api_host = if host == "docker.io" { "index.docker.io" } else { host };
        // Any repository will do: a refusal is a 401 whatever the name, an
        // accepted login a 200 or a 404.
        let probe = Reference::with_tag(api_host.into(), "kiln/login-check".into(), "latest".into());
        let auth = RegistryAuth::Basic(user.into(), password.into());
        let classify = |e: OciDistributionError| classify(e, "login", host);
        self.client(api_host).auth(&probe, &auth, RegistryOperation::Pull).await.map_err(classify)?;
        match self.client(api_host).list_tags(&probe, &auth, Some(1), None).await.map_err(classify) {
            Ok(_) | Err(RegistryError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        auth::store_credentials(&self.config.auth_file, host, user, password)
    }
}

/// Blob digest → another repository of `registry` holding it, from the
/// images the local store has under names in that registry. Best effort:
/// unreadable images are skipped.
fn mount_sources(store: &Store, registry: &str, repository: &str) -> std::collections::HashMap<String, String> {
    let mut sources = std::collections::HashMap::new();
    for record in store.images.list().unwrap_or_default() {
        let reference = to_oci_reference(&record.name);
        if reference.registry() != registry || reference.repository() == repository {
            continue;
        }
        let Ok(bytes) = store.content.read(&record.target.digest) else { continue };
        if let Ok(Manifest::Image { config, layers, .. }) = Manifest::parse(&bytes, None) {
            for blob in std::iter::once(config).chain(layers) {
                sources.entry(blob.digest).or_insert_with(|| reference.repository().to_string());
            }
        }
    }
    sources
}

/// An oci-client reference for a name from [`normalize_reference`]
/// (`host/repo[:tag][@digest]`), built from its parts: parsing it again
/// with oci-client's regex costs a second in debug builds.
fn to_oci_reference(normalized: &str) -> Reference {
    let (name_tag, digest) = match normalized.split_once('@') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (normalized, None),
    };
    let (registry, rest) = name_tag.split_once('/').unwrap_or(("docker.io", name_tag));
    let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (repository, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_string())),
        None => (rest, None),
    };
    match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry.into(), repository.into(), t, d),
        (Some(t), None) => Reference::with_tag(registry.into(), repository.into(), t),
        (None, Some(d)) => Reference::with_digest(registry.into(), repository.into(), d),
        (None, None) => Reference::with_tag(registry.into(), repository.into(), "latest".into()),
    }
}

/// A file as a stream of 1 MiB chunks for uploads.
fn file_stream(
    file: std::fs::File,
) -> impl futures::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static {
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 1 << 20];
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), file)))
    })
}

/// `rootfs.diff_ids` of an image config.
fn diff_ids(config: &[u8]) -> Result<Vec<String>, String> {
    let json: serde_json::Value = serde_json::from_slice(config).map_err(|e| format!("config is not JSON: {e}"))?;
    let ids = json.pointer("/rootfs/diff_ids").and_then(|d| d.as_array()).ok_or("config has no rootfs.diff_ids")?;
    ids.iter()
        .map(|d| {
            let d = d.as_str().ok_or("rootfs.diff_ids holds a non-string")?;
            kiln_cache::content::digest_hex(d).map_err(|e| e.to_string())?;
            Ok(d.to_string())
        })
        .collect()
}

/// Turn an oci-client error into the [`RegistryError`] a user can act on.
fn classify(e: OciDistributionError, reference: &str, registry: &str) -> RegistryError {
    let (reference, registry) = (reference.to_string(), registry.to_string());
    match e {
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            RegistryError::Unauthorized { reference, registry }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound { reference, registry },
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                RegistryError::NotFound { reference, registry }
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                RegistryError::Unauthorized { reference, registry }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::ManifestInvalid | OciErrorCode::ManifestBlobUnknown))
            {
                RegistryError::BadManifest { reference, reason: format!("{envelope} ({url})") }
            } else {
                RegistryError::Other { registry, detail: format!("{envelope} ({url})") }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound { reference, registry },
        OciDistributionError::ServerError { code: 401 | 403, .. } => {
            RegistryError::Unauthorized { reference, registry }
        }
        OciDistributionError::RequestError(err) => {
            let mut detail = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                detail.push_str(&format!(": {s}"));
                source = s.source();
            }
            RegistryError::Unreachable { registry, detail }
        }
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
            RegistryError::DigestMismatch { what: format!("manifest of {reference}"), expected, actual }
        }
        OciDistributionError::ManifestParsingError(r)
        | OciDistributionError::VersionedParsingError(r)
        | OciDistributionError::UnsupportedMediaTypeError(r) => RegistryError::BadManifest { reference, reason: r },
        other => RegistryError::Other { registry, detail: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_adds_mirrors_and_insecure_hosts() {
        let mut c = RegistryConfig::default();
        c.merge_file(
            std::path::Path::new("config.json"),
            br#"{"registry-mirrors":{"docker.io":["http://127.0.0.1:5000/"]},"insecure-registries":["h:1"]}"#,
        )
        .unwrap();
        c.merge_file(std::path::Path::new("config.json"), br#"{"registry-mirrors":["https://m.example"]}"#).unwrap();
        assert_eq!(
            c.mirrors,
            vec![
                ("docker.io".to_string(), "http://127.0.0.1:5000".to_string()),
                ("docker.io".to_string(), "https://m.example".to_string())
            ]
        );
        assert_eq!(c.insecure, vec!["h:1".to_string()]);
        let err = c.merge_file(std::path::Path::new("x/config.json"), br#"{"registry-mirrors":[1]}"#).unwrap_err();
        assert!(err.to_string().starts_with("x/config.json: registry-mirrors"), "{err}");
        assert!(c.is_plain_http("127.0.0.1:5000") && c.is_plain_http("h:1"));
        assert!(!c.is_plain_http("h:2") && !c.is_plain_http("m.example"));
        c.insecure.push("localhost".into());
        assert!(c.is_plain_http("localhost:7000") && c.is_plain_http("localhost"));
        let r = Registry::new(c);
        let eps = r.endpoints("docker.io");
        assert_eq!(
            eps.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(),
            ["127.0.0.1:5000", "m.example", "index.docker.io"]
        );
    }

    #[test]
    fn oci_references_from_normalized_names() {
        let d = format!("sha256:{}", "b".repeat(64));
        for name in [
            "docker.io/library/busybox:latest".to_string(),
            "127.0.0.1:5000/a/b/c:v1".to_string(),
            format!("127.0.0.1:5000/a/b@{d}"),
        ] {
            let ours = to_oci_reference(&name);
            let theirs: Reference = name.parse().unwrap();
            assert_eq!(
                (ours.registry(), ours.repository(), ours.tag(), ours.digest()),
                (theirs.registry(), theirs.repository(), theirs.tag(), theirs.digest()),
                "{name}"
            );
        }
    }

    #[test]
    fn diff_ids_are_validated() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(diff_ids(format!(r#"{{"rootfs":{{"diff_ids":["{d}"]}}}}"#).as_bytes()).unwrap(), vec![d]);
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["md5:x"]}}"#).is_err());
        assert!(diff_ids(b"{}").is_err());
    }
}
