#!/usr/bin/env bash
# Builds a `busybox:latest` OCI image layout from the host's busybox-static,
# without kiln (tar + sha256sum + hand-written JSON), so kiln's tests have a
# base image that kiln itself did not make.
#
#   scripts/make-busybox-image.sh OUT_DIR [TAG]
#
# OUT_DIR becomes an OCI image layout (oci-layout, index.json, blobs/) with
# one image tagged TAG (default: latest): /bin/busybox, a symlink per applet
# (`busybox --list`), /etc/passwd, /etc/group and a world-writable /tmp.
# The result is reproducible: fixed mtimes, owners and ordering.
set -euo pipefail

out=${1:?usage: make-busybox-image.sh OUT_DIR [TAG]}
tag=${2:-latest}
busybox=$(command -v busybox || true)
[[ -n "$busybox" ]] || { echo "make-busybox-image: busybox not found (install busybox-static)" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q "statically linked" \
  || { echo "make-busybox-image: $busybox is not statically linked (install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/dev" "$root/proc" "$root/sys"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 -c "$work/layer.tar" >"$work/layer.tar.gz"

rm -rf "$out"
mkdir -p "$out/blobs/sha256"
# Store a file as a blob; prints its digest hex and size.
put_blob() {
  local hex size
  hex=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  cp "$1" "$out/blobs/sha256/$hex"
  echo "$hex $size"
}
read -r layer_hex layer_size < <(put_blob "$work/layer.tar.gz")

cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"make-busybox-image.sh: busybox-static with applet links"}]}
JSON
printf '%s' "$(cat "$work/config.json")" >"$work/config.min.json"
read -r config_hex config_size < <(put_blob "$work/config.min.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_hex\",\"size\":$config_size},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer_hex\",\"size\":$layer_size}]}" >"$work/manifest.json"
read -r manifest_hex manifest_size < <(put_blob "$work/manifest.json")

printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest_hex\",\"size\":$manifest_size,\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" >"$out/index.json"
echo "sha256:$manifest_hex"
