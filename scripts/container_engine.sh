#!/usr/bin/env bash
# Print the name of a container engine that works on this host (docker, then podman), or nothing.
# "Works" means its daemon or runtime answers `info`: a docker CLI without a running daemon is
# common (CI images, desktops with Docker stopped) and must not count as an engine.
for engine in docker podman; do
  if command -v "$engine" >/dev/null 2>&1 && timeout 60 "$engine" info >/dev/null 2>&1; then
    echo "$engine"
    exit 0
  fi
done
