#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image and tag it with the
# base's exact name, for machines whose Docker engine cannot reach an image
# registry (CI here). Usage: standin-base.sh python:3.11-slim-bookworm
#
# Debian bookworm (minbase) + python3, python3-venv and python3-pip: bookworm's
# python3 is 3.11, like the official image, and the Dockerfile needs no more
# than a `python` with venv. /usr/local/bin/python is linked because that is
# where the official image keeps it, and the host's CA bundle is copied in
# because Debian's pip verifies TLS against it (without it pip inside a build
# cannot reach the package index on machines behind an intercepting proxy).
set -euo pipefail

tag=${1:?usage: standin-base.sh IMAGE:TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/tokenstep-standin.XXXXXX)
trap 'rm -rf --one-file-system "$rootfs"' EXIT

debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 30 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip >/dev/null
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
mkdir -p "$rootfs/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
: >"$rootfs/etc/resolv.conf"

tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
echo "stand-in base image $tag built from debian bookworm minbase"
