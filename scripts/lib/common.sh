# Shared by the scripts in scripts/ (source it; it sets nothing but functions and $repo).
#   say/die: one prefixed line on stdout/stderr (die exits 1); the prefix is $script_name.
#   have_image TAG: whether the Docker engine has that image.
#   elapsed T0: seconds since T0 (from `date +%s`).
#   tool_version KEY: a version from requirements/tools.env.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
script_name=${script_name:-$(basename "$0" .sh)}

say() { echo "$script_name: $*"; }
warn() { echo "$script_name: WARNING: $*" >&2; }
die() { echo "$script_name: ERROR: $*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
tool_version() { sed -n "s/^$1=//p" "$repo/requirements/tools.env"; }

# uv, installed once per version under the kubetune cache (pip from the machine's own index
# configuration; nothing is downloaded by hand). Prints the path of the uv binary.
kubetune_cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
ensure_uv() {
    local version dir
    version=$(tool_version UV_VERSION)
    dir=$kubetune_cache/tools/uv-$version
    if [ ! -x "$dir/bin/uv" ]; then
        say "installing uv $version into $dir" >&2
        python3 -m pip install -q --disable-pip-version-check --target "$dir.tmp" "uv==$version" >&2 \
            || die "could not install uv $version with pip"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    echo "$dir/bin/uv"
}
