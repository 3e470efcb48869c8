#!/usr/bin/env bash
# Make a Docker engine available, idempotently.
#
#   - `docker info` already answers (a system engine, Docker Desktop, DOCKER_HOST): nothing to do.
#   - otherwise, as root: install Debian's engine (`apt-get install docker.io`) when `dockerd` is
#     missing (a `docker` binary alone may be only the client), start `dockerd` in the background
#     (storage driver overlay2; log and pid file under this clone's ignored .cache/docker/) and wait
#     until `docker info` answers.
#
# Machines without systemd (containers, CI sandboxes) are the case this is for: dockerd is started
# directly, not through a service manager. The engine keeps running after the script exits; stop
# it with `bash scripts/docker-engine.sh --stop` (only an engine this script started).
#
# Where this host's capability bounding set is reduced (a sandbox without CAP_SYS_RESOURCE), runc
# cannot start `--privileged` containers, which kind needs for its nodes. That is detected (CapBnd in
# /proc/self/status against /proc/sys/kernel/cap_last_cap), and the engine this script starts then runs
# every container through scripts/restricted/kind-runc.sh (installed to ~/.cache/kubetune/tools so an
# engine never points into a clone that may be deleted). An engine of ours that answers without that
# runtime where it is needed is restarted with it; someone else's is left alone, with a warning.
#
# Environment: KUBETUNE_DOCKERD_ARGS  extra dockerd flags (e.g. "--iptables=false --bridge=none")
#              KUBETUNE_DOCKER_WAIT   seconds to wait for the engine (default 60)
set -euo pipefail

source "$(dirname "$0")/lib/common.sh"
state=$repo/.cache/docker
log=$state/dockerd.log
pidfile=$state/dockerd.pid
wait_s=${KUBETUNE_DOCKER_WAIT:-60}

engine_up() { docker info >/dev/null 2>&1; }
caps_reduced() { # this host's capability bounding set lacks capabilities the kernel has
    local bnd last
    bnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status 2>/dev/null) || return 1
    last=$(cat /proc/sys/kernel/cap_last_cap 2>/dev/null) || return 1
    [ -n "$bnd" ] && [ -n "$last" ] && [ $(( 0x$bnd )) -ne $(( (1 << (last + 1)) - 1 )) ]
}
wrapper=$kubetune_cache/tools/kind-runc.sh
wrapper_args=()
if caps_reduced; then
    wrapper_args=(--add-runtime "kt-runc=$wrapper" --default-runtime kt-runc)
fi
ours() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
lacks_wrapper() { # the engine answers, the host needs the wrapper, and the engine's default runtime is another
    [ ${#wrapper_args[@]} -gt 0 ] && [ "$(docker info --format '{{.DefaultRuntime}}' 2>/dev/null)" != kt-runc ]
}
ours_without_bridge() { # the dockerd this script started, with its default bridge's interface missing
    local bridge
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && command -v ip >/dev/null 2>&1 || return 1
    bridge=$(docker network inspect bridge -f '{{index .Options "com.docker.network.bridge.name"}}' 2>/dev/null) || return 1
    [ -n "$bridge" ] && ! ip link show "$bridge" >/dev/null 2>&1
}

if [ "${1:-}" = "--stop" ]; then
    if stop_pidfile "$pidfile"; then
        say "stopped dockerd (pid $(cat "$pidfile"))"
    else
        say "no dockerd started by this script is running"
    fi
    exit 0
fi

if ! command -v docker >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
    : # nothing installed yet: handled below (docker.io brings the client too)
elif engine_up && ours_without_bridge; then
    # Another dockerd on this host (the probe engine of scripts/restricted/ has done it) can take the
    # default bridge away; containers would then fail with "could not find bridge docker0".
    warn "the engine's default bridge is gone; restarting the dockerd this script started"
    stop_pidfile "$pidfile" || true
elif engine_up && lacks_wrapper && ours; then
    warn "this host's capability bounding set is reduced and the engine runs plain runc; restarting the dockerd this script started with scripts/restricted/kind-runc.sh"
    stop_pidfile "$pidfile" || true
elif engine_up; then
    if lacks_wrapper; then
        warn "this host's capability bounding set is reduced (no --privileged containers, so no kind) and the running engine was not started by this script; restart it with: --add-runtime kt-runc=$wrapper --default-runtime kt-runc"
    fi
    say "engine available ($(docker info --format 'Docker {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}' 2>/dev/null))"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    die "no Docker engine answers \`docker info\`, and starting one needs root (this is uid $(id -u)).
  Either run \`sudo bash scripts/docker-engine.sh\`, start your system's engine
  (\`sudo systemctl start docker\`), or point DOCKER_HOST at a running one."
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "dockerd not found: installing Debian's engine (apt-get install docker.io)"
    apt_install docker.io
fi
command -v docker >/dev/null 2>&1 || die "dockerd is installed but no docker client is on PATH"

mkdir -p "$state"
# A dockerd of ours that is alive but not answering yet (started by a concurrent run): just wait.
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    say "dockerd (pid $(cat "$pidfile")) is already starting; waiting"
else
    # Another dockerd (not ours) running without answering would hold /var/run/docker.pid.
    if pgrep -x dockerd >/dev/null 2>&1; then
        die "a dockerd process is running (pid $(pgrep -x dockerd | tr '\n' ' ')) but \`docker info\` fails;
  look at its log, or stop it and run this script again"
    fi
    # shellcheck disable=SC2206
    extra=(${KUBETUNE_DOCKERD_ARGS:-})
    if [ ${#wrapper_args[@]} -gt 0 ]; then
        command -v jq >/dev/null 2>&1 || apt_install jq   # the wrapper edits the OCI spec with jq
        mkdir -p "$(dirname "$wrapper")"
        install -m 0755 "$restricted/kind-runc.sh" "$wrapper.tmp" && mv -f "$wrapper.tmp" "$wrapper"
        say "this host's capability bounding set is reduced: containers run through $wrapper (scripts/restricted/kind-runc.sh)"
        extra+=("${wrapper_args[@]}")
    fi
    say "starting dockerd (log: $log)"
    # setsid: the engine outlives this script and make; its own process group, so an interrupted
    # make does not take it down.
    setsid dockerd --storage-driver=overlay2 --pidfile="$pidfile.daemon" ${extra[@]+"${extra[@]}"} >"$log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
fi

pid=$(cat "$pidfile")
for _ in $(seq $((wait_s * 5))); do
    if engine_up; then
        say "engine started in the background (pid $pid; $(docker info --format 'Docker {{.ServerVersion}}, storage {{.Driver}}' 2>/dev/null))"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        warn "dockerd exited; the end of its log ($log):"
        tail -25 "$log" >&2
        die "the Docker engine could not start (see above). Flags can be added with KUBETUNE_DOCKERD_ARGS,
  e.g. KUBETUNE_DOCKERD_ARGS='--iptables=false --bridge=none' where iptables/bridges are unavailable"
    fi
    sleep 0.2
done
tail -25 "$log" >&2
die "dockerd (pid $pid) is running but \`docker info\` did not answer within $wait_s s (log: $log)"
