#!/bin/bash
# The CNI agent of kubetune's offline kind node image (scripts/kind-node-image.sh; its image is made
# by scripts/restricted/kind-images.sh as docker.io/kindest/kindnetd), standing in for
# kind's kindnetd (sigs.k8s.io/kind/images/kindnetd is not served by the Go module proxy): what
# kindnetd does for a single-stack IPv4 cluster, as a shell loop in a hostNetwork DaemonSet pod:
#   - writes /etc/cni/net.d/10-kindnet.conflist (ptp + host-local on this node's podCIDR, portmap)
#   - routes every other node's podCIDR via that node's InternalIP (all nodes share one L2 network)
#   - masquerades pod traffic leaving the pod subnet
# Env: NODE_NAME, POD_SUBNET (from the DaemonSet); uses the pod's service account through kubectl.
# Runs inside that image, so it stands alone (no scripts/lib/common.sh there).
set -u
log() { echo "kindnetd(kubetune): $*"; }
conf=/etc/cni/net.d/10-kindnet.conflist
mtu=$(cat /sys/class/net/eth0/mtu 2>/dev/null || echo 1500)
while true; do
    if [ -n "${POD_SUBNET:-}" ]; then
        iptables -t nat -C POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -j MASQUERADE 2>/dev/null \
            || { iptables -t nat -A POSTROUTING -s "$POD_SUBNET" ! -d "$POD_SUBNET" -j MASQUERADE && log "masquerading $POD_SUBNET"; }
    fi
    if nodes=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}'); then
        while read -r name cidr ip; do
            [ -n "$name" ] && [ -n "$cidr" ] && [ -n "$ip" ] || continue
            if [ "$name" = "$NODE_NAME" ]; then
                want=$(printf '{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false,"mtu":%s,"ipam":{"type":"host-local","dataDir":"/run/cni-ipam-state","routes":[{"dst":"0.0.0.0/0"}],"ranges":[[{"subnet":"%s"}]]}},{"type":"portmap","capabilities":{"portMappings":true}}]}\n' "$mtu" "$cidr")
                if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
                    printf '%s\n' "$want" >"$conf.tmp" && mv -f "$conf.tmp" "$conf" && log "wrote $conf for $cidr"
                fi
            else
                if ! ip route show "$cidr" | grep -q "via $ip "; then
                    ip route replace "$cidr" via "$ip" && log "route $cidr via $ip ($name)"
                fi
            fi
        done <<<"$nodes"
    else
        log "kubectl get nodes failed; retrying"
    fi
    sleep 5
done
