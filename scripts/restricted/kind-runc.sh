#!/bin/sh
# runc wrapper for Docker engines that run with a reduced capability bounding set (this sandbox
# lacks CAP_SYS_RESOURCE): `docker run --privileged` (which kind always uses for its nodes) asks
# runc for every capability the kernel knows and fails with
#   "runc create failed: unable to start container process: unable to apply caps: operation not permitted"
# For `create`/`run` (the bundle's config.json) and `exec --process FILE` (docker exec --privileged),
# this drops the capabilities that are not in our own bounding set, then execs the real runc;
# everything else passes straight through.
# Register it with the engine (dockerd flags, e.g. through scripts/docker-engine.sh's
# KUBETUNE_DOCKERD_ARGS):  --add-runtime kt-runc=<repo>/scripts/restricted/kind-runc.sh --default-runtime kt-runc
# scripts/docker-engine.sh does that by itself where it detects a reduced bounding set.
# Env: KIND_RUNC_REAL (default: /usr/sbin/runc, else /usr/bin/runc).
# Plain sh on its own, without scripts/lib/common.sh: dockerd runs it for every container.
real=${KIND_RUNC_REAL:-}
[ -n "$real" ] || for r in /usr/sbin/runc /usr/bin/runc; do [ -x "$r" ] && { real=$r; break; }; done
bundle=
cmd=
procfile=
prev=
for a in "$@"; do
    case "$prev" in --bundle|-b) bundle=$a ;; --process|-p) procfile=$a ;; esac
    case "$a" in
        --bundle=*) bundle=${a#--bundle=} ;;
        --process=*) procfile=${a#--process=} ;;
        create|run|exec) [ -z "$cmd" ] && cmd=$a ;;
    esac
    prev=$a
done
file='' filter=''
case "$cmd" in
    create|run) file=${bundle:-$(pwd)}/config.json; filter=.process.capabilities ;;
    exec) file=$procfile; filter=.capabilities ;;
esac
if [ -n "$file" ] && [ -f "$file" ] && command -v jq >/dev/null 2>&1; then
    bnd=$(awk '/^CapBnd:/{print $2}' /proc/self/status)
    # names of the capabilities in our bounding set, as a JSON array
    allowed=$(last=$(cat /proc/sys/kernel/cap_last_cap); i=0; printf '['; sep=
        for n in CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE \
                 NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT \
                 SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE \
                 AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ \
                 PERFMON BPF CHECKPOINT_RESTORE; do
            [ $i -le "$last" ] || break
            if [ $(( (0x$bnd >> i) & 1 )) -eq 1 ]; then printf '%s"CAP_%s"' "$sep" "$n"; sep=,; fi
            i=$((i + 1))
        done; printf ']')
    tmp=$file.kind-runc
    if jq --argjson ok "$allowed" \
        "if $filter then $filter |= with_entries(.value |= (if type == \"array\" then map(select(. as \$c | \$ok | index(\$c))) else . end)) else . end" \
        "$file" >"$tmp"; then
        mv -f "$tmp" "$file"
    else
        rm -f "$tmp"
    fi
fi
exec "$real" "$@"
