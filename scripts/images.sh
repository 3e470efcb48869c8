#!/usr/bin/env bash
# Build kubetune's container images from parts the project makes itself (no registry needed):
#
#   kubetune/base:bookworm        a Debian bookworm root filesystem made with `debootstrap
#                                 --variant=minbase`, `docker import`ed (skipped when present):
#                                 scripts/restricted/debian-base.sh
#   kubetune/trainer:<version>    trainer_image/Dockerfile: train + serve, torch and the lock
#   kubetune/operator:<version>   operator/Dockerfile: the operator, [operator] extra only
#
# Python packages come from a wheelhouse prepared on this machine ($cache/images/wheels, every pin
# of requirements/lock.txt plus a deepspeed wheel built here), never from inside a build: each
# image's build context (.cache/images/context/<image>) gets hard links to just the wheels it
# needs and the Dockerfile installs them with `pip install --no-index`. On a normal machine the
# same Dockerfiles build from the repository root against public images and PyPI:
#   docker build -f trainer_image/Dockerfile -t kubetune/trainer:dev .
#
# Usage: bash scripts/images.sh [base|wheels|trainer|operator|all]...   (default: all)
# Environment: KUBETUNE_CACHE (default ~/.cache/kubetune),
#              KUBETUNE_BASE_IMAGE (default kubetune/base:bookworm: the image both builds start FROM;
#              a machine that can pull images may use debian:bookworm-slim),
#              DEBIAN_MIRROR (default: the Debian archive of this machine's own apt sources)
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"
cache=$kubetune_cache/images
base_image=${KUBETUNE_BASE_IMAGE:-kubetune/base:bookworm}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
[ -n "$version" ] || die "no version in pyproject.toml"
wheels=$cache/wheels
ctx_root=$repo/.cache/images/context
timings=$repo/.cache/images/timings.txt

# --- the engine ---------------------------------------------------------------------------------
engine() { bash "$repo/scripts/docker-engine.sh"; }

# --- kubetune/base:bookworm ---------------------------------------------------------------------
build_base() {
    if have_image "$base_image"; then
        say "$base_image present ($(docker image inspect -f '{{.Size}}' "$base_image" | numfmt --to=iec)); not rebuilt"
        return 0
    fi
    [ "$base_image" = kubetune/base:bookworm ] \
        || die "KUBETUNE_BASE_IMAGE=$base_image is not present and only kubetune/base:bookworm can be made here"
    bash "$restricted/debian-base.sh" "$base_image"
}

# --- the wheelhouse -----------------------------------------------------------------------------
host_pip() { # the project's environment: Python 3.11 (what the lock resolves for) with torch, for deepspeed
    if [ ! -x "$repo/.venv/bin/python" ]; then bash "$repo/scripts/setup-venv.sh" >&2; fi  # stdout is the answer
    local v
    v=$("$repo/.venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$v" = 3.11 ] || die ".venv is Python $v; the images run Debian bookworm's Python 3.11, which the lock is for"
    echo "$repo/.venv/bin/pip"
}

build_wheels() {
    local key stamp pip t0
    key=$(cat requirements/lock.txt requirements/deepspeed.txt | sha256sum | cut -c1-16)
    stamp=$wheels/.complete-$key
    if [ -f "$stamp" ]; then
        say "wheelhouse $wheels complete for this lock ($(du -sh "$wheels" | cut -f1))"
        return 0
    fi
    pip=$(host_pip)
    t0=$(date +%s)
    mkdir -p "$wheels"
    say "wheelhouse: pip download of every pin in requirements/lock.txt into $wheels (pip's cache is reused)"
    # Files already in the folder are not downloaded again. A pin published only as an sdist (a few
    # pure-Python packages lm-eval needs: rouge-score, sqlitedict, word2number) is downloaded as
    # one, hash-checked like the rest, and built into a wheel here, so the images install wheels only.
    "$pip" download -q --no-deps --prefer-binary --find-links "$wheels" -r requirements/lock.txt -d "$wheels"
    local sdist
    for sdist in "$wheels"/*.tar.gz "$wheels"/*.zip; do
        [ -e "$sdist" ] || continue
        say "wheelhouse: building a wheel of $(basename "$sdist") (no wheel published)"
        "$pip" wheel -q --no-deps -w "$wheels" "$sdist" || die "building a wheel of $(basename "$sdist") failed"
        rm -f "$sdist"
    done
    # deepspeed is an sdist whose setup.py imports torch: built once here (DS_BUILD_OPS=0: ops are
    # JIT-built at run time), so the images need no compiler.
    if ! ls "$wheels"/deepspeed-"$(deepspeed_version)"-*.whl >/dev/null 2>&1; then
        say "wheelhouse: building the deepspeed wheel"
        DS_BUILD_OPS=0 "$pip" wheel -q --no-deps --no-build-isolation -r requirements/deepspeed.txt -w "$wheels"
    fi
    touch "$stamp"
    record "wheels: wheelhouse ready in $(elapsed "$t0") s ($(du -sh "$wheels" | cut -f1))"
}

deepspeed_version() { sed -n 's/^deepspeed==\([^ ]*\).*/\1/p' "$repo/requirements/deepspeed.txt"; }

# --- build contexts -----------------------------------------------------------------------------
# stage_context IMAGE EXTRAS: .cache/images/context/IMAGE = the project's sources + wheels/ with
# hard links to exactly the wheels `pip install kubetune[EXTRAS]` needs under the lock.
stage_context() {
    local name=$1 extras=$2 ctx=$ctx_root/$1 pip report reqs
    pip=$(host_pip)
    rm -rf "$ctx"
    mkdir -p "$ctx/wheels"
    tar -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
        pyproject.toml requirements core operator trainer_image kernels scripts/image-entrypoint.sh \
        | tar -x -C "$ctx"
    # The package's readme, for its metadata only: a fixed text, so that editing the README does not
    # rebuild (and re-load into kind) a 6 GB image.
    printf '# kubetune\n\nA Kubernetes-native fine-tuning operator. See the project README.\n' >"$ctx/README.md"
    reqs=$ctx/.requirements.txt
    report=$ctx/.resolution.json
    # The project's requirements for these extras (what the Dockerfile installs), plus setuptools
    # to build the project itself.
    "$repo/.venv/bin/python" - "$extras" >"$reqs" <<'PY'
import sys, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(meta["dependencies"])
for extra in sys.argv[1].split(","):
    reqs += meta["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs + ["setuptools"])))
PY
    "$pip" install -q --dry-run --ignore-installed --no-index --find-links "$wheels" --only-binary=:all: \
        -c <(sed -e '/--hash=/d' -e 's/ *\\$//' requirements/lock.txt) -c <(echo "deepspeed==$(deepspeed_version)") \
        -r "$reqs" --report "$report" \
        || die "the wheelhouse $wheels cannot satisfy kubetune[$extras] under the lock"
    "$repo/.venv/bin/python" - "$report" "$ctx/wheels" <<'PY'
import json, os, shutil, sys
from urllib.parse import unquote, urlparse
report, dest = sys.argv[1], sys.argv[2]
for item in json.load(open(report))["install"]:
    src = unquote(urlparse(item["download_info"]["url"]).path)
    target = os.path.join(dest, os.path.basename(src))
    try:
        os.link(src, target)
    except OSError:  # another file system: copy
        shutil.copy2(src, target)
PY
    say "context $ctx: $(find "$ctx/wheels" -name '*.whl' | wc -l) wheels, $(du -shL "$ctx" | cut -f1)"
}

build_image() { # build_image NAME DOCKERFILE EXTRAS CHART_NAME...
    local name=$1 dockerfile=$2 extras=$3 tag=kubetune/$1:$version t0
    shift 3
    stage_context "$name" "$extras"
    # Up to date: the image carries the hash of everything its build reads.
    local hash
    hash=$( (cat "$dockerfile"; docker image inspect -f '{{.Id}}' "$base_image"
             cd "$ctx_root/$name" && find . -path ./wheels -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
             ls wheels) | sha256sum | cut -c1-32)
    if [ "$(docker image inspect -f '{{index .Config.Labels "io.kubetune.build-inputs"}}' "$tag" 2>/dev/null)" = "$hash" ]; then
        say "$tag is up to date (same Dockerfile, base image, sources and wheels); not rebuilt"
        chart_names "$name" "$@"
        return 0
    fi
    local previous
    previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    # Every multi-stage build leaves its build stage behind untagged (~10 GB for the trainer), and a
    # failed build its last layers: dangling images are never a cache worth keeping here, since an
    # image whose inputs did not change is not rebuilt at all (above).
    docker image prune -f >/dev/null 2>&1 || true
    t0=$(date +%s)
    say "docker build $tag ($dockerfile, FROM $base_image; log: .cache/images/$name-build.log)"
    # The classic builder (BuildKit would need the buildx plugin, which Debian bookworm lacks);
    # DOCKER_BUILDKIT=0 keeps newer clients from insisting on it.
    if ! DOCKER_BUILDKIT=0 docker build --force-rm -f "$dockerfile" --build-arg "BASE_IMAGE=$base_image" -t "$tag" \
            --label "io.kubetune.build-inputs=$hash" \
            "$ctx_root/$name" >"$repo/.cache/images/$name-build.log" 2>&1; then
        tail -30 "$repo/.cache/images/$name-build.log" >&2
        die "docker build $tag failed (log: .cache/images/$name-build.log)"
    fi
    # The image this one replaces would stay behind untagged (GBs for the trainer).
    chart_names "$name" "$@"   # before removing the previous image, which they named too
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
    docker image prune -f >/dev/null 2>&1 || true
    record "$name: $tag built in $(elapsed "$t0") s, $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(all)
for t in "${targets[@]}"; do
    case "$t" in
        base | wheels | trainer | operator | all) ;;
        *) die "unknown target '$t' (base, wheels, trainer, operator, all)" ;;
    esac
done
want() { local t; for t in "${targets[@]}"; do [ "$t" = "$1" ] || [ "$t" = all ] && return 0; done; return 1; }

t_all=$(date +%s)
if want base || want trainer || want operator; then engine; build_base; fi
if want wheels || want trainer || want operator; then build_wheels; fi
# The names the Helm chart and the operator's configuration use by default (ghcr.io/kubetune/...),
# so a cluster that is given these images (e.g. `kind load docker-image`) needs no overrides. The
# trainer image is also the builtin serving image.
chart_names() { # chart_names IMAGE NAME...
    local image=$1 name; shift
    for name in "$@"; do docker tag "kubetune/$image:$version" "ghcr.io/kubetune/$name:$version"; done
}
if want operator; then build_image operator operator/Dockerfile operator operator; fi
if want trainer; then build_image trainer trainer_image/Dockerfile trainer,serve trainer serve; fi
say "done in $(elapsed "$t_all") s"
docker images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' 'kubetune/*' 2>/dev/null || true
