//! The format of a build cache shared through a directory or a registry
//! (`--cache-to` / `--cache-from`); `exporter/CACHE.md` describes it in full.
//!
//! A cache is a [`CacheConfig`]: a forest of layers (each one blob, with
//! the diff ID it unpacks to and its parent) and records mapping a cache
//! key to the top layer of that step's result. Cache keys are content
//! derived, so they mean the same thing on any machine; nothing
//! host-specific (snapshot ids, paths) is in the config. Writing it is the
//! exporter's job, fetching it the engine's; both go through this module.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::content::digest_hex;

/// Media type of the cache config blob.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";

/// Key of the cache config inside an image config (`type=inline`).
pub const INLINE_CACHE_KEY: &str = "kiln.cache.v1";

/// The only version this code reads and writes.
pub const CACHE_CONFIG_VERSION: u32 = 1;

/// The graph of cache keys and the layers their results are made of.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Always [`CACHE_CONFIG_VERSION`].
    pub version: u32,
    /// Layers; `parent` always points at an earlier entry.
    pub layers: Vec<CacheLayer>,
    /// Cache key → result.
    pub records: Vec<CacheKeyRecord>,
}

/// One layer of the forest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheLayer {
    /// `sha256:` of the (compressed) blob.
    pub blob: String,
    /// The blob's layer media type (`...tar+gzip`, `...tar+zstd`, `...tar`).
    pub media_type: String,
    /// Blob size in bytes.
    pub size: u64,
    /// `sha256:` of the uncompressed tar: the snapshot it unpacks to.
    pub diff_id: String,
    /// Index of the layer below this one; `None` for a bottom layer.
    pub parent: Option<usize>,
    /// When the exporting store first committed this layer (Unix seconds).
    /// An importer keeps the earlier of this and its own time, so a fully
    /// cached build on another root gets the same image `created`, hence
    /// the same image ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
}

/// One cached step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKeyRecord {
    /// The step's cache key (`sha256:<hex>`).
    pub key: String,
    /// Index of the top layer of its result; `None` for an empty result.
    pub chain: Option<usize>,
}

impl CacheConfig {
    /// Parse and check a config (from a file or a registry: untrusted).
    /// Errors say which entry is wrong.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<CacheConfig> {
        let config: CacheConfig =
            serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("cache config is not valid: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Check versions, digests and that every index points where it may.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.version == CACHE_CONFIG_VERSION,
            "cache config version {} is not supported (expected {CACHE_CONFIG_VERSION})",
            self.version
        );
        for (i, layer) in self.layers.iter().enumerate() {
            digest_hex(&layer.blob).map_err(|e| anyhow::anyhow!("cache config layers[{i}].blob: {e}"))?;
            digest_hex(&layer.diff_id).map_err(|e| anyhow::anyhow!("cache config layers[{i}].diff_id: {e}"))?;
            if let Some(p) = layer.parent {
                anyhow::ensure!(p < i, "cache config layers[{i}].parent = {p}: must name an earlier layer");
            }
        }
        for (i, record) in self.records.iter().enumerate() {
            digest_hex(&record.key).map_err(|e| anyhow::anyhow!("cache config records[{i}].key: {e}"))?;
            if let Some(c) = record.chain {
                anyhow::ensure!(c < self.layers.len(), "cache config records[{i}].chain = {c}: no such layer");
            }
        }
        Ok(())
    }

    /// The layers of a result whose top layer is `top`, bottom first.
    pub fn chain(&self, top: Option<usize>) -> Vec<&CacheLayer> {
        let mut out = Vec::new();
        let mut at = top;
        // Parents point strictly backwards (validated), so this ends.
        while let Some(i) = at {
            out.push(&self.layers[i]);
            at = self.layers[i].parent;
        }
        out.reverse();
        out
    }

    /// Every record as key → its layers, bottom first.
    pub fn chains(&self) -> HashMap<String, Vec<CacheLayer>> {
        self.records.iter().map(|r| (r.key.clone(), self.chain(r.chain).into_iter().cloned().collect())).collect()
    }
}

/// Builds a [`CacheConfig`] from results, storing shared chain prefixes
/// once.
#[derive(Debug, Default)]
pub struct CacheConfigBuilder {
    config: CacheConfig,
    /// (parent, blob, diff ID) → layer index.
    seen: HashMap<(Option<usize>, String, String), usize>,
}

/// A layer blob as [`CacheConfigBuilder::add`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// `sha256:` of the blob.
    pub blob: String,
    /// Layer media type.
    pub media_type: String,
    /// Blob size.
    pub size: u64,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
    /// The snapshot's commit time, if known.
    pub created: Option<i64>,
}

impl CacheConfigBuilder {
    /// Record that `key`'s result is `chain` (bottom first).
    pub fn add(&mut self, key: &str, chain: &[LayerRef]) {
        let mut parent = None;
        for layer in chain {
            let id = (parent, layer.blob.clone(), layer.diff_id.clone());
            let index = match self.seen.get(&id) {
                Some(&i) => i,
                None => {
                    self.config.layers.push(CacheLayer {
                        blob: layer.blob.clone(),
                        media_type: layer.media_type.clone(),
                        size: layer.size,
                        diff_id: layer.diff_id.clone(),
                        parent,
                        created: layer.created,
                    });
                    let i = self.config.layers.len() - 1;
                    self.seen.insert(id, i);
                    i
                }
            };
            parent = Some(index);
        }
        if !self.config.records.iter().any(|r| r.key == key) {
            self.config.records.push(CacheKeyRecord { key: key.to_string(), chain: parent });
        }
    }

    /// The config, records sorted by key (the same results give the same
    /// bytes).
    pub fn finish(mut self) -> CacheConfig {
        self.config.version = CACHE_CONFIG_VERSION;
        self.config.records.sort_by(|a, b| a.key.cmp(&b.key));
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerRef {
        LayerRef {
            blob: format!("sha256:{}", hex::encode([n; 32])),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: n as u64,
            diff_id: format!("sha256:{}", hex::encode([n + 100; 32])),
            created: Some(1_700_000_000 + n as i64),
        }
    }

    fn key(n: u8) -> String {
        format!("sha256:{}", hex::encode([n + 200; 32]))
    }

    #[test]
    fn shared_prefixes_are_stored_once_and_chains_come_back() {
        let mut b = CacheConfigBuilder::default();
        b.add(&key(2), &[layer(1), layer(2)]);
        b.add(&key(1), &[layer(1)]);
        b.add(&key(3), &[layer(1), layer(3)]);
        let config = b.finish();
        assert_eq!(config.layers.len(), 3, "{config:?}");
        let bytes = serde_json::to_vec(&config).unwrap();
        let back = CacheConfig::parse(&bytes).unwrap();
        assert_eq!(back, config);
        let chains = back.chains();
        let blobs = |k: u8| chains[&key(k)].iter().map(|l| l.blob.clone()).collect::<Vec<_>>();
        assert_eq!(blobs(2), vec![layer(1).blob, layer(2).blob]);
        assert_eq!(blobs(3), vec![layer(1).blob, layer(3).blob]);
        assert_eq!(blobs(1), vec![layer(1).blob]);
    }

    #[test]
    fn bad_configs_are_refused_with_the_place() {
        let mut b = CacheConfigBuilder::default();
        b.add(&key(1), &[layer(1), layer(2)]);
        let good = b.finish();

        let mut loop_back = good.clone();
        loop_back.layers[0].parent = Some(1);
        let err = loop_back.validate().unwrap_err().to_string();
        assert!(err.contains("layers[0].parent"), "{err}");

        let mut bad_chain = good.clone();
        bad_chain.records[0].chain = Some(7);
        assert!(bad_chain.validate().unwrap_err().to_string().contains("records[0].chain"));

        let mut bad_digest = good.clone();
        bad_digest.layers[1].blob = "sha256:nothex".into();
        assert!(bad_digest.validate().unwrap_err().to_string().contains("layers[1].blob"));

        let err = CacheConfig::parse(br#"{"version":2,"layers":[],"records":[]}"#).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        assert!(CacheConfig::parse(b"[]").unwrap_err().to_string().contains("cache config is not valid"));
    }
}
