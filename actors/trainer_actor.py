"""A trainer actor: one consumer of the buffer's group, distilling the draft, publishing.

A named, restartable Ray actor that owns an :class:`osd.distill.trainer.OnlineDistiller`
on a :class:`~osd.buffer.RedisStreamBuffer` whose consumer name is the actor's name. It
trains on a thread of its own (``OnlineDistiller.run``) and, when the distiller says so,
publishes the weights to the registry actor as safetensors bytes with their sha256.

Restart: the new incarnation resumes from the registry's live version (its weights, or
its LoRA adapter on the base version its spec names) and — same consumer name — first
re-reads the entries its predecessor held un-acked, so no record is lost (at-least-once,
DESIGN §4). Records of a consumer that never comes back are reclaimed by the others after
``reclaim_idle_ms``.

A drafter's versioned parts (:meth:`osd.drafters.base.Drafter.parts`: an early-stop
decision model, the adapters of a mixture with ``versioning: adapter``) get a distiller and
a thread each, on the same records read through a consumer group of their own, publishing
under the part's id (``<drafter_id>-stop``, ``<drafter_id>-<domain>``).

Controls for experiments: :meth:`pause` / :meth:`resume` the training threads,
:meth:`set_budget` (steps per second, live), :meth:`set_nice` (the training threads'
priority, ``trainer.nice``: 19 by default, so the OS gives them only the cycles the
replicas leave, :mod:`osd.distill.budget`), :meth:`set_yield` (``distill.yield_cpu`` — the
trainer waits while the replicas on its node keep its CPUs busy; off by default) and
:meth:`set_publishing` (train without publishing: the served weights stay fixed).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import torch
from osd.actors.config import REGISTRY_ACTOR, ClusterConfig

from osd.buffer import RedisStreamBuffer
from osd.buffer.base import Outage
from osd.distill.budget import NodeLoad, check_nice, lower_thread_priority
from osd.distill.lora import LoraSpec
from osd.distill.trainer import OnlineDistiller
from osd.drafters import build_drafter, build_student, drafter_spec
from osd.models import load_model
from osd.registry import checksum, weights_from_bytes, weights_to_bytes

__all__ = ["TrainerActor"]

log = logging.getLogger(__name__)


class TrainerActor:
    """See the module docstring. ``name`` is the Ray actor name and the consumer name."""

    def __init__(self, config: dict[str, Any], name: str) -> None:
        import ray

        from osd.buffer.redis_stream import redis_client

        self.cfg = cfg = ClusterConfig.from_dict(config)
        torch.set_num_threads(cfg.trainer.threads)
        self.name = name
        self.drafter_id = cfg.drafter_id
        device = "cuda" if cfg.trainer.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=cfg.namespace)
        self.buffer = buffer = RedisStreamBuffer(
            redis_client(cfg.redis_url), consumer=name, maxlen=cfg.buffer.maxlen
        )
        self.outage = Outage(f"{name}: Redis", log)  # one line per outage, not per retry
        spec = drafter_spec(cfg.drafter)  # head drafters read the (frozen) target's states
        drafter = build_drafter(
            cfg.drafter,
            None if spec.needs_draft else load_model(cfg.target, device),
            load_model(cfg.draft, device) if spec.needs_draft else None,
            **cfg.serve.drafter_config(cfg.drafter, cfg.k),  # as the replicas build it
        )
        student = build_student(cfg.drafter, drafter)
        # the drafter's own weights (unless it trains only its parts), then each versioned
        # part (decision model, per-adapter mixture), read through a group of its own
        self.distiller: OnlineDistiller | None = None
        self.resumed_from = 0
        if drafter.trains_whole:
            self.distiller, self.resumed_from = self._resume(
                student, cfg.drafter_id, cfg.trainer.distill, buffer
            )
        self.part_distillers: dict[str, OnlineDistiller] = {}
        for part in drafter.parts().values():
            did = cfg.drafter_id + part.suffix
            self.part_distillers[did], _ = self._resume(
                part.student(student.vocab_size),
                did,
                getattr(cfg.trainer, part.distill),
                buffer.for_group(part.group),
            )
        self.publishing = True
        self.decisions: list[dict[str, Any]] = []
        self.part_decisions: dict[str, list[dict[str, Any]]] = {d: [] for d in self.part_distillers}
        self.errors = 0
        self._run = threading.Event()
        self._run.set()
        self._stop = threading.Event()
        self.nice = cfg.trainer.nice
        self._generation = 0  # bumped to retire the training threads (set_nice)
        self._nice_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._start_threads()
        log.info("%s up on %s, resumed from v%d", name, device, self.resumed_from)

    def _start_threads(self) -> None:
        """One training thread per distiller, started from this (nice 0) control thread:
        each lowers its own priority to ``self.nice`` before its first step."""
        gen = self._generation
        self._threads = [
            threading.Thread(
                target=self._loop, args=(d, gen), name=f"{self.name}-{d.drafter_id}", daemon=True
            )
            for d in self._distillers()
        ]
        for t in self._threads:
            t.start()

    def _resume(self, student, did: str, dcfg, buffer) -> tuple[OnlineDistiller, int]:
        """A distiller of ``student`` for the registry id ``did``, resumed from its live
        version (its weights, or its LoRA adapter on the base version its spec names)."""
        import ray

        live = ray.get(self.registry.raw_weights.remote(did))
        version, kind = live["version"], live["kind"]
        adapter = None
        if kind == "full":  # full or LoRA training goes on from these weights
            base_version = version
            student.load_weights(weights_from_bytes(live["data"]))
        elif dcfg.lora:  # the live adapter goes on training, on its own base version
            spec = LoraSpec.from_dict(live["lora"])
            base_version = spec.base_version
            base = ray.get(self.registry.raw_weights.remote(did, base_version))
            student.load_weights(weights_from_bytes(base["data"]))
            adapter = (weights_from_bytes(live["data"]), spec)
        else:  # a full fine-tune from the live adapter merged onto its base
            base_version = version
            merged, _ = ray.get(self.registry.serving_weights.remote(did, version))
            student.load_weights(weights_from_bytes(merged))
        distiller = OnlineDistiller(
            student,
            buffer,
            did,
            dcfg,
            base_version,
            stream=self.drafter_id,
            busy=NodeLoad(dcfg.yield_cpu or 1.0),  # spare compute (used if yield_cpu is set)
        )
        if adapter is not None:
            student.load_adapter(*adapter)
        log.info("%s: %s resumed from v%d (%s)", self.name, did, version, kind)
        return distiller, version

    # -- training threads (the drafter's; each versioned part's) ---------------------------
    def _loop(self, d: OnlineDistiller, gen: int) -> None:
        import redis

        lower_thread_priority(self.nice)  # spare compute: the replicas' cycles come first

        def retired() -> bool:
            return self._stop.is_set() or self._generation != gen

        while not retired():
            if not self._run.wait(0.2):
                continue
            if self.outage.down:  # Redis was away: resume once it answers
                try:
                    self.buffer.client.ping()
                except redis.RedisError:
                    time.sleep(0.5)
                    continue
                self.outage.ok()
            try:  # OnlineDistiller.run: steps, publishes via _publish, retries failed publishes
                d.run(
                    until=lambda: retired() or not self._run.is_set(),
                    idle_sleep_s=0.05,
                    on_publish=self._publish,
                )
            except redis.RedisError as err:  # its batch stays pending: redelivered later
                self.outage.failed(err)
                time.sleep(0.5)
            except Exception:  # a failed step leaves its batch pending: redelivered later
                self.errors += 1
                log.exception("%s: training step failed; retrying in 1 s", self.name)
                time.sleep(1.0)

    def _publish(self, d: OnlineDistiller) -> None:
        """Hand the weights to the registry (which validates, gates and maybe promotes)."""
        if not self.publishing:
            return
        import ray

        snap = d.student.export()
        data = weights_to_bytes(snap.weights)
        provenance = d.provenance(self.name)
        lora = None if snap.lora is None else snap.lora.to_dict()
        decision = ray.get(
            self.registry.publish.remote(
                d.drafter_id, data, snap.kind, provenance, checksum(data), lora
            )
        )
        if d is self.distiller:
            self.decisions.append(decision)
        else:
            self.part_decisions[d.drafter_id].append(decision)

    # -- controls ------------------------------------------------------------------------
    def pause(self) -> None:
        self._run.clear()

    def resume(self) -> None:
        self._run.set()

    def set_publishing(self, on: bool) -> None:
        self.publishing = bool(on)

    def set_budget(self, max_steps_per_s: float | None) -> None:
        """The compute budget (``distill.max_steps_per_s``; ``None``: unlimited), live."""
        import dataclasses

        if max_steps_per_s is not None and not max_steps_per_s > 0:
            raise ValueError(f"max_steps_per_s must be > 0 or None, got {max_steps_per_s!r}")
        for d in self._distillers():
            d.config = dataclasses.replace(d.config, max_steps_per_s=max_steps_per_s)

    def set_yield(self, yield_cpu: float | None) -> None:
        """Spare compute only (``distill.yield_cpu``: wait while the node's other
        processes use more than this share of its CPUs; ``None``: never wait), live."""
        import dataclasses

        if yield_cpu is not None and not 0 < yield_cpu <= 1:
            raise ValueError(f"yield_cpu must be in (0, 1] or None, got {yield_cpu!r}")
        for d in self._distillers():
            d.config = dataclasses.replace(d.config, yield_cpu=yield_cpu)
            d.busy.share = yield_cpu or 1.0

    def set_nice(self, nice: int) -> None:
        """The training threads' priority (``trainer.nice``), live. A thread cannot get back
        a priority it gave up without privileges, so the threads are replaced: the current
        ones finish their step, and new ones start at ``nice``."""
        check_nice(nice)  # before any thread is retired
        with self._nice_lock:  # one replacement at a time (the actor serves calls in threads)
            self.nice = nice
            self._generation += 1
            for t in self._threads:
                t.join()
            self._start_threads()

    def _thread_nice(self) -> list[int] | None:
        if not sys.platform.startswith("linux"):
            return None
        live = [t.native_id for t in self._threads if t.is_alive()]
        return [os.getpriority(os.PRIO_PROCESS, tid) for tid in live if tid is not None]

    def _distillers(self) -> list[OnlineDistiller]:
        return [d for d in (self.distiller, *self.part_distillers.values()) if d is not None]

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)

    def stats(self) -> dict[str, Any]:
        d = self.distiller
        return {
            "name": self.name,
            "pid": os.getpid(),  # tells a restarted actor from the one it replaced
            "steps": 0 if d is None else d.steps,
            "records_seen": 0 if d is None else d.records_seen,
            "positions_seen": 0 if d is None else d.positions_seen,
            "skipped": 0 if d is None else d.skipped,
            "publishes": len(self.decisions),
            "promoted": sum(x["promoted"] for x in self.decisions),
            "running": self._run.is_set(),
            "nice": self.nice,  # the training threads' priority (trainer.nice) …
            "thread_nice": self._thread_nice(),  # … as the OS has it (Linux; else None)
            "publishing": self.publishing,
            "resumed_from": self.resumed_from,
            "errors": self.errors,
            "redis_outages": self.outage.count,
            "yielded_s": 0.0 if d is None else round(d.yielded_s, 3),  # spare compute waits
            "parts": {  # the versioned parts' own trainers (decision model, adapters)
                did: {
                    "steps": p.steps,
                    "records_seen": p.records_seen,
                    "publishes": len(self.part_decisions[did]),
                    "promoted": sum(x["promoted"] for x in self.part_decisions[did]),
                }
                for did, p in self.part_distillers.items()
            },
        }

    def ping(self) -> bool:
        return True
