//! `-o` / `--output` as buildx spells it, parsed once into [`Output`]
//! before any bytes move: `type=oci,dest=out.tar,compression=zstd`.

use std::path::{Path, PathBuf};

use crate::compression::{Compression, CompressionKind};
use crate::dest::STDOUT_DEST;
use crate::image::ImageOptions;
use crate::layer::LayerOptions;

/// Where and how a build result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `type=image` (into the local image store under `names`; the engine
    /// tags it, and pushes it when `push`) or `type=registry` (`push`).
    Image {
        /// `name=` (comma-separated, quote the option); may be empty for
        /// `type=image` (the engine uses `-t`).
        names: Vec<String>,
        /// Push after storing.
        push: bool,
        /// Layer and manifest settings.
        image: ImageOutputOptions,
    },
    /// `type=oci`: an OCI image layout, as a tar or a directory.
    Oci {
        /// `dest=`.
        dest: OciDest,
        /// `name=`, recorded in `index.json`.
        name: Option<String>,
        /// Layer and manifest settings.
        image: ImageOutputOptions,
    },
    /// `type=docker,dest=FILE.tar`: a docker-archive for `docker load`.
    Docker {
        /// `dest=`.
        dest: PathBuf,
        /// `name=`, the archive's `RepoTags`.
        name: Option<String>,
        /// Layer and manifest settings.
        image: ImageOutputOptions,
    },
    /// `type=local,dest=DIR`: the final filesystem.
    Local {
        /// `dest=`.
        dest: PathBuf,
    },
    /// `type=tar,dest=FILE`: the final filesystem as a tar.
    Tar {
        /// `dest=`.
        dest: PathBuf,
    },
}

/// Where an OCI layout goes: `dest=x.tar` (or `tar=true`) is a tar,
/// otherwise (or `tar=false`) a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciDest {
    /// A tar file.
    Tar(PathBuf),
    /// A directory.
    Dir(PathBuf),
}

/// The image options an output takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOutputOptions {
    /// `compression=`, `compression-level=`.
    pub compression: Compression,
    /// `force-compression=`.
    pub force_compression: bool,
    /// `oci-mediatypes=` (defaults: `type=oci` and zstd → true, else false).
    pub oci_mediatypes: bool,
    /// `rewrite-timestamp=`; unset means "when `SOURCE_DATE_EPOCH` is set".
    pub rewrite_timestamp: Option<bool>,
}

impl ImageOutputOptions {
    /// The options for writing the image, given `SOURCE_DATE_EPOCH`.
    pub fn image_options(&self, source_date_epoch: Option<i64>) -> ImageOptions {
        let clamp = match self.rewrite_timestamp {
            Some(false) => None,
            _ => source_date_epoch,
        };
        ImageOptions {
            layers: LayerOptions {
                compression: self.compression,
                force_compression: self.force_compression,
                clamp_mtime: clamp,
            },
            oci_mediatypes: self.oci_mediatypes,
            source_date_epoch,
        }
    }
}

/// A bad `--output` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--output {spec:?}: {message}")]
pub struct OutputError {
    /// The whole value given.
    pub spec: String,
    /// What is wrong with it.
    pub message: String,
}

/// Split buildx's CSV: commas separate fields, double quotes protect them.
fn split_csv(spec: &str) -> Result<Vec<String>, String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    if quoted {
        return Err("unterminated double quote".into());
    }
    Ok(fields)
}

/// `key=value` options in the order given.
pub(crate) type Options = Vec<(String, String)>;

/// `type=X,k=v,...` → (the type if given, the other options in order);
/// an option without `=` or given twice is an error.
pub(crate) fn split_options(spec: &str) -> Result<(Option<String>, Options), String> {
    let mut kind = None;
    let mut opts: Vec<(String, String)> = Vec::new();
    for field in split_csv(spec)? {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let Some((k, v)) = field.split_once('=') else {
            return Err(format!("option {field:?} has no value (expected key=value)"));
        };
        if k == "type" {
            if kind.replace(v.to_string()).is_some() {
                return Err("type given twice".into());
            }
        } else if opts.iter().any(|(seen, _)| seen == k) {
            return Err(format!("option {k} given twice"));
        } else {
            opts.push((k.to_string(), v.to_string()));
        }
    }
    Ok((kind, opts))
}

pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{key}={value:?}: expected true or false")),
    }
}

const TYPES: &str = "image, registry, oci, docker, local, tar";

impl Output {
    /// Parse one `--output` value. A bare path (no `=`) is `type=local`
    /// as in buildx, and a bare `-` is `type=tar` to standard output.
    pub fn parse(spec: &str) -> Result<Output, OutputError> {
        Self::parse_inner(spec).map_err(|message| OutputError { spec: spec.to_string(), message })
    }

    fn parse_inner(spec: &str) -> Result<Output, String> {
        if !spec.contains('=') {
            if spec.is_empty() {
                return Err("expected type=...,dest=...".into());
            }
            if spec == "-" {
                return Ok(Output::Tar { dest: PathBuf::from(STDOUT_DEST) });
            }
            return Ok(Output::Local { dest: PathBuf::from(spec) });
        }
        let (kind, opts) = split_options(spec)?;
        let kind = kind.ok_or_else(|| format!("missing type= (one of {TYPES})"))?;
        let allowed: &[&str] = match kind.as_str() {
            "image" | "registry" => &["name", "push", "compression", "compression-level", "force-compression", "oci-mediatypes", "rewrite-timestamp"],
            "oci" => &["dest", "tar", "name", "compression", "compression-level", "force-compression", "oci-mediatypes", "rewrite-timestamp"],
            "docker" => &["dest", "name", "compression", "compression-level", "force-compression", "oci-mediatypes", "rewrite-timestamp"],
            "local" | "tar" => &["dest"],
            other => return Err(format!("unknown output type {other:?} (known: {TYPES})")),
        };
        if let Some((k, _)) = opts.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(format!("unknown option {k:?} for type={kind} (known: {})", allowed.join(", ")));
        }
        let get = |k: &str| opts.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let dest = || -> Result<PathBuf, String> {
            match get("dest") {
                None | Some("") => Err(format!("type={kind} needs dest=")),
                Some(STDOUT_DEST) if kind == "local" => Err("type=local writes a directory; dest=- (standard output) needs type=tar, oci or docker".into()),
                Some(d) => Ok(PathBuf::from(d)),
            }
        };
        let name = get("name").filter(|n| !n.is_empty()).map(str::to_string);
        let names: Vec<String> =
            name.iter().flat_map(|n| n.split(',')).map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
        if kind == "local" || kind == "tar" {
            let dest = dest()?;
            return Ok(if kind == "local" { Output::Local { dest } } else { Output::Tar { dest } });
        }
        let image = image_options(&get, kind == "oci")?;
        Ok(match kind.as_str() {
            "image" | "registry" => {
                let push = match get("push") {
                    Some(v) => parse_bool("push", v)?,
                    None => kind == "registry",
                };
                if kind == "registry" && !push {
                    return Err("type=registry always pushes; use type=image to only store".into());
                }
                if kind == "registry" && names.is_empty() {
                    return Err("type=registry needs name= (or -t)".into());
                }
                Output::Image { names, push, image }
            }
            "oci" => {
                let dest = dest()?;
                let as_tar = match get("tar") {
                    Some(v) => parse_bool("tar", v)?,
                    None => dest.extension().is_some_and(|e| e == "tar") || dest == Path::new(STDOUT_DEST),
                };
                Output::Oci { dest: if as_tar { OciDest::Tar(dest) } else { OciDest::Dir(dest) }, name, image }
            }
            _ => Output::Docker { dest: dest()?, name, image },
        })
    }
}

fn image_options<'a>(get: &dyn Fn(&str) -> Option<&'a str>, oci_default: bool) -> Result<ImageOutputOptions, String> {
    let kind = match get("compression") {
        None => CompressionKind::Gzip,
        Some(v) => CompressionKind::parse(v)
            .ok_or_else(|| format!("compression={v:?}: expected gzip, zstd or uncompressed"))?,
    };
    let level = match get("compression-level") {
        None => None,
        Some(v) => {
            let n: i32 = v.parse().map_err(|_| format!("compression-level={v:?}: expected a number"))?;
            let (lo, hi) = kind.level_range();
            if kind == CompressionKind::Uncompressed {
                return Err("compression-level makes no sense with compression=uncompressed".into());
            }
            if !(lo..=hi).contains(&n) {
                return Err(format!("compression-level={n}: {kind:?} takes {lo} to {hi}").to_lowercase());
            }
            Some(n)
        }
    };
    let force_compression = get("force-compression").map(|v| parse_bool("force-compression", v)).transpose()?.unwrap_or(false);
    let oci_mediatypes = match get("oci-mediatypes").map(|v| parse_bool("oci-mediatypes", v)).transpose()? {
        Some(false) if kind == CompressionKind::Zstd => {
            return Err("compression=zstd needs oci-mediatypes=true (Docker media types have no zstd)".into());
        }
        Some(b) => b,
        None => oci_default || kind == CompressionKind::Zstd,
    };
    let rewrite_timestamp = get("rewrite-timestamp").map(|v| parse_bool("rewrite-timestamp", v)).transpose()?;
    Ok(ImageOutputOptions { compression: Compression { kind, level }, force_compression, oci_mediatypes, rewrite_timestamp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildx_syntax() {
        let o = Output::parse("type=oci,dest=out.tar,compression=zstd,compression-level=9,force-compression=true").unwrap();
        let Output::Oci { dest, image, name } = o else { panic!("not oci: {o:?}") };
        assert_eq!(dest, OciDest::Tar("out.tar".into()));
        assert_eq!(name, None);
        assert_eq!(image.compression, Compression { kind: CompressionKind::Zstd, level: Some(9) });
        assert!(image.force_compression && image.oci_mediatypes);
        assert_eq!(
            Output::parse("type=oci,dest=layout").unwrap(),
            Output::Oci { dest: OciDest::Dir("layout".into()), name: None, image: image_options(&|_| None, true).unwrap() }
        );
        let Output::Image { names, push, image } = Output::parse("type=registry,\"name=a:1,b:2\"").unwrap() else { panic!() };
        assert_eq!(names, ["a:1", "b:2"]);
        assert!(push && !image.oci_mediatypes);
        assert_eq!(Output::parse("out").unwrap(), Output::Local { dest: "out".into() });
        assert_eq!(Output::parse("type=tar,dest=fs.tar").unwrap(), Output::Tar { dest: "fs.tar".into() });
        let Output::Docker { image, .. } = Output::parse("type=docker,dest=d.tar,rewrite-timestamp=true").unwrap() else { panic!() };
        assert_eq!(image.rewrite_timestamp, Some(true));
        // Standard output, as buildx spells it.
        assert_eq!(Output::parse("-").unwrap(), Output::Tar { dest: "-".into() });
        let Output::Oci { dest, .. } = Output::parse("type=oci,dest=-").unwrap() else { panic!() };
        assert_eq!(dest, OciDest::Tar("-".into()));
    }

    #[test]
    fn rejects_bad_input_clearly() {
        let err = |s: &str| Output::parse(s).unwrap_err().to_string();
        assert!(err("type=floppy,dest=x").contains("unknown output type \"floppy\""), "{}", err("type=floppy"));
        assert!(err("type=local,dest=x,compression=gzip").contains("unknown option \"compression\" for type=local"));
        assert!(err("type=oci").contains("needs dest="));
        assert!(err("type=local,dest=-").contains("needs type=tar, oci or docker"));
        assert!(err("type=oci,dest=x,compression=lz4").contains("expected gzip, zstd or uncompressed"));
        assert!(err("type=oci,dest=x,compression=gzip,compression-level=12").contains("0 to 9"));
        assert!(err("type=oci,dest=x,compression-level=fast").contains("expected a number"));
        assert!(err("type=docker,dest=x,compression=zstd,oci-mediatypes=false").contains("needs oci-mediatypes=true"));
        assert!(err("type=image,push=maybe").contains("expected true or false"));
        assert!(err("dest=x").contains("missing type="));
        assert!(err("type=oci,dest=a,dest=b").contains("given twice"));
        assert!(err("type=registry").contains("needs name="));
    }
}
