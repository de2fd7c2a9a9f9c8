#!/bin/sh
# Installs the Debian packages moeserve needs to build, test and benchmark, when
# they are missing. Run as root on Debian 12 (CI, containers); elsewhere it only
# says what is missing.
set -e
PKGS="build-essential pkg-config libopenblas-dev libjansson-dev libuv1-dev libmicrohttpd-dev \
check python3 python3-numpy curl prometheus"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "moeserve: missing Debian packages:$missing (run 'sudo sh deploy/debian-deps.sh')" >&2
    exit 1
fi
echo "moeserve: installing$missing"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
