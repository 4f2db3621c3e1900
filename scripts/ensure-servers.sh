#!/usr/bin/env bash
# Make sure etcd (>= 3.4) and nats-server (>= 2.9, JetStream) are installed.
# As root on Debian/Ubuntu this installs the distribution packages; otherwise
# it says exactly what to install. The tests start their own servers on free
# loopback ports; nothing is started here.
set -euo pipefail

find_bin() {
  command -v "$1" 2>/dev/null && return 0
  for d in /usr/sbin /usr/local/sbin /usr/local/bin; do
    [ -x "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  return 1
}

missing=()
find_bin etcd >/dev/null || missing+=(etcd-server)
find_bin nats-server >/dev/null || missing+=(nats-server)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]} (Debian packages)..."
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not start system services: the tests run their own.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
    trap '[ $made_policy = 1 ] && rm -f "$policy"' EXIT
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null
    }
  else
    echo "Missing: ${missing[*]}."
    echo "Install them, then run make again:"
    echo "  sudo apt-get install -y etcd-server nats-server"
    echo "(or put etcd >= 3.4 and nats-server >= 2.9 on PATH from their release archives)."
    exit 1
  fi
fi

etcd_bin=$(find_bin etcd); nats_bin=$(find_bin nats-server)
echo "etcd:        $etcd_bin ($("$etcd_bin" --version | head -n1))"
echo "nats-server: $nats_bin ($("$nats_bin" --version))"
