"""The /v1/chat/completions protocol: validation (4xx with a message), rendering through the
chat template (a 400 without one), and response shapes the official ``openai`` client
parses."""

import pytest
from osd.actors.chat_api import chat_chunk, chat_response, parse_chat, render_chat
from osd.actors.openai_api import ApiError

from osd.serving import RequestResult
from osd.specdec.engine import DecodeStats

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def err(body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat(body, "osd")
    assert info.value.status == 400 and info.value.message
    return info.value


def test_full_request():
    p = parse_chat(
        {
            "model": "osd",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "a"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2 + 2?"},
            ],
            "max_completion_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n"],
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "text"},
            "tools": [],
            "user": "u1",
        },
        "osd",
    )
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]
    assert p.messages[1]["content"] == "Hi"
    c = p.completion
    assert c.max_tokens == 8 and c.sampling.temperature == 0.7 and c.sampling.top_p == 0.9
    assert c.sampling.seed == 3 and c.stop == ("\n",) and c.stream


@pytest.mark.parametrize(
    "body, words",
    [
        ({}, "messages is required"),
        ({"messages": []}, "non-empty"),
        ({"messages": "hi"}, "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "does not support"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
        ({"messages": USER, "max_tokens": 0}, ">= 1"),
        ({"messages": USER, "temperature": 5}, "[0, 2]"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "n": 2}, "n must be 1"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": USER, "logprobs": True}, "logprobs"),
        ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": USER, "max_tokens": 4, "max_completion_tokens": 5}, "differ"),
        ({"messages": USER, "prompt": "x"}, "unknown fields"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ],
)
def test_bad_requests_say_what_to_fix(body, words):
    assert words in err(body).message


def test_unknown_model_is_404():
    with pytest.raises(ApiError) as info:
        parse_chat({"messages": USER, "model": "gpt-4"}, "osd")
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_a_target_without_chat_template_gets_a_400():
    from osd.models import load_tokenizer

    tok = load_tokenizer("zoo:target")
    assert not tok.chat_template
    with pytest.raises(ApiError) as info:
        render_chat(tok, USER)
    assert info.value.status == 400 and "/v1/completions" in info.value.message
    assert info.value.code == "chat_template_missing"


def _result(text="4", reason="stop") -> RequestResult:
    stats = DecodeStats()
    stats.record(4, 2, 3)
    return RequestResult(
        request_id="chatcmpl-1",
        text=text,
        token_ids=[1, 2, 3],
        finish_reason=reason,
        prompt_tokens=7,
        stats=stats,
        version_start=0,
        version_end=1,
        queue_s=0.0,
        latency_s=0.1,
    )


def test_response_shapes_parse_with_the_openai_client_models():
    openai = pytest.importorskip("openai")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    r = ChatCompletion.model_validate(chat_response("chatcmpl-1", "osd", _result(), "draft"))
    assert r.choices[0].message.content == "4" and r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == 10 and r.model_extra["osd"]["alpha"] == 0.5
    first = ChatCompletionChunk.model_validate(chat_chunk("c", "osd", "", first=True))
    assert first.choices[0].delta.role == "assistant"
    mid = ChatCompletionChunk.model_validate(chat_chunk("c", "osd", "Hel"))
    assert mid.choices[0].delta.content == "Hel" and mid.choices[0].finish_reason is None
    last = ChatCompletionChunk.model_validate(chat_chunk("c", "osd", "lo", _result(), "draft"))
    assert last.choices[0].finish_reason == "stop" and last.usage.completion_tokens == 3
    assert openai.__version__
