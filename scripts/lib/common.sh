# shellcheck shell=bash disable=SC2034  # a library: the variables it sets are for its callers
# The one shell library of scripts/ and scripts/restricted/: source it, it defines functions and
# a few variables and runs nothing.
#   source "$(dirname "$0")/lib/common.sh"           (from scripts/)
#   source "$(dirname "$0")/../lib/common.sh"        (from scripts/restricted/)
#
# Variables: $repo (the clone), $script_name (the prefix of messages), $kubetune_cache
# (${KUBETUNE_CACHE:-~/.cache/kubetune}: what clones share), $restricted (scripts/restricted).
#
# Messages   say, warn, die, record (say + a line in $timings when set), elapsed T0
# Tools      tool_version KEY (requirements/tools.env), ensure_uv
# Docker     have_image TAG, stop_pidfile FILE
# apt        apt_install PKG..., apt_sources, debian_mirror SUITE
# Build      run_step NAME CMD... (logs in $step_logs), stamped/stamp DIR NAME VALUE
# Go         ensure_go, check_module MOD@VER, go_build_kubernetes, go_build_etcd
# Kubernetes k8s_versions (scripts/k8s-versions.env; sets $k8s_bin)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
script_name=${script_name:-$(basename "$0" .sh)}
kubetune_cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
restricted=$repo/scripts/restricted

# --- messages -----------------------------------------------------------------------------------
say() { echo "$script_name: $*"; }
warn() { echo "$script_name: WARNING: $*" >&2; }
die() { echo "$script_name: ERROR: $*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }
record() { # say, and append a dated line to $timings when the script set it
    if [ -n "${timings:-}" ]; then
        mkdir -p "$(dirname "$timings")"
        echo "$(date -u +%FT%TZ) $*" >>"$timings"
    fi
    say "$*"
}

# --- tools --------------------------------------------------------------------------------------
tool_version() { sed -n "s/^$1=//p" "$repo/requirements/tools.env"; }

# uv, installed once per version under the kubetune cache (pip from the machine's own index
# configuration; nothing is downloaded by hand). Prints the path of the uv binary.
ensure_uv() {
    local version dir
    version=$(tool_version UV_VERSION)
    dir=$kubetune_cache/tools/uv-$version
    if [ ! -x "$dir/bin/uv" ]; then
        say "installing uv $version into $dir" >&2
        rm -rf "$dir.tmp"
        python3 -m pip install -q --disable-pip-version-check --target "$dir.tmp" "uv==$version" >&2 \
            || die "could not install uv $version with pip"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    echo "$dir/bin/uv"
}

# --- Docker -------------------------------------------------------------------------------------
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

stop_pidfile() { # stop_pidfile FILE: SIGTERM the process whose pid FILE holds, wait up to 20 s
    local pid
    [ -f "$1" ] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null || return 1
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    die "process $pid (from $1) did not stop within 20 s"
}

# --- apt: the machine's own configuration, never a host name written here -----------------------
apt_install() { # apt_install PKG...: from the machine's apt sources (apt-get update first if needed)
    local log=$repo/.cache/apt-install.log
    mkdir -p "$repo/.cache"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "$@" >"$log" 2>&1 && return 0
    apt-get update >>"$log" 2>&1 || true
    apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1 && return 0
    tail -20 "$log" >&2
    die "apt-get install $* failed (log: $log)"
}

# apt_sources: "URI SUITE" for every enabled binary (`deb`) source of this machine's apt, in
# apt's order: $APT_ETC/sources.list and sources.list.d/*.list (one-line format, `[options]`
# allowed), then sources.list.d/*.sources (deb822 stanzas: Types/URIs/Suites/Enabled, comments
# and continuation lines). APT_ETC defaults to /etc/apt.
apt_sources() {
    local etc=${APT_ETC:-/etc/apt} f
    for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '{ sub(/#.*/, "") }
             $1 == "deb" {
                 line = $0
                 sub(/^[ \t]*deb[ \t]+/, "", line)
                 if (substr(line, 1, 1) == "[") sub(/^\[[^]]*\][ \t]*/, "", line)
                 n = split(line, w, /[ \t]+/)
                 if (n >= 2) print w[1], w[2]
             }' "$f"
    done
    for f in "$etc"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'function flush(   i, j, n, m, u, s) {
                 if ((" " types " ") ~ / deb / && tolower(enabled) != "no") {
                     n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
                     for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) if (u[i] != "" && s[j] != "") print u[i], s[j]
                 }
                 types = uris = suites = enabled = field = ""
             }
             /^#/ { next }
             /^[ \t]*$/ { flush(); next }
             /^[ \t]/ { v = $0; gsub(/^[ \t]+|[ \t]+$/, "", v)
                        if (field == "uris") uris = uris " " v; else if (field == "suites") suites = suites " " v
                        else if (field == "types") types = types " " v
                        next }
             { i = index($0, ":"); if (i == 0) next
               field = tolower(substr($0, 1, i - 1)); v = substr($0, i + 1); gsub(/^[ \t]+|[ \t]+$/, "", v)
               if (field == "types") types = v; else if (field == "uris") uris = v
               else if (field == "suites") suites = v; else if (field == "enabled") enabled = v }
             END { flush() }' "$f"
    done
}

# debian_mirror SUITE: the Debian archive this machine's apt already uses for SUITE (bookworm,
# bookworm-security, ...), without a trailing slash; else the root of a Debian archive it uses for
# another release (a URI ending in /debian, or /debian-security for a *-security SUITE: an
# archive serves every release). Only URIs debootstrap can read (http, https, ftp, file). Prints
# nothing when there is none (an Ubuntu machine, say): callers take an override variable then.
debian_mirror() {
    local suite=$1 root=debian uri
    case "$suite" in *-security) root=debian-security ;; esac
    uri=$(apt_sources | awk -v s="$suite" -v r="$root" '
        $1 !~ /^(https?|ftp|file):/ { next }
        { u = $1; sub(/\/+$/, "", u) }
        $2 == s { print u; found = 1; exit }
        !fallback && u ~ ("/" r "$") { fallback = u }
        END { if (!found && fallback) print fallback }')
    echo "$uri"
}

# --- build steps --------------------------------------------------------------------------------
# run_step NAME COMMAND...: COMMAND (niced) with its output in $step_logs/NAME.log; says when it
# starts and records how long it took; on failure shows the log's end, names the Go modules the
# proxy refused (if that is why) and exits 1.
run_step() {
    local name=$1 t0 rc=0 log refused line
    shift
    log=${step_logs:?run_step needs \$step_logs}/$name.log
    mkdir -p "$step_logs"
    t0=$(date +%s)
    say "[$name] started $(date +%T) (log: $log)"
    nice -n 10 "$@" >"$log" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then
        refused=$(grep -oE '[a-zA-Z0-9._~/-]+@v[0-9][^: ]*: .*(reading https?://|verifying|invalid version|unknown revision|not found|module lookup disabled|40[34] |410 Gone).*' \
                  "$log" | sort -u || true)
        if [ -n "$refused" ]; then
            echo "$script_name: module(s) the Go module proxy refused:" >&2
            while IFS= read -r line; do echo "  $line"; done <<<"$refused" >&2
        fi
        tail -n 30 "$log" >&2
        die "[$name] failed (exit $rc) after $(elapsed "$t0") s"
    fi
    record "[$name] done in $(elapsed "$t0") s"
}

# Binaries built at a pinned version carry a stamp DIR/.stamp/NAME holding that version.
stamped() { [ -x "$1/$2" ] && [ -f "$1/.stamp/$2" ] && [ "$(<"$1/.stamp/$2")" = "$3" ]; }
stamp() { mkdir -p "$1/.stamp" && printf '%s' "$3" >"$1/.stamp/$2"; }

# --- Go -----------------------------------------------------------------------------------------
# ensure_go: Go (>= 1.24) on PATH (also found in /usr/local/go/bin), static builds without VCS
# stamping; sets $go_jobs (KUBETUNE_BUILD_JOBS, default: the number of CPUs). Modules come from
# the Go module proxy of the machine's own Go configuration (GOPROXY).
ensure_go() {
    if ! command -v go >/dev/null 2>&1; then
        [ -x /usr/local/go/bin/go ] || die "'go' not found (need Go >= 1.24 on PATH)"
        export PATH="/usr/local/go/bin:$PATH"
    fi
    export CGO_ENABLED=0
    case " ${GOFLAGS:-} " in *" -buildvcs=false "*) ;; *) export GOFLAGS="${GOFLAGS:-} -buildvcs=false" ;; esac
    go_jobs=${KUBETUNE_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
}

check_module() { # check_module MODULE@VERSION: exit 1 naming it if the Go module proxy refuses it
    local out
    if ! out=$(go mod download -json "$1" 2>&1); then
        echo "$script_name: the Go module proxy refused $1:" >&2
        echo "$out" | grep -E '"Error"|proxy|410|404|not found|unknown revision' >&2 || echo "$out" >&2
        exit 1
    fi
}

# go_build_kubernetes STEP WORKDIR OUTDIR CMD...: k8s.io/kubernetes/cmd/CMD... at $K8S_VERSION into
# OUTDIR, in one `go build`. k8s.io/kubernetes replaces its k8s.io/* staging modules with ./staging
# paths, so it cannot be `go install`ed: WORKDIR gets a wrapper module requiring it, with every
# such replace pointing at the published module at $K8S_STAGING_VERSION instead.
go_build_kubernetes() {
    local step=$1 w=$2 out=$3 kmod staging m minor p ld="-s -w" cmds=()
    shift 3
    check_module "k8s.io/kubernetes@$K8S_VERSION"
    kmod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$kmod")
    [ -n "$staging" ] || die "found no ./staging replace directives in $kmod"
    mkdir -p "$w"
    {
        printf 'module kubetune.local/kubernetes-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
        for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$K8S_STAGING_VERSION"; done
        printf ')\n'
    } >"$w/go.mod"
    minor=${K8S_VERSION#v1.}
    minor=${minor%%.*}
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    done
    for m in "$@"; do cmds+=("k8s.io/kubernetes/cmd/$m"); done
    run_step "$step" bash -c "cd '$w' && go build -mod=mod -p $go_jobs -trimpath -o '$out/' -ldflags '$ld' ${cmds[*]}"
}

# go_build_etcd STEP WORKDIR VERSION OUTFILE: the etcd server at VERSION. etcd's go.mod replaces
# its sibling modules with ../ paths, so it cannot be `go install`ed either: WORKDIR gets a wrapper
# module with scripts/lib/etcd/main.go (etcd's own main) that requires the server, the siblings
# at the versions the server requires (go mod tidy).
go_build_etcd() {
    local step=$1 w=$2 version=$3 out=$4
    check_module "go.etcd.io/etcd/server/v3@$version"
    mkdir -p "$w"
    cp "$repo/scripts/lib/etcd/main.go" "$w/main.go"
    printf 'module kubetune.local/etcd-build\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$version" >"$w/go.mod"
    run_step "$step" bash -c "cd '$w' && go mod tidy && go build -mod=mod -p $go_jobs -trimpath -o '$out' \
        -ldflags '-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$version' ."
}

# --- Kubernetes ---------------------------------------------------------------------------------
# k8s_versions: the pinned versions (scripts/k8s-versions.env) and $k8s_bin, where
# scripts/k8s-build.sh puts the control plane's binaries.
k8s_versions() {
    # shellcheck source=../k8s-versions.env
    . "$repo/scripts/k8s-versions.env"
    k8s_bin=${KUBETUNE_K8S_BIN:-$kubetune_cache/k8s/$K8S_VERSION/bin}
}
