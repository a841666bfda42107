"""The OpenAI-compatible ``/v1/chat/completions`` protocol on top of ``/v1/completions``.

Pure functions, no server, like :mod:`osd.actors.openai_api` (whose validation of the
shared fields — ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``,
``stream``, ``n``, ``domain`` — this reuses). ``messages`` are rendered with the target
tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=True)``);
a target without one gets a 400 that says to use ``/v1/completions``.

Accepted messages: ``{"role": "system" | "developer" | "user" | "assistant", "content":
str | [{"type": "text", "text": str}, …]}`` (``developer`` is OpenAI's new name for
``system``; an optional ``name`` is ignored). Tools, images, audio, logprobs and response
formats other than text are refused with the reason. ``max_completion_tokens`` (OpenAI's
newer name) is accepted for ``max_tokens``.

Responses follow OpenAI's ``chat.completion`` / ``chat.completion.chunk`` shapes (the first
streamed chunk carries the role, the last the finish reason, ``usage`` and the ``osd``
acceptance block, as ``/v1/completions`` does).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from osd.actors.openai_api import ApiError, CompletionParams, osd_block, parse_completion

from osd.serving import RequestResult

__all__ = ["ChatParams", "chat_chunk", "chat_response", "new_chat_id", "parse_chat", "render_chat"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_MESSAGES = 256
_CHAT_UNSUPPORTED = {  # field: the value that is the same as leaving it out
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "logprobs": False,
    "top_logprobs": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_SHARED = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream"}
_SHARED |= {"n", "domain", "user", "logit_bias", "stream_options"}
_KNOWN = {"messages", "max_completion_tokens", "response_format", "metadata", "store"}
_KNOWN |= {"service_tier", "reasoning_effort"} | _SHARED | set(_CHAT_UNSUPPORTED)


@dataclass(frozen=True)
class ChatParams:
    """A validated chat request: the messages (not yet rendered) and the shared fields
    (``completion.prompt`` is unused)."""

    messages: list[dict[str, str]]
    completion: CompletionParams


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(
                    f"messages[{i}].content has a {p.get('type')!r} part; this server takes "
                    "text parts only",
                    param=f"messages[{i}].content",
                )
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(
        f"messages[{i}].content must be a string or a list of text parts, got "
        f"{type(value).__name__}",
        param=f"messages[{i}].content",
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError("messages must be a non-empty list of {role, content}", param="messages")
    if len(value) > MAX_MESSAGES:
        raise ApiError(f"messages has {len(value)} entries; at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                f"messages[{i}].role is {role!r}; this server takes {sorted(ROLES)} (no tools)",
                param=f"messages[{i}].role",
            )
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(
                f"messages[{i}] has fields {extra} this server does not support",
                param=f"messages[{i}]",
            )
        out.append({"role": ROLES[role], "content": _content(m.get("content"), i)})
    if out[-1]["role"] == "assistant":
        raise ApiError(
            "the last message is the assistant's; end with a user (or system) message",
            param="messages",
        )
    return out


def parse_chat(body: Any, served_model: str) -> ChatParams:
    """Validate a decoded JSON body; raise :class:`ApiError` (4xx) on anything wrong.

    >>> p = parse_chat({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}, "osd")
    >>> p.messages, p.completion.sampling.greedy, p.completion.max_tokens
    ([{'role': 'user', 'content': 'Hi'}], True, 16)
    """
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ApiError(f"unknown fields {unknown}; supported: {sorted(_KNOWN)}", param=unknown[0])
    for name, neutral in _CHAT_UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None, []):
            raise ApiError(f"{name} is not supported by this server; leave it out", param=name)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(
            "response_format: only {'type': 'text'} is supported", param="response_format"
        )
    if "messages" not in body:
        raise ApiError("messages is required", param="messages")
    messages = _messages(body["messages"])
    shared = {k: v for k, v in body.items() if k in _SHARED}
    mct = body.get("max_completion_tokens")
    if mct is not None:
        if shared.get("max_tokens") not in (None, mct):
            raise ApiError(
                "max_tokens and max_completion_tokens differ; send one",
                param="max_completion_tokens",
            )
        shared["max_tokens"] = mct
    params = parse_completion({**shared, "prompt": "."}, served_model)
    return ChatParams(messages, replace(params, prompt=""))


def render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: ``messages`` through the tokenizer's chat template, ending
    with the assistant's turn opened; a 400 when the model has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            "this model has no chat template, so /v1/chat/completions cannot format messages; "
            "send a prompt to /v1/completions instead",
            code="chat_template_missing",
        )
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # the template itself may refuse (e.g. role order)
        raise ApiError(
            f"the model's chat template refused the messages: {err}", param="messages"
        ) from err
    return tokenizer(text, add_special_tokens=False).input_ids


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_response(cid: str, model: str, result: RequestResult, drafter_id: str) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` body."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "osd": osd_block(result, drafter_id),
    }


def chat_chunk(
    cid: str,
    model: str,
    text: str | None,
    result: RequestResult | None = None,
    drafter_id: str = "",
    first: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``: the first carries the role, the last (``result``
    given) the finish reason, ``usage`` and ``osd``."""
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text:
        delta["content"] = text
    elif first:
        delta["content"] = ""
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if result is None else result.finish_reason,
            }
        ],
    }
    if result is not None:
        chunk["usage"] = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        chunk["osd"] = osd_block(result, drafter_id)
    return chunk
