"""Prometheus metrics of one serving replica (``GET /metrics``).

Spec-decode counters are named after vLLM's (``vllm:spec_decode_*`` → ``osd:spec_decode_*``)
so existing dashboards carry over; the online ones are OSD's own:

======================================================  =======================================
metric                                                   meaning (DESIGN §7)
======================================================  =======================================
``osd:spec_decode_num_drafts``                           verification steps (one draft each)
``osd:spec_decode_num_draft_tokens``                     draft tokens proposed (along the path)
``osd:spec_decode_num_accepted_tokens``                  ... accepted; α = accepted ÷ draft
``osd:spec_decode_num_accepted_tokens_per_pos{position}``  accepted at draft position i
``osd:spec_decode_num_emitted_tokens``                   tokens emitted (τ = emitted ÷ drafts)
``osd:request_success{finished_reason}``                 finished requests
``osd:request_failure``                                  requests that failed after admission
``osd:prompt_tokens`` / ``osd:generation_tokens``        tokens in / out
``osd:e2e_request_latency_seconds``                      histogram
``osd:num_requests_running`` / ``..._waiting``            sequences decoding / queued
``osd:distill_records_logged`` / ``..._dropped``         records written to / lost before Redis
``osd:drafter_weight_version``                           live drafter version on this replica
``osd:drafter_swaps``                                    hot-swaps adopted
``osd:drafter_swap_pause_seconds``                       decode-loop pause per swap (histogram)
``osd:drafter_watch_rollbacks``                          versions the post-swap watch rolled back
``osd:drafter_watch_acceptance{version_role}``           live α of the last watched version
                                                         (``live``) and its predecessor
                                                         (``previous``), as the registry saw
``osd:drafter_registry_epoch_info{epoch}``               1 for the registry's current epoch
======================================================  =======================================

Counters are exposed with the ``_total`` suffix, as Prometheus clients do. Each replica
keeps its own :class:`~prometheus_client.CollectorRegistry`; scrape every replica (or
sum over them), not the load-balanced endpoint, for cluster totals.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from osd.serving import RequestResult, SwapEvent

__all__ = ["CONTENT_TYPE_LATEST", "ReplicaMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class ReplicaMetrics:
    """The metrics of one replica, updated from results and swap events."""

    def __init__(self, model_name: str, drafter_id: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name, "drafter_id": drafter_id}
        self._labels = labels
        names = list(labels)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=r)

        self.num_drafts = counter("osd:spec_decode_num_drafts", "Verification steps.")
        self.draft_tokens = counter(
            "osd:spec_decode_num_draft_tokens", "Draft tokens proposed along the verified path."
        )
        self.accepted_tokens = counter(
            "osd:spec_decode_num_accepted_tokens", "Draft tokens accepted."
        )
        self.accepted_per_pos = counter(
            "osd:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position.",
            ("position",),
        )
        self.emitted_tokens = counter(
            "osd:spec_decode_num_emitted_tokens", "Tokens emitted, bonus tokens included."
        )
        self.success = counter("osd:request_success", "Finished requests.", ("finished_reason",))
        self.failure = counter("osd:request_failure", "Requests that failed after admission.")
        self.prompt_tokens = counter("osd:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("osd:generation_tokens", "Tokens generated.")
        self.latency = Histogram(
            "osd:e2e_request_latency_seconds",
            "Submission to last token.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("osd:num_requests_running", "Sequences decoding.", names, registry=r)
        self.waiting = Gauge("osd:num_requests_waiting", "Sequences queued.", names, registry=r)
        self.records_logged = counter(
            "osd:distill_records_logged", "Distill records written to the buffer.", ("stream",)
        )
        self.records_dropped = counter(
            "osd:distill_records_dropped", "Distill records lost before reaching the buffer."
        )
        self.records_quota_dropped = counter(
            "osd:distill_records_quota_dropped",
            "Distill records not used because their API key exceeded its share "
            "(buffer.key_max_share).",
            ("key",),
        )
        self.rejected = counter(
            "osd:http_rejected", "Requests refused before decoding (4xx).", ("status",)
        )
        self.version = Gauge(
            "osd:drafter_weight_version", "Drafter version being served.", names, registry=r
        )
        self.swaps = counter("osd:drafter_swaps", "Drafter hot-swaps adopted.")
        self.swap_pause = Histogram(
            "osd:drafter_swap_pause_seconds",
            "Decode-loop pause while adopting new drafter weights.",
            names,
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )

        self.watch_rollbacks = Gauge(
            "osd:drafter_watch_rollbacks",
            "Live versions the registry's post-swap watch rolled back (its history).",
            names,
            registry=r,
        )
        self.watch_alpha = Gauge(
            "osd:drafter_watch_acceptance",
            "Live acceptance of the last watched version and of its predecessor.",
            [*names, "version_role"],
            registry=r,
        )
        self.epoch = Gauge(
            "osd:drafter_registry_epoch_info",
            "The registry's epoch (label); a new one means its store was emptied or replaced.",
            [*names, "epoch"],
            registry=r,
        )
        self._epoch: str | None = None

    def _l(self, metric, **extra: str):
        return metric.labels(**self._labels, **extra)

    def observe_result(self, result: RequestResult) -> None:
        s = result.stats
        self._l(self.num_drafts).inc(s.steps)
        self._l(self.draft_tokens).inc(s.proposed)
        self._l(self.accepted_tokens).inc(s.accepted)
        self._l(self.emitted_tokens).inc(s.emitted)
        for i, n in enumerate(s.accepted_at):
            self._l(self.accepted_per_pos, position=str(i)).inc(n)
        self._l(self.success, finished_reason=result.finish_reason).inc()
        self._l(self.prompt_tokens).inc(result.prompt_tokens)
        self._l(self.generation_tokens).inc(result.completion_tokens)
        self._l(self.latency).observe(result.latency_s)

    def observe_failure(self) -> None:
        self._l(self.failure).inc()

    def observe_swap(self, event: SwapEvent) -> None:
        self._l(self.swaps).inc()
        self._l(self.swap_pause).observe(event.pause_s)
        self._l(self.version).set(event.version)

    def observe_record(self, stream: str, ok: bool) -> None:
        if ok:
            self._l(self.records_logged, stream=stream).inc()
        else:
            self._l(self.records_dropped).inc()

    def observe_quota_drop(self, key: str) -> None:
        self._l(self.records_quota_dropped, key=key).inc()

    def observe_rejected(self, status: int) -> None:
        self._l(self.rejected, status=str(status)).inc()

    def observe_registry(self, answer: dict) -> None:
        """A poll answer of the registry actor: its epoch and the post-swap watch."""
        epoch = str(answer.get("epoch", ""))
        if epoch != self._epoch:
            if self._epoch is not None:
                self.epoch.remove(*self._labels.values(), self._epoch)
            self._epoch = epoch
            self._l(self.epoch, epoch=epoch).set(1)
        watch = answer.get("watch") or {}
        self._l(self.watch_rollbacks).set(int(watch.get("rollbacks", 0)))
        last = watch.get("last") or {}
        for role, key in (("live", "live_alpha"), ("previous", "previous_alpha")):
            if isinstance(last.get(key), int | float):
                self._l(self.watch_alpha, version_role=role).set(float(last[key]))

    def set_load(self, running: int, waiting: int, version: int) -> None:
        self._l(self.running).set(running)
        self._l(self.waiting).set(waiting)
        self._l(self.version).set(version)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
