"""The registry actor: versions of the drafter, the promotion gate, the live pointer.

A named, restartable Ray actor that owns an :class:`osd.registry.Registry`. Its store is
Redis (:class:`~osd.actors.redis_store.RedisStore`, default) or a directory
(:class:`~osd.registry.DiskStore`), so a restarted actor has every version and the live
pointer. The flow of one version:

1. a trainer calls :meth:`RegistryActor.publish` with safetensors bytes (and, for a LoRA
   adapter, its spec);
2. the :class:`~osd.registry.Promoter` — the same flow ``osd online`` runs — validates
   and stores it, scores the candidate's and the live version's students (the drafter's,
   built by name) on the held-out records (``<drafter_id>.holdout``, which replicas fill
   and trainers never read) without running the target, and promotes or rejects;
3. replicas poll :meth:`live_version` (a dict lookup), fetch :meth:`serving_weights`
   (full weights; LoRA adapters merged onto their base version here, once) and adopt them
   between decode steps, then :meth:`report_adoption` with their pause.

Hardening (issue 13): replicas :meth:`RegistryActor.poll` with the ref they serve
``(epoch, version, checksum)`` and get keep / adopt / upload (:mod:`osd.registry.epochs`);
a maintenance thread notices a store emptied or replaced (a new epoch: the replicas' weights
become its live version through :meth:`RegistryActor.recover`, never a silent rollback), feeds
the held-out records' live acceptance to the post-swap watch and rolls a version back when
it serves worse than its predecessor. Gate decisions and adoptions go into the registry's
persisted history, so a restarted actor reports them.

A drafter with nothing to train (``ngram``, ``none``) has no versions: the actor then holds
an empty registry, reports live version 0 and refuses publishes. A drafter's **versioned
parts** (:meth:`osd.drafters.base.Drafter.parts`), when trainers run, have ids of their own
— ``<drafter_id>-stop`` for an early-stop decision model (``serve.drafter_options.
early_stop``; :mod:`osd.distill.decision`), ``<drafter_id>-<domain>`` per adapter of a
mixture with ``versioning: adapter`` — published by the trainers, gated on the same
held-out records (each part's student scores the records it predicts) and followed by the
replicas like the drafter's weights.

Runs threaded (``max_concurrency``): polls are answered while a gate evaluates; publishes
are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

import torch
from osd.actors.config import ClusterConfig
from osd.actors.record_sink import holdout_stream

from osd.buffer import RedisStreamBuffer
from osd.buffer.base import Outage
from osd.distill.record import RecordError, decode
from osd.drafters import build_drafter, build_student, drafter_spec
from osd.models import load_model
from osd.registry import (
    DiskStore,
    PostSwapWatch,
    Promoter,
    PromotionGate,
    Registry,
    checksum,
    weights_to_bytes,
)

__all__ = ["RegistryActor"]

log = logging.getLogger(__name__)


class RegistryActor:
    """Owns the registry, the gate's held-out records and the replicas' adoption reports."""

    def __init__(self, config: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.cfg = cfg = ClusterConfig.from_dict(config)
        import redis

        from osd.buffer.redis_stream import redis_client

        url = cfg.redis_url
        if url is None:
            raise ValueError("the registry actor needs a Redis URL (buffer.url or $REDIS_URL)")
        self.client = redis_client(url)
        if cfg.registry.store == "redis":
            from osd.actors.redis_store import RedisStore

            store = RedisStore(self.client)
        else:
            store = DiskStore(cfg.registry.store)
        self.registry = Registry(store)
        self.drafter_id = cfg.drafter_id
        # the drafter's student (by name) is what the gate scores and the registry versions;
        # beside it, one per versioned part when trainers learn them (draft-stop, draft-sql)
        self.promoter: Promoter | None = None
        self.promoters: dict[str, Promoter] = {}
        if drafter_spec(cfg.drafter).trainable:
            spec = drafter_spec(cfg.drafter)  # head drafters read the target's states
            drafter = build_drafter(
                cfg.drafter,
                None if spec.needs_draft else load_model(cfg.target, "cpu"),
                load_model(cfg.draft, "cpu") if spec.needs_draft else None,
                **cfg.serve.drafter_config(cfg.drafter, cfg.k),  # as the replicas build it
            )
            self.promoter = Promoter(
                self.registry,
                cfg.drafter_id,
                build_student(cfg.drafter, drafter),
                PromotionGate(cfg.registry.gate_margin, cfg.registry.gate_min_records),
                provenance={"source": cfg.draft},
                watch=None
                if cfg.registry.watch_margin is None
                else PostSwapWatch(cfg.registry.watch_margin, cfg.registry.watch_min_tokens),
            )
            self.promoters[cfg.drafter_id] = self.promoter
            if cfg.trainer.count > 0:  # trainers learn the parts: they are versioned here
                vocab = self.promoter.base.vocab_size
                for name, part in drafter.parts().items():
                    did = cfg.drafter_id + part.suffix
                    self.promoters[did] = Promoter(
                        self.registry,
                        did,
                        part.student(vocab),  # the registry actor's own drafter: no copy
                        PromotionGate(cfg.registry.gate_margin, cfg.registry.gate_min_records),
                        provenance={"source": cfg.draft, "part": name},
                    )
        self.holdout_buffer = RedisStreamBuffer(
            self.client, group="gate", consumer="registry", maxlen=cfg.buffer.maxlen
        )
        self.holdout: deque = deque(maxlen=cfg.registry.holdout_size)
        # a restarted actor refills its window from the stream: rewind the gate's group
        with contextlib.suppress(redis.ResponseError):
            key = self.holdout_buffer.key(holdout_stream(cfg.drafter_id))
            self.client.xgroup_setid(key, "gate", id="0")
        self._publish_lock = threading.Lock()
        self._lock = threading.Lock()
        self._serving_cache: dict[tuple[str, int], tuple[bytes, str]] = {}
        self.decisions: list[dict[str, Any]] = []
        self.adoptions: list[dict[str, Any]] = []
        self.outage = Outage("registry: Redis", log)
        self._watch_summary: dict[str, Any] = {"rollbacks": 0, "last": None}
        if self.promoter is not None:
            self._summarise_watch()
        self._stop = threading.Event()
        live = self.live_version(cfg.drafter_id)
        log.info("registry up: %s (%s) live v%d", cfg.drafter_id, cfg.drafter, live)
        if self.promoter is not None:
            self._maintainer = threading.Thread(
                target=self._maintain, name="osd-registry-maintain", daemon=True
            )
            self._maintainer.start()

    # -- epochs and the post-swap watch (a thread) -------------------------------------------
    def _maintain(self) -> None:
        while not self._stop.wait(self.cfg.registry.maintain_s):
            try:
                self.maintain()
                self.outage.ok()
            except Exception as err:  # Redis away: one line per outage, retried
                self.outage.failed(err)

    def maintain(self) -> dict[str, Any] | None:
        """One round: notice an emptied / replaced store, feed and check the watch."""
        promoter = self._promoter(self.drafter_id)
        for each in self.promoters.values():
            if each.sync() != "ok":
                with self._lock:
                    self._serving_cache.clear()
        if self._publish_lock.acquire(blocking=False):  # not during a gate evaluation
            try:
                self._refresh_holdout(self.drafter_id)
                keep = self.cfg.registry.keep_versions
                counts = [len(self.registry.versions(i)) for i in self.promoters]
                if keep is not None and max(counts) > keep:
                    self.registry.gc(keep)  # bounded store: the newest `keep` + protected
            finally:
                self._publish_lock.release()
        verdict = promoter.check_watch()
        self._summarise_watch()
        return verdict

    # -- reads (cheap: polled by replicas) -----------------------------------------------
    def live_version(self, drafter_id: str) -> int:
        if self.promoter is None:
            return 0
        return self.registry.live_version(drafter_id)

    def versions(self, drafter_id: str) -> list[dict[str, Any]]:
        if self.promoter is None:
            return []
        return [v.to_dict() for v in self.registry.versions(drafter_id)]

    def raw_weights(self, drafter_id: str, version: int | None = None) -> dict[str, Any]:
        """What a restarting trainer resumes from: the ``version`` (default: live), its
        ``kind``, its stored bytes (``data``) and, for a LoRA adapter, its spec (``lora``)."""
        self._promoter(drafter_id)
        if version is None:
            info = self.registry.live(drafter_id)
        else:
            info = self.registry.info(drafter_id, version)
        data = self.registry.weight_bytes(drafter_id, info.version)
        return {"version": info.version, "kind": info.kind, "data": data, "lora": info.lora}

    def serving_weights(self, drafter_id: str, version: int) -> tuple[bytes, str]:
        """Full weights of ``version`` (this epoch) as safetensors bytes and their sha256."""
        promoter = self._promoter(drafter_id)
        key = (drafter_id, self.registry.epoch(drafter_id), version)
        with self._lock:
            hit = self._serving_cache.get(key)
        if hit is not None:
            return hit
        data = weights_to_bytes(promoter.weights(version))
        out = (data, checksum(data))
        with self._lock:
            self._serving_cache = {
                k: d
                for k, d in self._serving_cache.items()
                if k[0] != drafter_id or (k[1] == key[1] and k[2] > version - 3)
            }
            self._serving_cache[key] = out
        return out

    def poll(self, drafter_id: str, serving: dict[str, Any] | None) -> dict[str, Any]:
        """A replica's poll with the ref it serves: the live ref (its checksum: of the full
        weights :meth:`serving_weights` sends), ``action`` keep / adopt / upload, and the
        post-swap watch's rollbacks and last verdict (for the replicas' ``/metrics``)."""
        promoter = self._promoter(drafter_id)
        answer = self.registry.resolve(drafter_id, serving)
        if answer["action"] != "upload":
            answer["checksum"] = self.serving_weights(drafter_id, answer["version"])[1]
            if serving is not None and serving == {k: answer[k] for k in serving}:
                answer["action"] = "keep"
        answer["watch"] = self._watch_summary if promoter.watch is not None else None
        return answer

    def _summarise_watch(self) -> None:
        """The post-swap watch's rollbacks and last verdict, from the history (kept for
        the polls, refreshed by :meth:`maintain`)."""
        events = self.registry.history(self.drafter_id)
        rollbacks = [
            e for e in events if e["kind"] == "rollback" and e.get("by") == "post-swap watch"
        ]
        last = None
        for e in reversed(events):
            if e["kind"] == "watch" or e in rollbacks:
                last = e if e["kind"] == "watch" else e["evaluation"].get("watch")
                break
        self._watch_summary = {"rollbacks": len(rollbacks), "last": last}

    def recover(
        self, drafter_id: str, data: bytes, served: dict[str, Any], replica: str
    ) -> dict[str, Any]:
        """A replica's weights, when the store lost the version it serves: they become the
        live version of this epoch (validated; checksum must match ``served``)."""
        self._promoter(drafter_id)
        with self._publish_lock:
            ref = self.registry.recover(drafter_id, data, served, replica)
        with self._lock:
            self._serving_cache.clear()
        return ref

    # -- publish → gate → promote --------------------------------------------------------
    def publish(
        self,
        drafter_id: str,
        data: bytes,
        kind: str,
        provenance: dict[str, Any],
        digest: str | None = None,
        lora: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Validate, store, gate and promote or reject one candidate; returns the decision."""
        promoter = self._promoter(drafter_id)
        with self._publish_lock:
            self._refresh_holdout(self.drafter_id)  # the drafter's records gate both models
            outcome = promoter.submit(
                data, kind, provenance, list(self.holdout), lora=lora, checksum=digest
            )
            out = {**outcome.to_dict(), "time": time.time()}
            self.decisions.append(out)
            with contextlib.suppress(Exception):  # the history is best effort
                self.registry.record_event(drafter_id, "decision", **outcome.to_dict())
        return out

    def _promoter(self, drafter_id: str) -> Promoter:
        if drafter_id != self.drafter_id and drafter_id not in self.promoters:
            raise ValueError(f"this registry serves {self.drafter_id!r}, not {drafter_id!r}")
        if self.promoter is None:
            raise ValueError(f"drafter {self.cfg.drafter!r} has no weights to version")
        return self.promoters[drafter_id]

    def _refresh_holdout(self, drafter_id: str) -> None:
        """Pull new held-out records (the gate's consumer group) into the recent window."""
        stream = holdout_stream(drafter_id)
        vocab = None if self.promoter is None else self.promoter.base.vocab_size
        while True:
            entries = self.holdout_buffer.read(stream, count=64)
            if not entries:
                return
            fresh = []
            for e in entries:
                try:
                    fresh.append(decode(e.data, vocab))
                except RecordError as err:
                    log.warning("dropping malformed held-out record %s: %s", e.id, err)
            self.holdout.extend(fresh)
            if self.promoter is not None:  # their live acceptance, for the post-swap watch
                self.promoter.observe_live(fresh)
            self.holdout_buffer.ack(stream, [e.id for e in entries])

    def rollback(self, drafter_id: str, reason: str = "rolled back by operator") -> dict[str, Any]:
        """Put the previously live version back; replicas adopt it at their next poll."""
        with self._publish_lock:
            info = self.registry.rollback(drafter_id, reason)
        return info.to_dict()

    def history(self, drafter_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The registry's persisted events (decisions, promotions, rollbacks, adoptions,
        epochs), newest last."""
        if self.promoter is None:
            return []
        return self.registry.history(drafter_id, kind)

    # -- what replicas report ------------------------------------------------------------
    def report_adoption(
        self,
        replica: str,
        version: int,
        pause_s: float,
        waited_s: float,
        ref: dict[str, Any] | None = None,
        drafter_id: str | None = None,
    ) -> None:
        """A replica adopted ``version`` of the drafter, or of one of its versioned parts
        (``drafter_id``: the part's id; recorded in that id's history)."""
        did = drafter_id or self.drafter_id
        row = {
            "replica": replica,
            "version": version,
            "pause_ms": 1e3 * pause_s,
            "waited_ms": 1e3 * waited_s,
            "time": time.time(),
        }
        if did == self.drafter_id:
            with self._lock:
                self.adoptions.append(row)
        if did in self.promoters:
            with contextlib.suppress(Exception):  # the history is best effort
                extra = {} if ref is None else {"ref": ref}
                self.registry.record_event(did, "adoption", **row, **extra)

    def report(self) -> dict[str, Any]:
        """Versions, gate decisions and adoptions (for the demo and operators)."""
        with self._lock:
            adoptions = list(self.adoptions)
        try:
            with self._publish_lock:
                self._refresh_holdout(self.drafter_id)
            holdout_len = self.holdout_buffer.length(holdout_stream(self.drafter_id))
        except Exception:  # Redis gone: the report is still useful
            holdout_len = -1
        decisions = list(self.decisions)
        with contextlib.suppress(Exception):  # persisted: survives a restart of this actor
            history = self.history(self.drafter_id)
            if history:
                decisions = [e for e in history if e["kind"] == "decision"]
                adoptions = [e for e in history if e["kind"] == "adoption"]
        return {
            "drafter_id": self.drafter_id,
            "live_version": self.live_version(self.drafter_id),
            "epoch": "" if self.promoter is None else self.registry.epoch(self.drafter_id),
            "versions": self.versions(self.drafter_id),
            "decisions": decisions,
            "adoptions": adoptions,
            "parts": self._parts_report(),
            "holdout_records": len(self.holdout),
            "holdout_stream_length": holdout_len,
        }

    def _parts_report(self) -> dict[str, Any]:
        """The drafter's versioned parts (decision model, adapters): id → live version,
        versions and the replicas' adoptions."""
        out = {}
        for did in self.promoters:
            if did == self.drafter_id:
                continue
            adoptions: list[dict[str, Any]] = []
            with contextlib.suppress(Exception):  # persisted; best effort
                adoptions = [e for e in self.registry.history(did) if e["kind"] == "adoption"]
            out[did] = {
                "live_version": self.registry.live_version(did),
                "versions": self.versions(did),
                "adoptions": adoptions,
            }
        return out

    def ping(self) -> bool:
        return True

    def stop(self) -> None:
        self._stop.set()
