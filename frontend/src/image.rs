//! The image config as Docker writes it (`application/vnd.oci.image.config.v1+json`
//! with Docker's extensions: `Healthcheck`, `OnBuild`, `Shell`, ...).
//!
//! oci-spec's `Config` lacks Docker's extensions, and lowering has to carry
//! them from a base image to the result, so the runtime part lives here.
//! Field names follow Docker's JSON exactly so the struct round-trips
//! `docker image inspect` / config blobs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `config` object of an image config blob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `USER`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `EXPOSE`: keys like `80/tcp`, values `{}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// `ENV`, `KEY=VALUE` in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Empty>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `LABEL`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `HEALTHCHECK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `ONBUILD` triggers, as source lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_build: Vec<String>,
    /// `SHELL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shell: Vec<String>,
    /// `ArgsEscaped` (Windows only in practice; kept for round-trips).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_escaped: bool,
}

/// `{}` in `ExposedPorts` / `Volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `HEALTHCHECK` settings (durations in nanoseconds, as Docker stores them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", cmd]`.
    #[serde(default)]
    pub test: Vec<String>,
    /// `--interval`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// `--timeout`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// `--start-period`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// `--start-interval`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    /// `--retries`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One entry of the image history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// RFC 3339 time; filled in at export (or from `SOURCE_DATE_EPOCH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// e.g. `RUN /bin/sh -c make # buildkit`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// True when the step changed only the config.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}
