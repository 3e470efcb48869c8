#!/usr/bin/env bash
# kubetune/base:bookworm without a registry: a Debian bookworm root filesystem made with
# `debootstrap --variant=minbase` from the Debian archive this machine's apt already uses (read
# from /etc/apt/sources.list{,.d}; DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR override it), slimmed
# as the official slim images are, and `docker import`ed. A machine that can pull images uses
# debian:bookworm-slim instead (KUBETUNE_BASE_IMAGE=debian:bookworm-slim scripts/images.sh).
#
# Usage: bash scripts/restricted/debian-base.sh [TAG]   (default kubetune/base:bookworm; root)
# Called by scripts/images.sh when the base image is missing. The root filesystem is kept under
# ${KUBETUNE_CACHE:-~/.cache/kubetune}/images/rootfs, so a second import needs no debootstrap.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
tag=${1:-kubetune/base:bookworm}
cache=$kubetune_cache/images
timings=$repo/.cache/images/timings.txt
rootfs=$cache/rootfs/bookworm-minbase

[ "$(id -u)" = 0 ] || die "debootstrap needs root to make $tag"

t0=$(date +%s)
if [ ! -f "$rootfs.complete" ]; then
    mirror=${DEBIAN_MIRROR:-$(debian_mirror bookworm)}
    [ -n "$mirror" ] || die "this machine's apt sources name no Debian archive (see apt_sources in scripts/lib/common.sh); set DEBIAN_MIRROR to one"
    security=${DEBIAN_SECURITY_MIRROR:-$(debian_mirror bookworm-security)}
    command -v debootstrap >/dev/null 2>&1 || { say "installing debootstrap (apt-get)"; apt_install debootstrap; }
    say "debootstrap --variant=minbase bookworm $rootfs ($mirror; a few minutes, log: $cache/debootstrap.log)"
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1; then
        tail -20 "$cache/debootstrap.log" >&2
        die "debootstrap failed (log: $cache/debootstrap.log)"
    fi
    # What the official slim images do: no docs/man/locales from later apt installs, no
    # recommends, no package cache kept.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/kubetune-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
    cat >"$rootfs/etc/apt/apt.conf.d/kubetune-slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
    # The image's own apt (later `apt-get install`s in Dockerfiles) uses the same archives.
    {
        echo "deb $mirror bookworm main"
        echo "deb $mirror bookworm-updates main"
        if [ -n "$security" ]; then
            echo "deb $security bookworm-security main"
        else
            warn "no Debian security archive in this machine's apt sources (DEBIAN_SECURITY_MIRROR): the image's sources.list has none"
        fi
    } >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
    echo "$mirror" >"$rootfs.complete"
    record "base: debootstrap in $(elapsed "$t0") s"
fi
mirror=$(cat "$rootfs.complete")
t0=$(date +%s)
say "docker import $rootfs as $tag"
tar --numeric-owner --xattrs -C "$rootfs" -c . \
    | docker import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase bookworm${mirror:+ ($mirror)}" - "$tag" >/dev/null
record "base: $tag imported in $(elapsed "$t0") s, $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)"
