"""`kubetune serve` for real: the tiny model, two LoRA adapters trained on CPU, the server started
through the CLI, and every check over HTTP. Greedy outputs are compared with `generate.answer`.

The server runs as a deployment's would: an api key on every request, runtime loads allowed from
the folder holding the test's adapters (file:// there) and nowhere else."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
httpx = pytest.importorskip("httpx", reason="NOT RUN: serving tests need httpx (the [dev] extra)")
pytest.importorskip("fastapi", reason="NOT RUN: serving tests need the [serve] extra")

from kubetune_serve.engine import Engine, EngineError, Sampling  # noqa: E402
from kubetune_serve.text import TextTracker  # noqa: E402
from tests.trainer.support import (  # noqa: E402
    MAX_TOKENS,
    PROMPT,
    assert_error,
    chat,
    chat_text,
    free_port,
    load,
    model_ids,
    serve_command,
    subprocess_env,
    unload,
)

GENERIC_REFUSAL = "adapter source not found or not allowed"


def uri(path):
    return f"file://{path}"


def test_ready_once_loaded_and_models_list_the_base_and_the_startup_adapter(server, files):
    assert server.get("/health").status_code == 200
    assert server.get("/ready").json()["adapters"] == ["alpha"]
    cards = server.get("/v1/models").json()
    assert cards["object"] == "list"
    base, alpha = cards["data"]
    assert base["id"] == "tiny" and base["object"] == "model" and base["parent"] is None
    assert base["root"] == str(files[0]) and base["owned_by"]
    assert alpha["id"] == "alpha" and alpha["parent"] == "tiny" and alpha["root"] == f"file://{files[1]['alpha']}"
    report = json.loads((files[1]["alpha"].parent / "report.json").read_text())
    assert alpha["sha256"] == report["adapter"]["sha256"]  # what the FineTuneJob reported, for the operator
    assert alpha["batching"] == "grouped"  # a plain LoRA adapter shares batches with every other


def test_base_and_adapters_answer_as_generate_does(server, files, offline):
    answers, tokenizer = offline
    assert chat_text(server, "tiny").strip() == answers["tiny"]
    assert chat_text(server, "alpha").strip() == answers["alpha"]

    loaded = load(server, "beta", uri(files[1]["beta"]))  # from an allowed folder, at runtime
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'beta' added successfully."
    try:
        assert model_ids(server) == ["tiny", "alpha", "beta"]
        assert server.get("/v1/models").json()["data"][2]["parent"] == "tiny"
        beta = chat(server, "beta").json()
        assert beta["object"] == "chat.completion" and beta["model"] == "beta"
        assert beta["choices"][0]["message"]["role"] == "assistant"
        assert beta["choices"][0]["message"]["content"].strip() == answers["beta"]
        assert beta["usage"]["total_tokens"] == beta["usage"]["prompt_tokens"] + beta["usage"]["completion_tokens"]
        assert 0 < beta["usage"]["completion_tokens"] <= MAX_TOKENS

        # /v1/completions on the templated text: the same tokens, so the same answer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        outputs = {}
        for model in ("tiny", "alpha", "beta"):
            response = server.post(
                "/v1/completions", json={"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
            outputs[model] = body["choices"][0]["text"].strip()
        assert outputs == answers
        assert len(set(outputs.values())) == 3

        again = load(server, "beta", uri(files[1]["beta"]))  # the same name from the same source: nothing to do
        assert again.status_code == 200, again.text
        assert_error(load(server, "beta", uri(files[1]["alpha"])), 400, "already been loaded")
    finally:
        unloaded = unload(server, "beta")
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'beta' removed successfully."
    assert model_ids(server) == ["tiny", "alpha"]
    assert_error(chat(server, "beta"), 404, "`beta` does not exist")
    assert_error(unload(server, "beta"), 404, "cannot be found")
    assert chat_text(server, "alpha").strip() == answers["alpha"]  # the others are untouched


def test_adapters_the_server_refuses(server, files):
    adapters = files[1]
    assert_error(load(server, "wide", uri(adapters["wide"])), 422, "adapter rank 128 exceeds maxLoraRank 64")
    assert_error(load(server, "other", uri(adapters["other"])), 422, "does not fit base model tiny")
    assert_error(load(server, "other", uri(adapters["other-bin"])), 422, "could not be loaded")
    assert_error(load(server, "nowhere", uri(files[0].parent / "nowhere")), 404, GENERIC_REFUSAL)
    assert_error(load(server, "plain", adapters["beta"]), 404, GENERIC_REFUSAL)  # a plain path: never at runtime
    assert_error(load(server, "tiny", uri(adapters["beta"])), 400, "base model's name")
    assert model_ids(server) == ["tiny", "alpha"]

    assert load(server, "beta", uri(adapters["beta"])).status_code == 200
    try:
        assert_error(load(server, "gamma", uri(adapters["alpha"])), 400, "maxAdapters 2")
    finally:
        assert unload(server, "beta").status_code == 200
    assert server.get("/ready").status_code == 200


def test_chat_streaming_stop_strings_and_errors(server, offline):
    answers, _ = offline
    whole = chat(server, "alpha").json()["choices"][0]["message"]["content"]
    with server.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "alpha",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "alpha" for chunk in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0

    # a stop string ends the text before it, streamed or not
    stop = whole.strip()[4:7]
    expected = whole[: whole.find(stop)]
    stopped = chat(server, "alpha", stop=[stop]).json()["choices"][0]
    assert stopped["message"]["content"] == expected and stopped["finish_reason"] == "stop"
    with server.stream(
        "POST",
        "/v1/completions",
        json={"model": "tiny", "prompt": "The", "max_tokens": 8, "temperature": 0, "stream": True},
    ) as response:
        pieces = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    plain = server.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 8, "temperature": 0})
    assert "".join(p["choices"][0]["text"] for p in pieces) == plain.json()["choices"][0]["text"]

    # sampling is reproducible with a seed; n choices come back indexed
    sampled = [
        server.post(
            "/v1/completions",
            json={
                "model": "alpha",
                "prompt": ["The", "A"],
                "max_tokens": 6,
                "temperature": 1.0,
                "top_p": 0.9,
                "seed": 7,
                "n": 2,
            },
        ).json()
        for _ in range(2)
    ]
    assert sampled[0]["choices"] == sampled[1]["choices"]
    assert [c["index"] for c in sampled[0]["choices"]] == [0, 1, 2, 3]

    # errors, in OpenAI's format
    assert_error(chat(server, "nope"), 404, "The model `nope` does not exist.")
    assert_error(server.post("/v1/completions", json={"model": "tiny"}), 400, "prompt")
    assert_error(server.post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400, "messages")
    assert_error(
        server.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 5000}),
        400,
        "maximum context length is 2048",
    )
    assert_error(server.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "lora_path")


def test_metrics_count_requests_tokens_and_adapters(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        response = server.get("/metrics")
        assert response.status_code == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }

    key = ("kubetune_serve_requests_total", (("endpoint", "chat_completions"), ("model", "alpha"), ("status", "200")))
    latency = ("kubetune_serve_request_duration_seconds_count", (("endpoint", "chat_completions"), ("model", "alpha")))
    before = samples()
    before_timings = {
        name: before.get(name, 0)
        for name in (
            ("kubetune_serve_queue_wait_seconds_count", (("model", "alpha"),)),
            ("kubetune_serve_time_to_first_token_seconds_count", (("model", "alpha"),)),
        )
    }
    before, latency_before = before.get(key, 0), before.get(latency, 0)
    chat_text(server, "alpha")
    assert chat(server, "nope").status_code == 404
    after = samples()
    assert after[key] == before + 1
    assert after[("kubetune_serve_generation_tokens_total", (("model", "alpha"),))] > 0
    assert after[("kubetune_serve_loaded_adapters", ())] == 1
    assert after[("kubetune_serve_adapter_loaded", (("batching", "grouped"), ("model", "alpha")))] == 1
    assert after[("kubetune_serve_ready", ())] == 1
    assert after[latency] == latency_before + 1  # one latency histogram per adapter
    for timing in ("queue_wait_seconds", "time_to_first_token_seconds"):
        count = (f"kubetune_serve_{timing}_count", (("model", "alpha"),))
        assert after[count] == before_timings[count] + 1, timing
    assert after[("kubetune_serve_requests_in_flight", ())] == 0  # what an autoscaler reads
    unknown = (
        "kubetune_serve_requests_total",
        (("endpoint", "chat_completions"), ("model", "unknown"), ("status", "404")),
    )
    assert after[unknown] >= 1  # unknown names share one series


def test_an_adapter_that_cannot_load_at_startup_stops_the_server(files):
    """Never ready, and exit 1: the pod restarts and its log says why."""
    tiny, adapters = files
    command = serve_command(tiny, free_port(), "--adapter", f"wide={uri(adapters['wide'])}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 1, result.stderr[-2000:]
    failure = [json.loads(line) for line in result.stdout.splitlines() if '"startup_failed"' in line]
    assert failure and failure[0]["error"] == "adapter rank 128 exceeds maxLoraRank 64"

    plain = subprocess.run(  # a startup adapter is trusted, but still has to be a URI
        serve_command(tiny, free_port(), "--adapter", f"alpha={adapters['alpha']}"),
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert plain.returncode == 2 and "not a URI kubetune reads" in plain.stderr

    bad = subprocess.run(
        serve_command(tiny, free_port(), "--adapter", "no-uri"),
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert bad.returncode == 2 and "write NAME=URI" in bad.stderr


def test_a_failed_first_load_leaves_the_base_model_as_it_was(files, offline, tmp_path):
    """A .bin adapter (no safetensors header to check) that does not fit fails inside PEFT after it
    has wrapped layers: the engine puts the model back, and later loads work."""
    answers, tokenizer = offline
    tiny, adapters = files
    engine = Engine(str(tiny), "tiny", cache_dir=tmp_path)
    engine.load_base()
    with pytest.raises(EngineError) as failed:
        engine.load_adapter("other", uri(adapters["other-bin"]))
    assert failed.value.status == 422
    assert engine.adapters() == [] and "lora" not in str(engine.base).lower()
    ids = engine.encode_chat([{"role": "user", "content": PROMPT}])
    assert engine.generate("tiny", ids, Sampling(MAX_TOKENS, temperature=0)).text.strip() == answers["tiny"]
    engine.load_adapter("beta", uri(adapters["beta"]))
    assert engine.generate("beta", ids, Sampling(MAX_TOKENS, temperature=0)).text.strip() == answers["beta"]
    engine.unload_adapter("beta")  # the last one: back to the plain model
    assert "lora" not in str(engine.base).lower()
    assert engine.generate("tiny", ids, Sampling(MAX_TOKENS, temperature=0)).text.strip() == answers["tiny"]


def test_text_tracker_holds_back_what_may_be_a_stop_string():
    class Pieces:
        vocabulary = ["Hel", "lo", " wor", "ld", "<eos>"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.vocabulary[i] for i in ids if i != 4)

    sent = []
    tracker = TextTracker(Pieces(), stop=["o w"], eos_ids=[4], on_text=sent.append)
    for token in (0, 1, 2, 3):
        tracker.add(token)
    assert (tracker.text, tracker.finish_reason, sent, tracker.token_ids) == ("Hell", "stop", ["Hel", "l"], [0, 1, 2])

    sent.clear()
    tracker = TextTracker(Pieces(), stop=["xyz"], eos_ids=[4], on_text=sent.append)
    for token in (0, 1, 4, 2):
        tracker.add(token)
    assert (tracker.text, tracker.finish_reason, "".join(sent)) == ("Hello", "stop", "Hello")
