#!/usr/bin/env bash
# vegeta, the Go load generator behind `loadtests.openloop --engine vegeta`, into build/bin/
# (git-ignored), from its Go module with the machine's Go: `make vegeta` or scripts/get_vegeta.sh.
#
# Pinned: v12.11.1 is the newest release whose go.mod asks for a Go that Debian 12's Go (1.19) can
# build (1.20 without 1.20-only features; v12.11.3 and later ask for 1.22). VEGETA_VERSION=... picks another.
# Needs the Go module proxy; offline it stops with a message and nothing else needs it: tests
# that use vegeta are skipped without it, and the python engine is the default.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${VEGETA_VERSION:-v12.11.1}
MODULE=github.com/tsenart/vegeta/v12
BIN=$PWD/build/bin

command -v go >/dev/null || { echo "get_vegeta: no go command (Debian: apt-get install golang-go)" >&2; exit 1; }
if ! err=$(timeout 120 go list -m "$MODULE@$VERSION" 2>&1); then
  echo "get_vegeta: cannot reach the Go module proxy ($(go env GOPROXY)) for $MODULE@$VERSION, so vegeta" >&2
  echo "cannot be installed here (offline?). loadtests.openloop's default engine (python) needs nothing more." >&2
  echo "go said: $err" >&2
  exit 2
fi
mkdir -p "$BIN"
GOBIN=$BIN timeout 600 go install -ldflags "-X main.Version=$VERSION" "$MODULE@$VERSION"
"$BIN/vegeta" -version
