"""What a request must pass before a replica reads it: key, media type, size, time, JSON.

The replica's endpoints (``osd.actors.server``) call :class:`HttpGuard` first; every
refusal is an :class:`~osd.actors.openai_api.ApiError` with an OpenAI-style body:

==========================================================  ======
Bearer key missing or not one of ``serve.api_keys``           401
``Content-Type`` not ``application/json`` (text/plain and form    415
bodies are what a web page may post cross-site without a CORS
preflight)
``Content-Length`` above ``serve.max_body_bytes`` (refused        413
before a byte is read), or the body grows past it while read
the body not complete within ``serve.body_timeout_s`` (e.g. a     408
``Content-Length`` larger than what is sent)
not UTF-8, not JSON, ``NaN``/``Infinity``, nesting deeper than    400
``serve.max_json_depth``, a string that is not valid Unicode (a
lone UTF-16 surrogate such as ``"\\ud800"``: it cannot be encoded
for the tokenizer)
==========================================================  ======

``/health`` is never guarded (load balancers probe it); ``/metrics`` needs a key only with
``serve.metrics_auth``. Keys compare in constant time (``hmac.compare_digest``); a caller is
named by its key's position (``key0``, ``key1`` …, ``anonymous`` without keys), never by
the key itself, in metrics and in the per-key record quota
(:class:`osd.actors.record_sink.KeyQuota`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any

from osd.actors.openai_api import ApiError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

__all__ = ["ANONYMOUS", "HttpGuard", "check_json", "error_response", "parse_json"]

ANONYMOUS = "anonymous"
_THREAD_BYTES = 64 * 1024  # bodies larger than this are parsed off the event loop


def error_response(err: ApiError) -> JSONResponse:
    """``err`` as the HTTP answer (a 401 says which scheme it wants)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(status_code=err.status, content=err.body(), headers=headers)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def check_json(doc: Any, max_depth: int) -> None:
    """Raise :class:`ApiError` when ``doc`` nests deeper than ``max_depth`` containers or
    holds a string (value or key) that does not encode as UTF-8.

    >>> check_json({"prompt": "ok", "stop": ["a"]}, max_depth=2)
    >>> check_json({"prompt": "\\ud800"}, max_depth=4)
    Traceback (most recent call last):
    ...
    osd.actors.openai_api.ApiError: the string at prompt is not valid Unicode (a lone UTF-16 surrogate?): 'utf-8' codec can't encode character '\\ud800' in position 0: surrogates not allowed
    """
    if isinstance(doc, str):
        doc = [doc]
    if not isinstance(doc, dict | list):
        return
    stack: list[tuple[Any, int, str]] = [(doc, 1, "")]
    while stack:  # iterative: a deep document must not exhaust Python's recursion
        node, depth, where = stack.pop()
        if depth > max_depth:
            raise ApiError(f"the JSON body nests deeper than {max_depth} levels (at {where})")
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            here = f"{where}.{ascii(key)[1:-1] if isinstance(key, str) else key}".lstrip(".")
            for s in (key, value):
                if isinstance(s, str) and not s.isascii():
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError as err:
                        raise ApiError(
                            f"the string at {here} is not valid Unicode (a lone UTF-16 "
                            f"surrogate?): {err}",
                            param=here.split(".")[0],
                        ) from None
            if isinstance(value, dict | list):
                stack.append((value, depth + 1, here))


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Bytes → a checked JSON document, or :class:`ApiError` (400) saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(f"the request body is not UTF-8: {err}") from None
    try:
        doc = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise ApiError(f"the JSON body nests deeper than {max_depth} levels") from None
    except ValueError as err:  # JSONDecodeError, NaN, integers past Python's digit limit
        raise ApiError(f"the request body is not valid JSON: {err}") from None
    check_json(doc, max_depth)
    return doc


class HttpGuard:
    """Checks of one replica; see the module docstring."""

    def __init__(
        self,
        api_keys: Sequence[str] = (),
        max_body_bytes: int = 1 << 20,
        body_timeout_s: float = 10.0,
        max_json_depth: int = 32,
        metrics_auth: bool = False,
        max_prompt_chars: int | None = None,
    ) -> None:
        self._keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_json_depth = max_json_depth
        self.metrics_auth = metrics_auth
        self.max_prompt_chars = max_prompt_chars  # None: set_context() derives it
        self.context = 0

    def set_context(self, context: int, tokenizer) -> None:
        """The model's context; without ``max_prompt_chars``, the longest prompt that can
        fit is ``context`` tokens of the vocabulary's longest token (in characters; a
        byte-level token's string has one character per byte, so never fewer)."""
        self.context = context
        if self.max_prompt_chars is None:
            self.max_prompt_chars = context * max(len(t) for t in tokenizer.get_vocab())

    def check_chars(self, n: int) -> None:
        """400 for a prompt of ``n`` characters that cannot fit, before tokenising it."""
        if self.max_prompt_chars is not None and n > self.max_prompt_chars:
            raise ApiError(
                f"the prompt has {n:,} characters; at most {self.max_prompt_chars:,} can fit "
                f"the model's context of {self.context} tokens (serve.max_prompt_chars)",
                param="prompt",
                code="context_length_exceeded",
            )

    @classmethod
    def from_config(cls, serve) -> HttpGuard:
        """From a :class:`osd.actors.config.ServeConfig`."""
        return cls(
            serve.keys,
            serve.max_body_bytes,
            serve.body_timeout_s,
            serve.max_json_depth,
            serve.metrics_auth,
            serve.max_prompt_chars,
        )

    def authorize(self, request: Request, metrics: bool = False) -> str:
        """The caller's name (``key<i>`` or ``anonymous``), or 401."""
        if not self._keys or (metrics and not self.metrics_auth):
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            given = token.strip().encode()
            found = [hmac.compare_digest(given, k) for k in self._keys]  # no early exit
            if any(found):
                return f"key{found.index(True)}"
        raise ApiError(
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            status=401,
            code="invalid_api_key",
        )

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, after media type, size, time and shape checks."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(
                f"Content-Type must be application/json, got {media or 'none'!r}",
                status=415,
            )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(f"Content-Length {length!r} is not a number of bytes")
            if int(length) > self.max_body_bytes:
                raise self._too_large(int(length))
        try:
            raw = await asyncio.wait_for(self._read(request), self.body_timeout_s)
        except TimeoutError:
            raise ApiError(
                f"the request body did not arrive within {self.body_timeout_s:g} s (is "
                "Content-Length larger than the body?)",
                status=408,
            ) from None
        except ClientDisconnect:
            raise ApiError("the client closed the connection before the body ended") from None
        if len(raw) > _THREAD_BYTES:  # keep the event loop (and /health) free
            return await run_in_threadpool(parse_json, raw, self.max_json_depth)
        return parse_json(raw, self.max_json_depth)

    async def _read(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size, read=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int, read: bool = False) -> ApiError:
        what = f"{size:,} bytes and more were sent" if read else f"Content-Length is {size:,}"
        return ApiError(
            f"the request body is too large: {what}; the limit is {self.max_body_bytes:,} bytes "
            "(serve.max_body_bytes)",
            status=413,
        )
