#!/usr/bin/env bash
# The demo: fine-tune the tiny model from a FineTuneJob manifest on this machine's CPU, serve the
# base model and the trained adapter with `kubetune serve`, and ask both the same question through
# the OpenAI API (the official `openai` client).
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$repo"
root=$repo
cache=$root/.cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
python=.venv/bin/python
kubetune=(.venv/bin/kubetune)   # this clone's own command (make setup installs it editable)

mkdir -p "$cache/demo"
sed -e "s|@ROOT@|$root|g" -e "s|@CACHE@|$cache|g" examples/local-demo.yaml.in > "$cache/demo/job.yaml"
rm -rf "$cache/demo/output"   # a fresh run each time (kept, it would resume and finish at once)

echo "== the job ($cache/demo/job.yaml)"
"${kubetune[@]}" validate --local -f "$cache/demo/job.yaml"
echo "== its plan"
"${kubetune[@]}" plan -f "$cache/demo/job.yaml"
echo "== training (JSON log lines; every 50 steps a checkpoint and an evaluation)"
"${kubetune[@]}" train -f "$cache/demo/job.yaml" | grep -E '"event": "(plan|checkpoint|done)"|"step": (1|50|100|150|200),'

model=$cache/models/tiny-llama
adapter=$cache/demo/output/adapter
question="How long are backups kept?"
max_tokens=24

# The adapter's answer offline (PEFT + generate), to check that the server answers the same.
offline=$("${kubetune[@]}" generate --model "file://$model" --adapter "file://$adapter" --max-new-tokens $max_tokens \
          "$question")

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$cache/demo/serve.log
echo
echo "== kubetune serve on 127.0.0.1:$port: the base model as tiny-llama, the adapter as support (log: $log)"
"${kubetune[@]}" serve --model "file://$model" --served-model-name tiny-llama --adapter "support=file://$adapter" \
    --host 127.0.0.1 --port "$port" > "$log" 2>&1 &
server=$!
stop_server() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
}
trap stop_server EXIT
for _ in $(seq 600); do   # 120 s
    if ! kill -0 "$server" 2>/dev/null; then echo "the server exited:"; tail -20 "$log"; exit 1; fi
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready")" = 200 ] && break
    sleep 0.2
done
if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready")" != 200 ]; then
    echo "the server was not ready after 120 s:"; tail -20 "$log"; exit 1
fi

echo "== Q: $question   (POST /v1/chat/completions with the openai client, greedy)"
PORT=$port QUESTION=$question MAX_TOKENS=$max_tokens OFFLINE=$offline "$python" - <<'PY'
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{os.environ['PORT']}/v1", api_key="unused")
answers = {}
for model, label in (("tiny-llama", "base model:  "), ("support", "with adapter:")):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": os.environ["QUESTION"]}],
                                           max_tokens=int(os.environ["MAX_TOKENS"]), temperature=0)
    answers[model] = reply.choices[0].message.content.strip()
    print(label, " ".join(answers[model].split()))  # on one line: the untrained base answers noise
if answers["support"] != os.environ["OFFLINE"]:
    sys.exit(f"the served adapter answers {answers['support']!r}, `kubetune generate` {os.environ['OFFLINE']!r}")
PY
echo
echo "adapter and report.json: $cache/demo/output"
