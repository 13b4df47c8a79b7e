#!/usr/bin/env bash
# Installs the system packages kiln's demo and tests need (Debian, as root).
set -euo pipefail
# registry + base image; libcontainer build deps; OCI tools that check our outputs;
# buildah (equivalence test), podman (docker-archive load), docker.io (its CLI
# drives `kiln serve`), openssl (TLS test certs), bzip2/xz (ADD archives).
PKGS=(docker-registry busybox-static libseccomp-dev pkg-config skopeo umoci runc
      buildah podman docker.io openssl bzip2 xz-utils)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
