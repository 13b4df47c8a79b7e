//! The registry side of a shared build cache (`--cache-to type=registry`,
//! `--cache-from REF`): push a cache index with its blobs, fetch a cache
//! index (or an image carrying an inline cache) and, later, the blobs of
//! the steps that hit. Same client, credentials and insecure-registry
//! settings as image pulls and pushes; cache references are spoken to
//! directly (mirrors stand in for `docker.io` images only).

use kiln_cache::Store;
use kiln_cache::content::sha256_digest;
use kiln_cache::images::normalize_reference;
use kiln_frontend::Platform;
use oci_client::errors::OciDistributionError;
use oci_client::{Reference, RegistryOperation};

use super::manifest::{self, Descriptor, Manifest};
use super::{PushedImage, Registry, RegistryError, auth, classify, to_oci_reference};

/// What a `--cache-from` reference held.
#[derive(Debug, Clone)]
pub enum FetchedCache {
    /// A cache index: its layer descriptors and the cache config bytes.
    Index {
        /// Layer blobs listed by the index.
        layers: Vec<Descriptor>,
        /// The cache config, verified against its digest.
        config: Vec<u8>,
    },
    /// An image: its config bytes (verified), which may carry an inline
    /// cache.
    Image {
        /// The image config.
        config: Vec<u8>,
    },
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("config", &self.config).finish()
    }
}

impl Registry {
    /// Push the cache index `index` (in the store) and `blobs` (layers and
    /// the cache config, in the store) as `reference`.
    pub async fn push_cache(
        &self,
        store: &Store,
        index: &Descriptor,
        blobs: Vec<Descriptor>,
        reference: &str,
    ) -> anyhow::Result<PushedImage> {
        let name = normalize_reference(reference)?;
        let bytes = store.content.read(&index.digest)?;
        self.push_blobs_and_manifest(store, &name, &index.digest, bytes, &index.media_type, blobs).await
    }

    /// The client, auth and target for `name` (normalized), for pulling.
    async fn pull_target(
        &self,
        name: &str,
    ) -> anyhow::Result<(Reference, oci_client::secrets::RegistryAuth, String)> {
        let parsed = to_oci_reference(name);
        let host = if parsed.registry() == "docker.io" { "index.docker.io" } else { parsed.registry() }.to_string();
        let target = match (parsed.tag(), parsed.digest()) {
            (_, Some(d)) => Reference::with_digest(host.clone(), parsed.repository().into(), d.into()),
            (Some(t), None) => Reference::with_tag(host.clone(), parsed.repository().into(), t.into()),
            (None, None) => Reference::with_tag(host.clone(), parsed.repository().into(), "latest".into()),
        };
        let auth = auth::credentials_for(&self.config.auth_file, &host)?;
        let label = parsed.registry().to_string();
        self.client(&host)
            .auth(&target, &auth, RegistryOperation::Pull)
            .await
            .map_err(|e: OciDistributionError| classify(e, name, &label))?;
        Ok((target, auth, label))
    }

    /// A manifest by reference, verified when the reference pins a digest.
    async fn manifest_bytes(&self, name: &str, target: &Reference, auth: &oci_client::secrets::RegistryAuth, label: &str) -> anyhow::Result<Vec<u8>> {
        let (bytes, _) = self
            .client(target.registry())
            .pull_manifest_raw(target, auth, manifest::ACCEPTED)
            .await
            .map_err(|e| classify(e, name, label))?;
        let actual = sha256_digest(&bytes);
        if let Some(expected) = target.digest()
            && expected != actual
        {
            return Err(RegistryError::DigestMismatch { what: format!("manifest of {name}"), expected: expected.into(), actual }.into());
        }
        Ok(bytes.to_vec())
    }

    /// Fetch what `reference` holds for `--cache-from`: a kiln cache index,
    /// or the config of an image (for `platform`, when it is an index of
    /// images).
    pub async fn fetch_cache(&self, store: &Store, reference: &str, platform: &Platform) -> anyhow::Result<FetchedCache> {
        let name = normalize_reference(reference)?;
        let (target, auth, label) = self.pull_target(&name).await?;
        let bad = |reason: String| RegistryError::BadManifest { reference: name.clone(), reason };
        let bytes = self.manifest_bytes(&name, &target, &auth, &label).await?;
        let manifest = Manifest::parse(&bytes, None).map_err(bad)?;
        let manifest = match manifest {
            Manifest::Index { manifests, .. } => {
                if let Some(config) =
                    manifests.iter().find(|d| d.media_type == kiln_cache::remote::CACHE_CONFIG_MEDIA_TYPE)
                {
                    let layers = manifests.iter().filter(|d| d.digest != config.digest).cloned().collect();
                    let config = self.small_blob(store, &name, &target, config, &label).await?;
                    return Ok(FetchedCache::Index { layers, config });
                }
                let chosen = manifest::select_platform(&manifests, platform)
                    .ok_or_else(|| bad(format!("neither a kiln cache nor an image for platform {platform}")))?;
                let child = target.clone_with_digest(chosen.digest.clone());
                let child_bytes = self.manifest_bytes(&name, &child, &auth, &label).await?;
                Manifest::parse(&child_bytes, Some(&chosen.media_type)).map_err(bad)?
            }
            image => image,
        };
        let Manifest::Image { config, .. } = manifest else {
            return Err(bad("an index inside an index".into()).into());
        };
        let config = self.small_blob(store, &name, &target, &config, &label).await?;
        Ok(FetchedCache::Image { config })
    }

    /// A small blob (a config), into the store and back, verified.
    async fn small_blob(&self, store: &Store, name: &str, target: &Reference, desc: &Descriptor, label: &str) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(desc.size <= 64 << 20, "{name}: config blob {} is too large ({} bytes)", desc.digest, desc.size);
        if !store.content.exists(&desc.digest) {
            self.fetch_blob(store, target, desc, name, label).await?;
        }
        Ok(store.content.read(&desc.digest)?)
    }

    /// Download the blob `desc` of repository `reference` into the store
    /// (verified while it streams), unless the store has it.
    pub async fn fetch_cache_blob(&self, store: &Store, reference: &str, desc: &Descriptor) -> anyhow::Result<()> {
        if store.content.exists(&desc.digest) {
            return Ok(());
        }
        let name = normalize_reference(reference)?;
        let (target, _, label) = self.pull_target(&name).await?;
        self.fetch_blob(store, &target, desc, &name, &label).await
    }
}
