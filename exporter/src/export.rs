//! One entry point for build results: [`export`] writes an image spec to
//! the [`Output`] the user chose.

use kiln_cache::Store;

use crate::dest::StagedDest;
use crate::image::{BuiltImage, ImageSpec, build_image};
use crate::layout::{NamedImage, write_docker_tar, write_oci_dir, write_oci_tar};
use crate::output::{OciDest, Output};
use crate::rootfs::MergedTree;

/// Write `spec` (snapshots of `store`) to `output`.
///
/// For image outputs the image is built into the content store and
/// returned (for `Output::Image` the engine then tags and maybe pushes
/// it). The destination is checked before any layer is made, and written
/// beside and renamed at the end: on error nothing is left at it.
/// `source_date_epoch` makes times fixed (see [`crate::image`]).
pub fn export(store: &Store, spec: &ImageSpec, output: &Output, source_date_epoch: Option<i64>) -> anyhow::Result<Option<BuiltImage>> {
    let mtime = source_date_epoch.unwrap_or(0);
    match output {
        Output::Image { image, .. } => Ok(Some(build_image(store, spec, &image.image_options(source_date_epoch))?)),
        Output::Oci { dest, name, image } => {
            let options = image.image_options(source_date_epoch);
            let named = |built: &BuiltImage| [NamedImage { manifest: built.manifest.clone(), name: name.clone() }];
            match dest {
                OciDest::Tar(path) => {
                    let (staged, file) = StagedDest::file(path)?;
                    let built = build_image(store, spec, &options)?;
                    let file = write_oci_tar(store, &named(&built), file, mtime)?;
                    staged.commit(Some(file))?;
                    Ok(Some(built))
                }
                OciDest::Dir(path) => {
                    let staged = StagedDest::dir(path)?;
                    let built = build_image(store, spec, &options)?;
                    write_oci_dir(store, &named(&built), staged.path())?;
                    staged.commit(None)?;
                    Ok(Some(built))
                }
            }
        }
        Output::Docker { dest, name, image } => {
            let (staged, file) = StagedDest::file(dest)?;
            let built = build_image(store, spec, &image.image_options(source_date_epoch))?;
            let images = [NamedImage { manifest: built.manifest.clone(), name: name.clone() }];
            let file = write_docker_tar(store, &images, file, mtime)?;
            staged.commit(Some(file))?;
            Ok(Some(built))
        }
        Output::Local { dest } => {
            let staged = StagedDest::dir(dest)?;
            merged(store, spec)?.copy_to(staged.path())?;
            staged.commit(None)?;
            Ok(None)
        }
        Output::Tar { dest } => {
            let (staged, file) = StagedDest::file(dest)?;
            let file = merged(store, spec)?.write_tar(file)?;
            staged.commit(Some(file))?;
            Ok(None)
        }
    }
}

fn merged(store: &Store, spec: &ImageSpec) -> anyhow::Result<MergedTree> {
    let mut dirs = Vec::new();
    for id in &spec.layers {
        anyhow::ensure!(store.snapshots.exists(id), "snapshot {id:?} does not exist in the store");
        dirs.push(store.snapshots.path(id));
    }
    MergedTree::from_layers(&dirs)
}

/// Name `built` in the store's image store under each of `names` (what
/// `type=image` does after [`export`]; pushing is the engine's part).
pub fn tag_image(store: &Store, built: &BuiltImage, names: &[String]) -> anyhow::Result<()> {
    let target = kiln_cache::images::Descriptor {
        media_type: built.manifest.media_type().to_string(),
        digest: built.manifest.digest().to_string(),
        size: built.manifest.size(),
    };
    for name in names {
        store.images.put(name, &target).map_err(|e| e.context(format!("naming the image {name}")))?;
    }
    Ok(())
}
