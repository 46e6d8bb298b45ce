#!/bin/sh
# Build portside-example/hello:latest with the host's static busybox (Debian: busybox-static).
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp -r "$(dirname "$0")"/Dockerfile "$(dirname "$0")"/www "$dir"/
cp "$(command -v busybox)" "$dir"/busybox
docker build -q -t portside-example/hello:latest "$dir"
