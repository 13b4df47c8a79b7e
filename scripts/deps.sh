#!/usr/bin/env bash
# Installs the system packages kiln's demo and tests need (Debian, as root).
set -euo pipefail
PKGS=(docker-registry busybox-static libseccomp-dev pkg-config skopeo umoci runc)
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
