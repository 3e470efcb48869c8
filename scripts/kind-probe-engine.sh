#!/usr/bin/env bash
# A second, private Docker engine for probing kind on machines whose main engine can't run
# privileged containers (capability bounding set without CAP_SYS_RESOURCE, see kind-runc.sh):
# same dockerd binary, its own data/exec root under ~/.cache/kubetune/kind/dockerd, its own
# socket, runc wrapped by scripts/kind-runc.sh as the default runtime. It leaves the host's
# iptables alone (--iptables=false --ip-masq=false), has its own default bridge kt-docker0
# (10.214.0.1/24, made here; NOT --bridge=none: dockerd then deletes the host's docker0, which
# the main engine needs) and allocates networks from 10.213.0.0/16, away from the main engine's.
#
# The host's FORWARD chain belongs to the main engine (policy DROP, br_netfilter on), which drops
# traffic between this engine's containers: `net` creates the "kind" network here (kind reuses
# an existing one) and inserts one ACCEPT rule for its bridge into DOCKER-USER; `stop` removes it.
#
# Usage: bash scripts/kind-probe-engine.sh [start|net|stop|host]   (host: print the DOCKER_HOST value)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
d=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/kind/dockerd
sock=$d/docker.sock
host=unix://$sock
up() { DOCKER_HOST=$host docker info >/dev/null 2>&1; }
case "${1:-start}" in
host) echo "$host" ;;
net)
    up || { echo "kind-probe-engine: not running" >&2; exit 1; }
    DOCKER_HOST=$host docker network inspect kind >/dev/null 2>&1 \
        || DOCKER_HOST=$host docker network create -d bridge -o com.docker.network.driver.mtu=1500 kind >/dev/null
    br=br-$(DOCKER_HOST=$host docker network inspect kind -f '{{.Id}}' | cut -c1-12)
    chain=DOCKER-USER; iptables -S "$chain" >/dev/null 2>&1 || chain=FORWARD
    iptables -C "$chain" -i "$br" -o "$br" -j ACCEPT 2>/dev/null || iptables -I "$chain" -i "$br" -o "$br" -j ACCEPT
    echo "$chain $br" >"$d/forward-rule"
    echo "kind-probe-engine: network kind on $br, forwarding allowed ($chain)" ;;
stop)
    if [ -f "$d/forward-rule" ]; then
        read -r chain br <"$d/forward-rule"
        iptables -D "$chain" -i "$br" -o "$br" -j ACCEPT 2>/dev/null || true
        rm -f "$d/forward-rule"
    fi
    if [ -f "$d/dockerd.pid" ] && kill -0 "$(cat "$d/dockerd.pid")" 2>/dev/null; then
        pid=$(cat "$d/dockerd.pid"); kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        echo "kind-probe-engine: stopped dockerd $pid"
    fi ;;
start)
    if up; then echo "kind-probe-engine: up at $host"; exit 0; fi
    mkdir -p "$d/data" "$d/exec"
    if ! ip link show kt-docker0 >/dev/null 2>&1; then
        ip link add name kt-docker0 type bridge
        ip addr add 10.214.0.1/24 dev kt-docker0
        ip link set kt-docker0 up
    fi
    nohup dockerd --host "$host" --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/dockerd.pid" \
        --storage-driver=overlay2 --iptables=false --ip-masq=false --bridge=kt-docker0 --ip6tables=false \
        --default-address-pool base=10.213.0.0/16,size=24 \
        --add-runtime "kt-runc=$repo/scripts/kind-runc.sh" --default-runtime kt-runc \
        >"$d/dockerd.log" 2>&1 &
    for _ in $(seq 120); do up && break; sleep 0.5; done
    up || { tail -20 "$d/dockerd.log" >&2; echo "kind-probe-engine: dockerd did not come up" >&2; exit 1; }
    echo "kind-probe-engine: up at $host (log $d/dockerd.log)" ;;
esac
