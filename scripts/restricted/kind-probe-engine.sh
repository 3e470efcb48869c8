#!/usr/bin/env bash
# A second, private Docker engine for probing kind on machines whose main engine can't run
# privileged containers (capability bounding set without CAP_SYS_RESOURCE, see kind-runc.sh):
# same dockerd binary, its own data/exec root under ~/.cache/kubetune/kind/dockerd, its own
# socket, runc wrapped by scripts/restricted/kind-runc.sh as the default runtime. It leaves the
# host's iptables alone (--iptables=false --ip-masq=false), has its own default bridge kt-docker0
# (10.214.0.1/24, made here; NOT --bridge=none: dockerd then deletes the host's docker0, which
# the main engine needs) and allocates networks from 10.213.0.0/16, away from the main engine's.
#
# The host's FORWARD chain belongs to the main engine (policy DROP, br_netfilter on), which drops
# traffic between this engine's containers: `net` creates the "kind" network here (kind reuses
# an existing one) and inserts one ACCEPT rule for its bridge into DOCKER-USER; `stop` removes it.
#
# Usage: bash scripts/restricted/kind-probe-engine.sh [start|net|stop|host|use IMAGE]
#   host: print the DOCKER_HOST value
#   use IMAGE: start + net, load IMAGE from the main engine unless present, print the DOCKER_HOST
#              value (messages on stderr): DOCKER_HOST=$(bash .../kind-probe-engine.sh use IMAGE)
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
d=$kubetune_cache/kind/dockerd
host=unix://$d/docker.sock
timings=$kubetune_cache/kind/timings.txt
up() { DOCKER_HOST=$host docker info >/dev/null 2>&1; }

start() {
    if up; then say "up at $host"; return 0; fi
    mkdir -p "$d/data" "$d/exec"
    if ! ip link show kt-docker0 >/dev/null 2>&1; then
        ip link add name kt-docker0 type bridge
        ip addr add 10.214.0.1/24 dev kt-docker0
        ip link set kt-docker0 up
    fi
    nohup dockerd --host "$host" --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/dockerd.pid" \
        --storage-driver=overlay2 --iptables=false --ip-masq=false --bridge=kt-docker0 --ip6tables=false \
        --default-address-pool base=10.213.0.0/16,size=24 \
        --add-runtime "kt-runc=$restricted/kind-runc.sh" --default-runtime kt-runc \
        >"$d/dockerd.log" 2>&1 &
    for _ in $(seq 120); do up && break; sleep 0.5; done
    up || { tail -20 "$d/dockerd.log" >&2; die "dockerd did not come up"; }
    say "up at $host (log $d/dockerd.log)"
}

net() {
    local br chain
    up || die "not running"
    DOCKER_HOST=$host docker network inspect kind >/dev/null 2>&1 \
        || DOCKER_HOST=$host docker network create -d bridge -o com.docker.network.driver.mtu=1500 kind >/dev/null
    br=br-$(DOCKER_HOST=$host docker network inspect kind -f '{{.Id}}' | cut -c1-12)
    chain=DOCKER-USER; iptables -S "$chain" >/dev/null 2>&1 || chain=FORWARD
    iptables -C "$chain" -i "$br" -o "$br" -j ACCEPT 2>/dev/null || iptables -I "$chain" -i "$br" -o "$br" -j ACCEPT
    echo "$chain $br" >"$d/forward-rule"
    say "network kind on $br, forwarding allowed ($chain)"
}

stop() {
    local chain br pid
    if [ -f "$d/forward-rule" ]; then
        read -r chain br <"$d/forward-rule"
        iptables -D "$chain" -i "$br" -o "$br" -j ACCEPT 2>/dev/null || true
        rm -f "$d/forward-rule"
    fi
    pid=$(cat "$d/dockerd.pid" 2>/dev/null) || return 0  # dockerd removes its pid file when it exits
    if stop_pidfile "$d/dockerd.pid"; then say "stopped dockerd (pid $pid)"; fi
}

use() { # use IMAGE
    local image=${1:?use IMAGE} main_id t0
    start >&2
    net >&2
    main_id=$(docker image inspect -f '{{.Id}}' "$image")
    if [ "$(DOCKER_HOST=$host docker image inspect -f '{{.Id}}' "$image" 2>/dev/null)" != "$main_id" ]; then
        t0=$(date +%s)
        docker save "$image" | DOCKER_HOST=$host docker load >/dev/null
        record "[probe] $image loaded into the probe engine in $(elapsed "$t0") s" >&2
    fi
    echo "$host"
}

case "${1:-start}" in
    host) echo "$host" ;;
    start) start ;;
    net) net ;;
    stop) stop ;;
    use) use "${2:-}" ;;
    *) die "unknown command ${1} (start, net, stop, host, use IMAGE)" ;;
esac
