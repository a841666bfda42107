"""The /v1/completions protocol: validation (4xx with a message) and response shapes."""

import json

import pytest
from osd.actors.openai_api import (
    ApiError,
    completion_chunk,
    completion_response,
    parse_completion,
    sse,
)

from osd.serving import RequestResult
from osd.specdec.engine import DecodeStats


def ok(**body):
    return parse_completion({"prompt": "2 + 2 =", **body}, "osd")


def err(body, served="osd") -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_completion(body, served)
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    assert info.value.message
    return info.value


def test_defaults_follow_openai():
    p = ok()
    assert p.max_tokens == 16 and p.sampling.temperature == 1.0 and not p.stream
    assert p.model == "osd" and p.stop == () and p.domain is None


def test_full_request():
    p = ok(
        model="osd",
        max_tokens=8,
        temperature=0,
        top_p=0.9,
        top_k=5,
        seed=3,
        stop=["\n", "Q:"],
        stream=True,
        domain="math",
        n=1,
        user="u1",
    )
    assert p.sampling.greedy and p.sampling.top_p == 0.9 and p.sampling.top_k == 5
    assert p.sampling.seed == 3 and p.stop == ("\n", "Q:") and p.stream and p.domain == "math"


@pytest.mark.parametrize(
    "prompt, expected",
    [("abc", "abc"), (["abc"], "abc"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5])],
)
def test_prompt_forms(prompt, expected):
    assert parse_completion({"prompt": prompt}, "osd").prompt == expected


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": 5}, "prompt", "string or a list of token ids"),
        ({"prompt": ["a", "b"]}, "prompt", "one per request"),
        ({"prompt": [1, "x"]}, "prompt", "string or a list"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", ">= 1"),
        ({"prompt": "x", "max_tokens": "8"}, "max_tokens", "int"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "int"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "int"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"prompt": "x", "temperature": 3}, "temperature", "[0, 2]"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p"),
        ({"prompt": "x", "top_k": "3"}, "top_k", "top_k"),
        ({"prompt": "x", "seed": "s"}, "seed", "int"),
        ({"prompt": "x", "stop": 7}, "stop", "string"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "stream": "yes"}, "stream", "true or false"),
        ({"prompt": "x", "n": 2}, "n", "must be 1"),
        ({"prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
        ({"prompt": "x", "echo": True}, "echo", "not supported"),
        ({"prompt": "x", "model": 3}, "model", "string"),
        ({"prompt": "x", "max_token": 3}, "max_token", "unknown fields"),
    ],
)
def test_bad_requests_are_400_with_a_message(body, param, words):
    e = err(body)
    assert e.status == 400 and e.param == param, e.message
    assert words in e.message


def test_unknown_model_is_404():
    e = err({"prompt": "x", "model": "gpt-5"})
    assert e.status == 404 and e.code == "model_not_found" and "'osd'" in e.message


def test_not_an_object():
    assert err(["prompt"]).status == 400


def _result(**kw) -> RequestResult:
    stats = DecodeStats()
    stats.record(depth=4, accepted=3, emitted=4)
    stats.record(depth=4, accepted=1, emitted=2)
    base = dict(
        request_id="cmpl-1",
        text=" 4",
        token_ids=[5, 6, 7, 8, 9, 10],
        finish_reason="length",
        prompt_tokens=3,
        stats=stats,
        version_start=1,
        version_end=2,
        queue_s=0.0,
        latency_s=0.1,
    )
    return RequestResult(**{**base, **kw})


def test_response_has_usage_and_osd_block():
    doc = completion_response("cmpl-1", "osd", _result(), "draft")
    assert doc["object"] == "text_completion" and doc["choices"][0]["text"] == " 4"
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    o = doc["osd"]
    assert o["drafter_version"] == 2 and o["drafter_version_start"] == 1
    assert o["alpha"] == pytest.approx(4 / 8) and o["proposed"] == 8 and o["accepted"] == 4
    assert o["alpha_per_pos"] == [1.0, 0.5, 1.0, 0.0]  # reached [2, 2, 1, 1], accepted [2, 1, 1, 0]
    json.dumps(doc)  # serialisable


def test_stream_chunks_and_sse_framing():
    mid = completion_chunk("c", "osd", "ab")
    assert mid["choices"][0]["finish_reason"] is None and "usage" not in mid
    last = completion_chunk("c", "osd", "c", _result(), "draft")
    assert last["choices"][0]["finish_reason"] == "length" and last["osd"]["drafter_id"] == "draft"
    frame = sse(mid)
    assert frame.startswith(b"data: {") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == mid
    assert sse("[DONE]") == b"data: [DONE]\n\n"
