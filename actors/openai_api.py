"""The OpenAI-compatible ``/v1/completions`` protocol: validate requests, shape responses.

Pure functions, no server: the Serve replica (``osd.actors.server``) calls them, tests
call them directly. Errors follow OpenAI's shape with a message that says what to fix::

    {"error": {"message": "max_tokens must be an int >= 1, got 0",
               "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Supported fields: ``model``, ``prompt`` (a string, a list of token ids, or a one-element
list of either), ``max_tokens`` (default 16), ``temperature`` (default 1, as OpenAI; 0 is
greedy, and so is anything below ``GREEDY_EPS`` = 1e-5, as in vLLM: dividing logits by a
tiny T overflows), ``top_p``, ``top_k`` (vLLM's extension), ``stop`` (string or ≤ 4 strings),
``seed`` (0 ≤ seed < 2**64), ``stream``, ``n`` (only 1), ``user`` (ignored) and ``domain``
(OSD's extension: a tag stored with the request's distill record). Fields this server
cannot honour (``logprobs``, ``echo``, ``best_of`` > 1, ``suffix``, penalties ≠ 0, a
non-empty ``logit_bias``) are rejected, not silently ignored; so are unknown fields. A response carries the usual ``usage`` block and an ``osd`` block:
the drafter id and version and the request's acceptance statistics.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from osd.serving import RequestResult
from osd.specdec.sampling import SamplingParams

__all__ = [
    "GREEDY_EPS",
    "ApiError",
    "CompletionParams",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_completion",
    "sse",
]

MAX_STOP = 4
DEFAULT_MAX_TOKENS = 16
GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
_IGNORED = {"user", "stream_options"}
_UNSUPPORTED = {  # field: the value that is the same as leaving it out
    "logit_bias": {},
    "logprobs": None,
    "echo": False,
    "best_of": 1,
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed"}
_KNOWN |= {"stream", "n", "domain"} | _IGNORED | set(_UNSUPPORTED)


class ApiError(Exception):
    """A client error: HTTP ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = (
            message,
            status,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionParams:
    """A validated completion request (prompt not yet tokenised when it is text)."""

    model: str
    prompt: str | list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    domain: str | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # ["text"] or [[1, 2, 3]]: one prompt
    if isinstance(value, str):
        if not value:
            raise ApiError("prompt is empty; send at least one character", param="prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return [int(t) for t in value]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(t, str) for t in value):
        raise ApiError(
            f"prompt holds {len(value)} prompts; this server takes one per request",
            param="prompt",
        )
    raise ApiError(
        f"prompt must be a string or a list of token ids, got {type(value).__name__}",
        param="prompt",
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ApiError(
            "stop must be a non-empty string or a list of non-empty strings", param="stop"
        )
    if len(value) > MAX_STOP:
        raise ApiError(f"stop has {len(value)} strings; at most {MAX_STOP}", param="stop")
    return tuple(value)


def parse_completion(body: Any, served_model: str) -> CompletionParams:
    """Validate a decoded JSON body; raise :class:`ApiError` (4xx) on anything wrong.

    >>> p = parse_completion({"prompt": "2 + 2 =", "max_tokens": 8, "temperature": 0}, "osd")
    >>> p.max_tokens, p.sampling.greedy, p.stream
    (8, True, False)
    >>> parse_completion({"prompt": "x", "max_tokens": 0}, "osd")
    Traceback (most recent call last):
    ...
    osd.actors.openai_api.ApiError: max_tokens must be an int >= 1, got 0
    """
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ApiError(f"unknown fields {unknown}; supported: {sorted(_KNOWN)}", param=unknown[0])
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None):
            raise ApiError(f"{name} is not supported by this server; leave it out", param=name)
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise ApiError(f"model must be a string, got {type(model).__name__}", param="model")
    if model != served_model:
        raise ApiError(
            f"model {model!r} does not exist; this server serves {served_model!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    if "prompt" not in body:
        raise ApiError("prompt is required", param="prompt")
    prompt = _prompt(body["prompt"])
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(f"max_tokens must be an int >= 1, got {max_tokens!r}", param="max_tokens")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_num(temperature) or not 0 <= temperature <= 2:
        raise ApiError(
            f"temperature must be a number in [0, 2] (0 is greedy), got {temperature!r}",
            param="temperature",
        )
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    top_k = 0 if body.get("top_k") in (None, -1) else body["top_k"]  # vLLM: -1 is off
    if temperature < GREEDY_EPS:
        temperature = 0.0  # greedy: logits / T would overflow to inf, then NaN
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**64):
        raise ApiError(f"seed must be an int in [0, 2**64), got {seed!r}", param="seed")
    try:
        sampling = SamplingParams(float(temperature), top_k, top_p, seed)
    except ValueError as err:
        param = next((p for p in ("top_p", "top_k") if p in str(err)), None)
        raise ApiError(str(err), param=param) from None
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise ApiError(f"n must be 1 (one completion per request), got {n!r}", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false, got {stream!r}", param="stream")
    domain = body.get("domain")
    if domain is not None and (not isinstance(domain, str) or len(domain) > 64):
        raise ApiError("domain must be a string of at most 64 characters", param="domain")
    return CompletionParams(
        model, prompt, max_tokens, sampling, _stop(body.get("stop")), stream, domain
    )


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def _usage(result: RequestResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def osd_block(result: RequestResult, drafter_id: str) -> dict[str, Any]:
    """The drafter version and the request's acceptance statistics (DESIGN §7)."""
    s = result.stats
    adapter = {} if result.adapter is None else {"adapter": result.adapter}  # a mixture's
    return {
        **adapter,
        "drafter_id": drafter_id,
        "drafter_version": result.version_end,
        "drafter_version_start": result.version_start,
        "alpha": s.alpha,
        "alpha_per_pos": s.alpha_per_pos,
        "tau": s.tau,
        "proposed": s.proposed,
        "accepted": s.accepted,
        "target_steps": s.steps,
        "queue_s": result.queue_s,
        "latency_s": result.latency_s,
    }


def completion_response(
    cid: str, model: str, result: RequestResult, drafter_id: str
) -> dict[str, Any]:
    """The non-streaming response body: the final chunk's shape, carrying the whole text."""
    return completion_chunk(cid, model, result.text, result, drafter_id)


def completion_chunk(
    cid: str,
    model: str,
    text: str,
    result: RequestResult | None = None,
    drafter_id: str = "",
) -> dict[str, Any]:
    """One streamed chunk; the last (``result`` given) has the finish reason, usage, osd."""
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": None if result is None else result.finish_reason,
            }
        ],
    }
    if result is not None:
        chunk["usage"] = _usage(result)
        chunk["osd"] = osd_block(result, drafter_id)
    return chunk


def sse(doc: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (or ``data: [DONE]\\n\\n``)."""
    payload = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
