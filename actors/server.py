"""The serving replica: a Ray Serve deployment with an OpenAI-compatible HTTP API.

Each replica owns an :class:`osd.serving.ServingLoop` (target + drafter, speculative
decoding with continuous batching, hot-swaps between steps) and wires it to:

- HTTP (FastAPI ingress): ``POST /v1/completions`` and ``POST /v1/chat/completions``
  (messages through the target's chat template; ``osd.actors.chat_api``; JSON or
  server-sent events),
  ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), and
  ``GET /v1/osd/stats`` (this replica's version, swaps and record counts);
- the buffer: a :class:`~osd.actors.record_sink.RecordSink` writes each finished
  request's distill record to Redis after the response is delivered;
- the registry actor: a thread polls the live version (a dict lookup, every
  ``registry.poll_s``), fetches new weights, checks their sha256 and shapes, and offers
  them to the loop, which adopts them before its next step; adoptions are reported back.
  A drafter without weights (``ngram``, ``none``) has nothing to follow: no poll. A
  drafter's versioned parts (an early-stop decision model, a mixture's adapters with
  ``versioning: adapter``) are followed the same way under ids of their own when trainers
  learn them.

The drafter is built by name (``cfg.drafter``, options ``k`` and ``serve.drafter_options``)
with :func:`osd.drafters.build_drafter`; the draft model is loaded only for drafters that
need one.

Bad requests get a 4xx with an OpenAI-style error body (``osd.actors.openai_api``) and
never reach the loop: API key, media type, body size and read time, JSON shape
(``osd.actors.http_guard``), then the fields, then the prompt's length in characters before
it is tokenised (on a worker thread, not the event loop, so ``/health`` keeps answering).
Records of finished requests pass a per-key quota (``KeyQuota``) on their way to the sink. :func:`app_builder` is the import path for ``serve run`` / KubeRay.
"""

import asyncio
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from osd.actors.chat_api import chat_chunk, chat_response, new_chat_id, parse_chat, render_chat
from osd.actors.config import REGISTRY_ACTOR, ClusterConfig, runtime_env
from osd.actors.http_guard import ANONYMOUS, HttpGuard, error_response
from osd.actors.metrics import CONTENT_TYPE_LATEST, ReplicaMetrics
from osd.actors.openai_api import (
    ApiError,
    CompletionParams,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_completion,
    sse,
)
from osd.actors.record_sink import KeyQuota, RecordSink
from ray import serve

from osd.distill.collect import RecordCollector
from osd.distill.record import DistillRecord, LogConfig
from osd.drafters import build_drafter, drafter_spec
from osd.models import load_model, load_tokenizer
from osd.registry import spec_of
from osd.serving import Delta, ServeRequest, ServingLoop, SwapEvent
from osd.serving.follow import VersionFollower
from osd.specdec import threads
from osd.specdec.controller import SpeculationController
from osd.specdec.engine import SpeculativeDecoder

__all__ = ["OSDServer", "api", "app_builder", "build_app", "build_decoder"]

log = logging.getLogger(__name__)

api = FastAPI(title="OSD", description="Speculative decoding with online-distilled drafts.")


def _replica_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return f"{socket.gethostname()}-{os.getpid()}"


def build_decoder(cfg: ClusterConfig, device: str | torch.device = "cpu") -> SpeculativeDecoder:
    """The replica's engine: the target and the drafter named ``cfg.drafter``, built by name
    with its options (``k``, ``serve.drafter_options``); the draft model is loaded only
    for a drafter that needs one."""
    target = load_model(cfg.target, device)
    draft = load_model(cfg.draft, device) if drafter_spec(cfg.drafter).needs_draft else None
    options = cfg.serve.drafter_config(cfg.drafter, cfg.k)
    drafter = build_drafter(cfg.drafter, target, draft, **options)
    controller = None
    if cfg.serve.load_aware:  # depth per step from measured costs and the batch (0 = off)
        controller = SpeculationController(k_max=max(1, cfg.k))
    return SpeculativeDecoder(target, drafter, load_tokenizer(cfg.target), controller=controller)


def _build(cfg: ClusterConfig, device) -> tuple[SpeculativeDecoder, dict]:
    """The engine and the specs of the drafter's weights (``None``) and of each versioned
    part's (by name)."""
    decoder = build_decoder(cfg, device)
    specs = {None: spec_of(decoder.drafter.state_dict())}
    for name, part in decoder.drafter.parts().items():
        specs[name] = spec_of(part.module.state_dict())
    return decoder, specs


@serve.deployment(name="OSDServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class OSDServer:
    """One serving replica; see the module docstring."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        from osd.buffer import RedisStreamBuffer
        from osd.buffer.redis_stream import redis_client

        cfg = ClusterConfig.from_dict(config)
        torch.set_num_threads(cfg.serve.threads)
        self.replica = _replica_id()
        buffer = RedisStreamBuffer(
            redis_client(cfg.redis_url), consumer=self.replica, maxlen=cfg.buffer.maxlen
        )
        self._start(cfg, buffer)
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=cfg.namespace)
        if self.reference:  # a drafter with weights: follow the registry's versions
            self._poller = threading.Thread(target=self._poll, name="osd-version-poll", daemon=True)
            self._poller.start()

    def _start(self, cfg: ClusterConfig, buffer) -> None:
        """Everything but the registry: engine, loop, sink, HTTP guard (tests call this
        without Ray)."""
        self.cfg = cfg
        device = "cuda" if cfg.serve.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.started = int(time.time())
        # built apart, with the weights' specs (copies of the weights): the serving loop's
        # thread is then the process's one OpenMP team (osd/specdec/threads.py)
        decoder, specs = threads.apart(_build, cfg, device)
        self.tokenizer = decoder.tokenizer
        self.drafter_options = cfg.serve.drafter_config(cfg.drafter, cfg.k)
        self.reference = specs[None]
        self.context = decoder.context
        self.vocab = int(decoder.target.config.vocab_size)
        self.metrics = ReplicaMetrics(cfg.model_name, cfg.drafter_id)
        self.sink = RecordSink(
            buffer,
            cfg.drafter_id,
            cfg.buffer.holdout_every,
            on_write=self.metrics.observe_record,
            holdout_seed=cfg.buffer.holdout_seed,
        )
        self.guard = HttpGuard.from_config(cfg.serve)
        self.guard.set_context(self.context, self.tokenizer)
        self.quota = KeyQuota(cfg.buffer.key_max_share, cfg.buffer.key_window)
        self._callers: OrderedDict[str, str] = OrderedDict()  # request id -> key name
        self._callers_lock = threading.Lock()
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="osd-tokenize")
        log_cfg = LogConfig(
            mode=cfg.buffer.log_mode,
            k=cfg.buffer.topk,
            rate=cfg.buffer.log_rate,
            hidden=decoder.drafter.needs_hidden_states,  # head drafters train on them
        )
        self.loop = ServingLoop(
            decoder,
            drafter_id=cfg.drafter_id,
            collector=RecordCollector(log_cfg),
            on_record=self._on_record,
            on_swap=self._on_swap,
            max_batch=cfg.serve.max_batch,
        ).start()
        threads.side()  # the loop's thread computes; torch work here must not start a team
        self._stop = threading.Event()
        self.follower = VersionFollower(self.loop, self.reference, cfg.drafter_id)
        # the drafter's versioned parts (decision model, per-adapter mixture) follow ids of
        # their own when trainers learn them
        self.part_followers: dict[str, VersionFollower] = {}
        if cfg.trainer.count > 0:
            if decoder.drafter.stop is not None:
                decoder.drafter.stop.learn = False  # it serves the registry's versions only
            for name, part in decoder.drafter.parts().items():
                self.part_followers[name] = VersionFollower(
                    self.loop.part(name), specs[name], cfg.drafter_id + part.suffix
                )
        log.info(
            "replica %s up on %s (context %d, drafter %s %s, max batch %d)",
            self.replica,
            device,
            self.context,
            cfg.drafter,
            self.drafter_options,
            self.loop.max_batch,
        )

    def _on_record(self, record: DistillRecord) -> None:
        """A finished request's record: to the sink unless its key is over its share."""
        with self._callers_lock:
            key = self._callers.pop(record.request_id, ANONYMOUS)
        if self.quota.admit(key):
            self.sink.submit(record)
        else:
            self.metrics.observe_quota_drop(key)

    # -- versions --------------------------------------------------------------------------
    def _poll(self) -> None:
        """Follow the registry's live version by its ref (epoch, version, checksum): fetch,
        verify and offer new weights; upload ours when the registry lost them
        (:class:`~osd.serving.follow.VersionFollower`)."""
        threads.side()  # weight checks on one thread: the loop's team keeps the cores
        backoff = self.cfg.registry.poll_s
        followers = [
            (f, self._registry_calls(f.what))
            for f in (self.follower, *self.part_followers.values())
        ]
        while not self._stop.wait(backoff):
            try:
                for follower, (poll, fetch, upload) in followers:
                    follower.step(poll, fetch, upload)
                backoff = self.cfg.registry.poll_s
            except Exception as err:  # registry restarting, network: keep serving, retry
                log.warning("version poll failed (%s); serving v%d", err, self.loop.version)
                backoff = min(max(2 * backoff, 0.5), 10.0)

    def _registry_calls(self, did: str):
        """The follower's three registry calls for the versioned id ``did``."""
        import ray

        reg = self.registry

        def poll(serving):
            answer = ray.get(reg.poll.remote(did, serving), timeout=30)
            if did == self.cfg.drafter_id:
                self.metrics.observe_registry(answer)
            return answer

        def fetch(version):
            return ray.get(reg.serving_weights.remote(did, version), timeout=120)

        def upload(data, served):
            return ray.get(reg.recover.remote(did, data, served, self.replica), timeout=120)

        return poll, fetch, upload

    def _on_swap(self, event: SwapEvent) -> None:
        if event.part != "drafter":  # a versioned part: its own id's adoption, no swap metric
            follower = self.part_followers.get(event.part)
            if follower is not None:
                ref = follower.on_swap(event)
                self.registry.report_adoption.remote(
                    self.replica, event.version, event.pause_s, event.waited_s, ref, follower.what
                )
            return
        self.metrics.observe_swap(event)
        ref = self.follower.on_swap(event)
        self.registry.report_adoption.remote(
            self.replica, event.version, event.pause_s, event.waited_s, ref
        )

    def check_health(self) -> None:
        """Serve's health check: a replica whose loop died is restarted."""
        if not self.loop.alive:
            raise RuntimeError("the serving loop thread is not running")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self.loop.stop(timeout_s=5)
            self.sink.close(timeout_s=5)

    # -- HTTP ------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        running, waiting = self.loop.load
        body = {
            "status": "ok" if self.loop.alive else "error",
            "replica": self.replica,
            "drafter_version": self.loop.version,
            "running": running,
            "waiting": waiting,
        }
        return JSONResponse(status_code=200 if self.loop.alive else 503, content=body)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        if (denied := self._deny(request)) is not None:
            return denied
        card = {
            "id": self.cfg.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "osd",
            "root": self.cfg.target,
            "max_model_len": self.context,
            "osd": {
                "drafter": self.cfg.drafter,
                "drafter_options": self.drafter_options,
                "draft": self.cfg.draft if drafter_spec(self.cfg.drafter).needs_draft else None,
                "drafter_id": self.cfg.drafter_id,
                "drafter_version": self.loop.version,
                "k": self.cfg.k,
                "max_batch": self.loop.max_batch,
                "adapters": getattr(self.loop.decoder.drafter, "domains", None),  # a mixture's
            },
        }
        return {"object": "list", "data": [card]}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if (denied := self._deny(request, metrics=True)) is not None:
            return denied
        running, waiting = self.loop.load
        self.metrics.set_load(running, waiting, self.loop.version)
        return Response(content=self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/osd/stats")
    async def stats(self, request: Request) -> Any:
        if (denied := self._deny(request)) is not None:
            return denied
        return {
            "replica": self.replica,
            "drafter_version": self.loop.version,
            "finished": self.loop.finished,
            "failed": self.loop.failed,
            "records_written": self.sink.written,
            "records_dropped": self.sink.dropped,
            "records_backlog": self.sink.backlog,
            "records_quota_dropped": dict(self.quota.dropped),
            "serving": self.follower.serving,  # the registry ref: (epoch, version, checksum)
            "swaps": [
                {
                    "version": s.version,
                    "pause_ms": 1e3 * s.pause_s,
                    "in_flight": s.in_flight,
                    "part": s.part,
                }
                for s in self.loop.swaps
            ],
            "parts": {  # versioned parts: the version adopted and the registry ref
                name: {"version": self.loop.part(name).version, "serving": f.serving}
                for name, f in self.part_followers.items()
            },
        }

    def _deny(self, request: Request, metrics: bool = False) -> JSONResponse | None:
        try:
            self.guard.authorize(request, metrics)
        except ApiError as err:
            return self._reject(err)
        return None

    def _reject(self, err: ApiError) -> JSONResponse:
        self.metrics.observe_rejected(err.status)
        return error_response(err)

    async def _off_loop(self, fn, *args):
        """``fn(*args)`` on the tokenising thread (one: HF tokenizers are not re-entrant)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, *args)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            key = self.guard.authorize(request)
            body = await self.guard.read_json(request)
            params = parse_completion(body, self.cfg.model_name)
            serve_req = await self._off_loop(self._to_request, params)
        except ApiError as err:
            return self._reject(err)
        return await self._serve(
            serve_req, key, params.stream, completion_chunk, completion_response
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """Messages through the target's chat template, then as ``/v1/completions``."""
        try:
            key = self.guard.authorize(request)
            body = await self.guard.read_json(request)
            chat = parse_chat(body, self.cfg.model_name)
            self.guard.check_chars(sum(len(m["content"]) for m in chat.messages))
            ids = await self._off_loop(render_chat, self.tokenizer, chat.messages)
            serve_req = await self._off_loop(self._to_request, replace(chat.completion, prompt=ids))
        except ApiError as err:
            return self._reject(err)
        serve_req = replace(serve_req, request_id=new_chat_id())
        first = [True]

        def chunk(cid, model, text, result=None, drafter_id=""):
            doc = chat_chunk(cid, model, text, result, drafter_id, first=first[0])
            first[0] = False
            return doc

        return await self._serve(serve_req, key, chat.completion.stream, chunk, chat_response)

    async def _serve(
        self, serve_req: ServeRequest, key: str, stream: bool, chunk, response
    ) -> Response:
        """Submit to the loop; answer with ``response(...)`` or stream ``chunk(...)``s."""
        cid = serve_req.request_id
        with self._callers_lock:  # for the record quota; bounded (a request may log nothing)
            self._callers[cid] = key
            while len(self._callers) > 4096:
                self._callers.popitem(last=False)
        events: asyncio.Queue[Delta] = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        self.loop.submit(serve_req, lambda d: aloop.call_soon_threadsafe(events.put_nowait, d))
        if stream:
            return StreamingResponse(
                self._stream(cid, events, chunk), media_type="text/event-stream"
            )
        try:
            while True:
                delta = await events.get()
                if delta.final:
                    break
        except asyncio.CancelledError:  # client went away
            self.loop.cancel(cid)
            raise
        if delta.error is not None:
            return self._failure(delta.error)
        self.metrics.observe_result(delta.result)
        return JSONResponse(response(cid, self.cfg.model_name, delta.result, self.cfg.drafter_id))

    async def _stream(self, cid: str, events: asyncio.Queue[Delta], chunk=completion_chunk):
        model, finished = self.cfg.model_name, False
        try:
            while True:
                delta = await events.get()
                if delta.error is not None:
                    yield sse(self._failure_body(delta.error))
                    break
                if delta.result is not None:
                    self.metrics.observe_result(delta.result)
                    yield sse(chunk(cid, model, delta.text, delta.result, self.cfg.drafter_id))
                    break
                yield sse(chunk(cid, model, delta.text))
            finished = True
            yield sse("[DONE]")
        finally:
            if not finished:  # the client disconnected mid-stream
                self.loop.cancel(cid)

    def _to_request(self, params: CompletionParams) -> ServeRequest:
        """Tokenise and check the prompt against the context and vocabulary (→ 400)."""
        if isinstance(params.prompt, str):
            self.guard.check_chars(len(params.prompt))
            ids = self.tokenizer(params.prompt, add_special_tokens=False).input_ids
        else:
            ids = params.prompt
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(
                    f"prompt has token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}",
                    param="prompt",
                )
        if not ids:
            raise ApiError("prompt is empty after tokenisation", param="prompt")
        try:  # a mixture drafter routes by the tag: one that names no adapter is refused
            self.loop.decoder.drafter.check_domain(params.domain)
        except ValueError as err:
            raise ApiError(str(err), param="domain") from None
        if len(ids) + params.max_tokens > self.context:
            raise ApiError(
                f"prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}; the "
                f"model's context is {self.context} tokens: shorten the prompt or lower "
                "max_tokens",
                param="prompt" if len(ids) >= self.context else "max_tokens",
                code="context_length_exceeded",
            )
        return ServeRequest(
            request_id=new_id(),
            prompt_ids=list(ids),
            max_new_tokens=params.max_tokens,
            sampling=params.sampling,
            stop=params.stop,
            domain=params.domain,
        )

    def _failure_body(self, err: BaseException) -> dict[str, Any]:
        self.metrics.observe_failure()
        if isinstance(err, ValueError):
            return error_body(str(err))
        return error_body(f"internal error: {type(err).__name__}: {err}", "server_error")

    def _failure(self, err: BaseException) -> JSONResponse:
        status = 400 if isinstance(err, ValueError) else 500
        return JSONResponse(status_code=status, content=self._failure_body(err))


def build_app(cfg: ClusterConfig):
    """The Serve application for ``cfg`` (replicas, resources, the config itself)."""
    return OSDServer.options(
        num_replicas=cfg.serve.replicas,
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": cfg.serve.num_cpus,
            "num_gpus": cfg.serve.num_gpus,
            "resources": cfg.serve.resources,
            "runtime_env": runtime_env(),
        },
    ).bind(cfg.to_dict())


def app_builder(args: dict[str, Any]):
    """``serve run osd.actors.server:app_builder`` / KubeRay ``import_path``: ``args`` is a
    :class:`ClusterConfig` dict; the registry and trainer actors are created if missing."""
    from osd.actors.cluster import ensure_backend

    cfg = ClusterConfig.from_dict(args)
    ensure_backend(cfg, detached=True)
    return build_app(cfg)
