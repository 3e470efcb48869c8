"""The official `openai` Python client against `kubetune serve`, with no special cases: the same
server, model and adapters as test_serving.py (its fixtures), every call through `openai.OpenAI`.
Greedy outputs are compared with what the offline PeftModel decode (`generate.answer`) gives."""

import pytest

pytestmark = pytest.mark.trainer

openai = pytest.importorskip("openai", reason="NOT RUN: the OpenAI client tests need the openai package ([dev] extra)")

# the fixtures of test_serving.py: the tiny model and its adapters, the offline answers, the server
from tests.trainer.support import API_KEY, MAX_TOKENS, PROMPT  # noqa: E402

MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.base_url.port}/v1", api_key=API_KEY, max_retries=0, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def templated(offline):
    """The chat template applied to MESSAGES: /v1/completions on it decodes what the chat does."""
    _, tokenizer = offline
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_models_list_shows_the_base_and_the_adapter(client, files):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "alpha"]
    base, alpha = models
    assert base.object == "model" and base.owned_by and base.parent is None
    assert alpha.parent == "tiny" and alpha.root == f"file://{files[1]['alpha']}"
    assert client.models.retrieve("alpha").parent == "tiny"


def test_greedy_completions_and_chat_answer_as_the_offline_decode_does(client, offline, templated):
    answers, _ = offline  # the base and the adapter answer differently (the fixture checks it)
    for model in ("tiny", "alpha"):
        completion = client.completions.create(model=model, prompt=templated, max_tokens=MAX_TOKENS, temperature=0)
        assert completion.object == "text_completion" and completion.model == model
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.choices[0].text.strip() == answers[model]
        usage = completion.usage
        assert 0 < usage.completion_tokens <= MAX_TOKENS
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chat = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "alpha"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content.strip() == answers["alpha"]
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens  # the same tokens, templated by the server


def test_streamed_deltas_add_up_to_the_whole_text_and_usage_comes_last(client, templated):
    whole = client.completions.create(model="alpha", prompt=templated, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        client.completions.create(
            model="alpha",
            prompt=templated,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.model == "alpha" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    # without stream_options no usage chunk: every chunk has its choice
    chunks = list(
        client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
    )
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_errors_raise_the_clients_exceptions_with_the_servers_message(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    assert missing.value.status_code == 404 and missing.value.type == "NotFoundError"
    assert missing.value.body["message"] == "The model `nope` does not exist."
    assert "The model `nope` does not exist." in str(missing.value)

    with pytest.raises(openai.BadRequestError) as empty:
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    assert empty.value.status_code == 400 and empty.value.body["message"] == "prompt must not be empty"

    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert "maximum context length is 2048" in too_long.value.body["message"]


def test_a_client_with_a_wrong_key_gets_the_clients_authentication_error(server):
    """The server requires its api key (finding 1 of the hardening issue); the client maps the 401."""
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.base_url.port}/v1", api_key="not-the-key", max_retries=0, timeout=60
    ) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.AuthenticationError):
            stranger.completions.create(model="tiny", prompt="The", max_tokens=2)
