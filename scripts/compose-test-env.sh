#!/usr/bin/env bash
# Prepares this machine for `make test-compose` (tests/compose): Debian's Docker engine and
# docker-compose, a running dockerd, and the third-party images docker/compose.yaml names.
#
# Where no image registry is reachable, the images are test-only stand-ins built from Debian
# packages on a Debian base made with debootstrap (cached in build/compose/), tagged with the
# official names; an image already present (pulled for real, or built on an earlier run) is kept.
# Debian's own docker CLI (/usr/bin/docker) is used: another one on the PATH may lack BuildKit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/build/compose"
STANDINS="$ROOT/tests/compose/standins"
DOCKER=/usr/bin/docker
BASE_TAG=commutator-test/debian:bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$CACHE"

step() { printf '[compose-env %(%H:%M:%S)T] %s\n' -1 "$*"; }

missing=()
[[ -x $DOCKER ]] || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "make test-compose needs ${missing[*]}: run as root, or apt-get install them" >&2
    exit 1
  fi
  step "apt-get install ${missing[*]}"
  # Package scripts must not start services (dockerd is started below, the way this script wants it).
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >"$CACHE/apt.log" 2>&1 ||
    { apt-get update >>"$CACHE/apt.log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >>"$CACHE/apt.log" 2>&1; } ||
    { echo "apt-get install ${missing[*]} failed: see $CACHE/apt.log" >&2; exit 1; }
fi

if ! $DOCKER info >/dev/null 2>&1; then
  step "starting dockerd (log: $CACHE/dockerd.log)"
  # It stays up after the tests (reruns reuse it and the images); stop it with: kill "$(cat /var/run/docker.pid)".
  setsid nohup dockerd </dev/null >"$CACHE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; sleep 1; done
  $DOCKER info >/dev/null 2>&1 || { echo "dockerd did not start: see $CACHE/dockerd.log" >&2; exit 1; }
fi

have() { $DOCKER image inspect "$1" >/dev/null 2>&1; }

base_needed=0
for tag in python:3.11-slim-bookworm quay.io/coreos/etcd:v3.5.17 nats:2.10-alpine nginx:1.27-alpine; do
  have "$tag" || base_needed=1
done
if ((base_needed)) && ! have "$BASE_TAG"; then
  if [[ ! -s $CACHE/bookworm-minbase.tar ]]; then
    step "debootstrap --variant=minbase bookworm (cached in $CACHE/bookworm-minbase.tar)"
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
      { echo "debootstrap failed: see $CACHE/debootstrap.log" >&2; exit 1; }
    tar -C "$CACHE/rootfs" -cf "$CACHE/bookworm-minbase.tar.part" . && mv "$CACHE/bookworm-minbase.tar.part" "$CACHE/bookworm-minbase.tar"
    rm -rf "$CACHE/rootfs"
  fi
  step "docker import $BASE_TAG"
  $DOCKER import "$CACHE/bookworm-minbase.tar" "$BASE_TAG" >/dev/null
fi

standin() {  # TAG DOCKERFILE [with the CA bundle]
  local tag=$1 file=$2 ctx
  have "$tag" && return 0
  step "building the test-only stand-in $tag"
  ctx=$(mktemp -d)
  cp "$STANDINS/$file" "$ctx/Dockerfile"
  if [[ ${3:-} == ca ]]; then cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/ca-bundle.crt"; fi
  DOCKER_BUILDKIT=1 $DOCKER build -q -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
}
standin python:3.11-slim-bookworm python.Dockerfile ca
standin quay.io/coreos/etcd:v3.5.17 etcd.Dockerfile
standin nats:2.10-alpine nats.Dockerfile
standin nginx:1.27-alpine nginx.Dockerfile
step "images ready"
