"""Chat completions on the real target through the official ``openai`` client: a Serve
replica of SmolLM2-135M-Instruct (n-gram drafter, no trainer) on real Ray and HTTP;
non-streaming and streaming answers agree, sampling is seeded, stop strings cut, usage and
the acceptance block come back, and bad input is a 4xx the client raises with the
server's message."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.real, pytest.mark.integration, pytest.mark.slow]

openai = pytest.importorskip("openai")

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2, osd_serve, tmp_path_factory):
    """``osd serve --target smollm2`` in its own process, n-gram drafter, no trainer."""
    config = tmp_path_factory.mktemp("serve") / "smollm2.yaml"
    config.write_text("model_name: smollm2\n")
    args = ["--config", str(config), "--target", "smollm2", "--drafter", "ngram"]
    with osd_serve(*args, "--trainers", "0") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)


def test_chat_answers_through_the_template(client):
    r = client.chat.completions.create(
        model="smollm2", messages=CAPITAL, max_tokens=16, temperature=0
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and 0 < r.usage.completion_tokens <= 16
    osd = r.model_extra["osd"]
    assert osd["drafter_id"] and osd["target_steps"] >= 1 and 0 <= osd["alpha"] <= 1


def test_streaming_equals_non_streaming_with_a_seed(client):
    kw = {"model": "smollm2", "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 7}
    msgs = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Name three colours."},
    ]
    plain = client.chat.completions.create(messages=msgs, **kw)
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    again = client.chat.completions.create(messages=msgs, **kw)
    assert again.choices[0].message.content == plain.choices[0].message.content


def test_stop_and_max_tokens(client):
    r = client.chat.completions.create(
        model="smollm2", messages=CAPITAL, max_tokens=30, temperature=0, stop=["France"]
    )
    assert "France" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="smollm2", messages=CAPITAL, max_tokens=2, temperature=0
    )
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kw, status, words",
    [
        ({"messages": []}, 400, "non-empty"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400, "role"),
        ({"messages": CAPITAL, "max_tokens": 0}, 400, ">= 1"),
        ({"messages": CAPITAL, "n": 3}, 400, "n must be 1"),
        ({"messages": CAPITAL, "model": "gpt-4o"}, 404, "does not exist"),
    ],
)
def test_bad_input_is_a_4xx_with_the_reason(client, kw, status, words):
    kw = {"model": "smollm2", **kw}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kw)
    assert info.value.status_code == status and words in info.value.message
