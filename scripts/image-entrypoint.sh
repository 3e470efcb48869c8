#!/bin/sh
# The entrypoint of kubetune's images: every container runs `kubetune`.
#   docker run IMAGE operator --metrics-port 8000      -> kubetune operator --metrics-port 8000 (the chart's args)
#   docker run IMAGE kubetune train -f job.yaml        -> kubetune train -f job.yaml
#   docker run IMAGE bash                              -> bash (any other program on PATH runs as is)
# Kubernetes pods that set `command:` (the operator's training and serving pods) bypass this.
set -e
if [ $# -eq 0 ]; then
    set -- kubetune --help
elif [ "${1#-}" != "$1" ] || ! command -v "$1" >/dev/null 2>&1; then
    set -- kubetune "$@"
fi
exec "$@"
