#!/usr/bin/env bash
# The demo: fine-tune the tiny model from a FineTuneJob manifest on this machine's CPU, then ask
# the base model and the trained adapter the same question.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=$root/.cache
kubetune=.venv/bin/kubetune

mkdir -p "$cache/demo"
sed -e "s|@ROOT@|$root|g" -e "s|@CACHE@|$cache|g" examples/local-demo.yaml.in > "$cache/demo/job.yaml"
rm -rf "$cache/demo/output"   # a fresh run each time (kept, it would resume and finish at once)

echo "== the job ($cache/demo/job.yaml)"
$kubetune validate --local -f "$cache/demo/job.yaml"
echo "== its plan"
$kubetune plan -f "$cache/demo/job.yaml"
echo "== training (JSON log lines; every 50 steps a checkpoint and an evaluation)"
$kubetune train -f "$cache/demo/job.yaml" | grep -E '"event": "(plan|checkpoint|done)"|"step": (1|50|100|150|200),'

question="How long are backups kept?"
echo
echo "== Q: $question"
echo -n "base model:   "
$kubetune generate --model "file://$cache/models/tiny-llama" --max-new-tokens 24 "$question"
echo -n "with adapter: "
$kubetune generate --model "file://$cache/models/tiny-llama" --adapter "file://$cache/demo/output/adapter" "$question"
echo
echo "adapter and report.json: $cache/demo/output"
