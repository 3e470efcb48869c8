#!/usr/bin/env bash
# The demo: today it builds the tiny model and validates the CPU-sized FineTuneJob. Training and
# answering through the adapter arrive with the trainer (`kubetune train`).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/kubetune validate -f examples/cpu-tiny-kind.yaml
echo "demo: the trainer is not in this version yet; \`make demo\` will train and answer once it lands." >&2
