#!/usr/bin/env bash
# Makes the local base image for hosts that cannot pull from a public registry: Debian bookworm from
# Debian's own packages (debootstrap), Python 3.11 + venv + the CA store, nothing else.
#   container/base.sh [IMAGE]        (default localhost/imgserve-base:bookworm; run as root)
# The Debian mirror is read from this host's apt sources (so a host behind a local mirror uses it);
# the image's own sources.list names the public mirror, never this host's.
set -euo pipefail
IMAGE=${1:-localhost/imgserve-base:bookworm}
ENGINE=${ENGINE:-podman}
PUBLIC_MIRROR=http://deb.debian.org/debian

host_mirror() {
  # deb822 sources first (Debian 12's default), then the one-line format.
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -vE 'security|updates' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -vE 'security|updates' | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
  echo "${uri:-$PUBLIC_MIRROR}"
}

command -v debootstrap >/dev/null || { echo "[base] debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
mirror=$(host_mirror)
root=$(mktemp -d /var/tmp/imgserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "[base] debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
echo "deb $PUBLIC_MIRROR bookworm main" > "$root/etc/apt/sources.list"
# debootstrap copies this host's resolver and name; engines provide both at run time.
: > "$root/etc/resolv.conf"
echo localhost > "$root/etc/hostname"
# Documentation, man pages, translations and apt's package lists are not needed to run a server.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
       "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*
tar -C "$root" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/usr/bin/python3"]' - "$IMAGE" >/dev/null
echo "[base] $IMAGE: $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
