"""The online distiller on tiny Llamas: learning, LoRA/export, at-least-once acks, budget.

A random "target" (vocab 64, hidden 32, 2 layers) logs records from its own logits on random
token sequences, as a serving replica would; a different, smaller random "draft" (hidden 16,
1 layer) is distilled from them through a :class:`MemoryBuffer`.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from osd.buffer import MemoryBuffer
from osd.distill.lora import merge_adapter
from osd.distill.losses import LOSS_NAMES, SparseTarget, distill_loss, expected_acceptance
from osd.distill.record import DistillRecord, build_record, dense_target, encode
from osd.distill.student import CausalLMStudent, KDObjective, Objective, sparse_target
from osd.distill.trainer import DistillConfig, OnlineDistiller

V = 64  # vocabulary
SEQ, PROMPT, N_RECORDS = 16, 4, 32
DRAFTER = "draft-a"

# peft calls a transformers API that transformers has deprecated; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


def tiny_llama(hidden: int, layers: int, heads: int, init: float, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        initializer_range=init,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_draft() -> LlamaForCausalLM:
    return tiny_llama(16, 1, 2, 0.02, seed=2)


def student(model: torch.nn.Module | None = None, **kwargs) -> CausalLMStudent:
    return CausalLMStudent(make_draft() if model is None else model, **kwargs)


@pytest.fixture(scope="module")
def records() -> list[DistillRecord]:
    """Records logged from the target's logits (init 0.3: peaked, context-dependent)."""
    target = tiny_llama(32, 2, 4, 0.3, seed=0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (N_RECORDS, SEQ), generator=gen)  # [N, T]
    with torch.no_grad():
        logits = target(tokens).logits  # [N, T, V]
    pos = np.arange(PROMPT, SEQ)  # log every output position
    return [
        build_record(f"r{i}", tokens[i], PROMPT, pos, logits[i, pos - 1], k=16,
                     drafter_id=DRAFTER, version=0)
        for i in range(N_RECORDS)
    ]  # fmt: skip


def fill(buf: MemoryBuffer, records: list[DistillRecord], n: int) -> list[str]:
    return [buf.put(DRAFTER, encode(records[i % len(records)])) for i in range(n)]


def evaluate(
    model: torch.nn.Module, records: list[DistillRecord], loss: str
) -> tuple[float, float]:
    """Mean loss and mean expected acceptance over all logged positions (reference path)."""
    losses, accept = [], []
    model.eval()
    with torch.no_grad():
        for rec in records:
            ids = torch.from_numpy(rec.token_ids.astype(np.int64))[None]  # [1, T]
            logits = model(input_ids=ids).logits[0, rec.positions - 1]  # [m, V]
            target = SparseTarget(
                torch.from_numpy(rec.topk_ids.astype(np.int64)),
                torch.from_numpy(rec.topk_logprobs.astype(np.float32)),
                torch.from_numpy(rec.tail_logmass),
            )
            losses.append(distill_loss(loss, logits, target, reduction="none"))
            accept.append(expected_acceptance(logits, target))
    return float(torch.cat(losses).mean()), float(torch.cat(accept).mean())


def distiller(buf: MemoryBuffer, **overrides) -> OnlineDistiller:
    cfg = DistillConfig(**{"lr": 1e-2, **overrides})
    return OnlineDistiller(student(), buf, DRAFTER, cfg)


# ---- learning ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_each_loss_reduces_the_loss_and_raises_acceptance(records, loss):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 30 * 8)
    dist = distiller(buf, loss=loss)
    loss0, acc0 = evaluate(dist.student.module, records, loss)
    reports = [dist.step() for _ in range(30)]
    loss1, acc1 = evaluate(dist.student.module, records, loss)
    assert all(r is not None and r.records == 8 and r.positions == 8 * 12 for r in reports)
    assert reports[-1].step == dist.steps == 30
    assert (dist.records_seen, dist.positions_seen) == (240, 240 * 12)
    assert loss1 < 0.9 * loss0, (loss0, loss1)
    assert acc1 > acc0 + 0.02, (acc0, acc1)
    assert buf.pending_count(DRAFTER) == 0
    assert dist.step() is None  # drained


def test_lora_trains_only_the_adapters(records):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 10 * 8)
    draft = make_draft()
    base = {k: v.clone() for k, v in draft.state_dict().items()}
    dist = OnlineDistiller(student(draft), buf, DRAFTER, DistillConfig(lora=True, lr=1e-2))
    assert dist.config.learning_rate == 1e-2 and DistillConfig(lora=True).learning_rate == 1e-3
    model = dist.student.module
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss0, _ = evaluate(model, records, "fkl")
    for _ in range(10):
        dist.step()
    loss1, _ = evaluate(model, records, "fkl")
    assert loss1 < loss0
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            plain = name.replace(".base_layer", "")
            torch.testing.assert_close(tensor, base[plain], rtol=0, atol=0, msg=name)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # zero-initialised, now trained


def test_export_full_uses_the_model_names(records):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 8)
    dist = distiller(buf)
    dist.step()
    snap = dist.student.export()
    weights = snap.weights
    assert snap.kind == "full" and snap.lora is None
    serving = make_draft()
    assert set(weights) == set(serving.state_dict())
    assert all(t.device.type == "cpu" and not t.requires_grad for t in weights.values())
    serving.load_state_dict(weights, strict=True)
    ids = torch.from_numpy(records[0].token_ids.astype(np.int64))[None]
    model = dist.student.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(serving(input_ids=ids).logits, model(input_ids=ids).logits)
    weights["lm_head.weight"].add_(1.0)  # a copy: the trainer's weights are untouched
    assert not torch.equal(weights["lm_head.weight"], model.lm_head.weight)
    with pytest.raises(ValueError, match="save_adapter needs LoRA"):
        dist.student.save_adapter("/nonexistent")


@pytest.fixture
def lora_distiller(records) -> OnlineDistiller:
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 5 * 8)
    dist = OnlineDistiller(
        student(), buf, DRAFTER, DistillConfig(lora=True, lr=1e-2), base_version=3
    )
    for _ in range(5):
        dist.step()
    dist.student.module.eval()
    return dist


def test_lora_export_merge_and_save_adapter(lora_distiller, records, tmp_path):
    from peft import PeftModel

    dist = lora_distiller
    snap = dist.student.export()
    weights = snap.weights
    assert snap.kind == "lora" and snap.lora == DistillConfig(lora=True).lora_spec(3)
    assert weights and all("lora_A" in n or "lora_B" in n for n in weights)
    assert any("q_proj" in n for n in weights) and any("down_proj" in n for n in weights)

    ids = torch.from_numpy(records[0].token_ids.astype(np.int64))[None]
    with torch.no_grad():
        expected = dist.student.module(input_ids=ids).logits
    plain = make_draft()
    merged = dist.student.merged_state_dict()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(make_draft()(input_ids=ids).logits, expected)  # it learnt

    merged_again = merge_adapter(make_draft(), weights, snap.lora, "CAUSAL_LM")  # serving side
    for name, tensor in merged.items():
        torch.testing.assert_close(merged_again[name], tensor, msg=name)

    path = dist.student.save_adapter(tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file()
    assert (path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(make_draft(), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


# ---- buffer semantics ----------------------------------------------------------------------


def test_malformed_entries_are_logged_acked_and_skipped(records, caplog):
    buf = MemoryBuffer(consumer="t0")
    junk = buf.put(DRAFTER, b"\x00not msgpack")
    wide = build_record("wide", [1, 2, 99], 1, [1, 2], torch.randn(2, 128), k=4,
                        drafter_id=DRAFTER, version=0)  # fmt: skip
    too_wide = buf.put(DRAFTER, encode(wide))  # token 99 and top-k ids beyond the vocab
    fill(buf, records, 2)
    dist = distiller(buf)
    with caplog.at_level(logging.WARNING, logger="osd.distill.trainer"):
        report = dist.step()
    assert report is not None and (report.records, report.skipped) == (2, 2)
    assert dist.skipped == 2 and dist.steps == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(junk in m for m in messages) and any(too_wide in m for m in messages)
    assert buf.pending_count(DRAFTER) == 0

    only_junk = buf.put(DRAFTER, b"junk")  # a batch of nothing valid: None, still acked
    assert dist.step() is None
    assert buf.pending_count(DRAFTER) == 0 and dist.skipped == 3
    assert only_junk in caplog.text


def test_ack_only_after_the_optimiser_step(records):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 4)
    dist = distiller(buf)
    seen = []
    real_step = dist.optimizer.step

    def spy(*args, **kwargs):
        seen.append(buf.pending_count(DRAFTER, "t0"))
        return real_step(*args, **kwargs)

    dist.optimizer.step = spy
    assert dist.step().records == 4
    assert seen == [4]  # pending while the optimiser stepped
    assert buf.pending_count(DRAFTER) == 0

    ids = fill(buf, records, 3)

    def boom(*args, **kwargs):
        raise RuntimeError("optimiser failed")

    dist.optimizer.step = boom
    with pytest.raises(RuntimeError, match="optimiser failed"):
        dist.step()
    assert buf.pending_count(DRAFTER, "t0") == 3  # not acked: will be redelivered
    assert dist.steps == 1 and dist.records_seen == 4

    dist.optimizer.step = real_step  # the same entries come back (own pending first)
    report = dist.step()
    assert report.records == 3 and buf.pending_count(DRAFTER) == 0
    assert buf.read(DRAFTER, 8) == [] and len(ids) == 3


def test_entries_of_a_dead_consumer_are_reclaimed_and_trained_on(records):
    now = [1000.0]
    buf_a = MemoryBuffer(consumer="a", clock=lambda: now[0])
    buf_b = buf_a.for_consumer("b")
    fill(buf_a, records, 5)
    dead = distiller(buf_a, reclaim_idle_ms=30_000)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process goes away mid-batch

    dead.optimizer.step = die
    with pytest.raises(KeyboardInterrupt):
        dead.step()
    assert buf_a.pending_count(DRAFTER, "a") == 5

    alive = distiller(buf_b, reclaim_idle_ms=30_000)
    assert alive.step() is None  # not idle long enough yet: still a's
    now[0] += 31.0
    report = alive.step()
    assert report is not None and (report.reclaimed, report.records) == (5, 5)
    assert alive.steps == 1
    assert buf_a.pending_count(DRAFTER) == 0


# ---- budget, publishing, loop --------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_compute_budget_sleeps_between_steps(records):
    t = FakeTime()
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 4 * 8)
    cfg = DistillConfig(lr=1e-2, max_steps_per_s=2)
    dist = OnlineDistiller(student(), buf, DRAFTER, cfg, clock=t.clock, sleep=t.sleep)
    first = dist.step()
    assert first.waited_s == 0 and t.sleeps == []
    second = dist.step()  # no time passed: wait the full 1/2 s
    assert second.waited_s == pytest.approx(0.5) and t.sleeps == [pytest.approx(0.5)]
    t.now += 0.3  # the step's own work took 0.3 s
    assert dist.step().waited_s == pytest.approx(0.2)
    t.now += 2.0  # idle long enough: no wait
    assert dist.step().waited_s == 0
    assert sum(t.sleeps) == pytest.approx(0.7)


def test_spare_compute_waits_while_the_node_is_busy_but_not_forever(records):
    """``yield_cpu``: before a step the trainer waits while the probe says the node is busy
    (50 ms polls), at most ``yield_max_s``; without a probe, or with ``yield_cpu: None``,
    it never waits."""
    t = FakeTime()
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 4 * 8)
    busy = iter([True, True, False, *[True] * 100])
    cfg = DistillConfig(lr=1e-2, yield_cpu=0.5, yield_max_s=1.0)
    dist = OnlineDistiller(
        student(), buf, DRAFTER, cfg, clock=t.clock, sleep=t.sleep, busy=lambda: next(busy)
    )
    assert dist.step().waited_s == pytest.approx(0.1)  # busy twice, then free
    assert dist.step().waited_s == pytest.approx(1.0)  # busy throughout: steps after 1 s
    assert dist.yielded_s == pytest.approx(1.1) and dist.steps == 2
    dist.config = replace(cfg, yield_cpu=None)  # a trainer on devices of its own
    assert dist.step().waited_s == 0
    with pytest.raises(ValueError, match="yield_cpu"):
        DistillConfig(yield_cpu=1.5)


def test_publish_triggers_on_steps_or_seconds(records):
    t = FakeTime()
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 10 * 8)
    cfg = DistillConfig(lr=1e-2, publish_every_steps=3, publish_every_s=10.0)
    dist = OnlineDistiller(student(), buf, DRAFTER, cfg, clock=t.clock, sleep=t.sleep)
    t.now += 60
    assert not dist.should_publish()  # nothing trained yet
    dist.step()
    assert dist.should_publish()  # T seconds passed
    dist.mark_published()
    assert not dist.should_publish()
    dist.step(), dist.step()
    assert not dist.should_publish()
    dist.step()
    assert dist.should_publish()  # M steps

    published = []
    dist.mark_published()
    assert (
        dist.run(max_steps=6, on_publish=lambda d: published.append(d.student.export().kind)) == 6
    )
    assert published == ["full", "full"] and dist.publishes == 4


def test_run_idles_on_an_empty_buffer_and_survives_a_failing_publish(records, caplog):
    t = FakeTime()
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 2 * 8)
    cfg = DistillConfig(lr=1e-2, publish_every_steps=1)
    dist = OnlineDistiller(student(), buf, DRAFTER, cfg, clock=t.clock, sleep=t.sleep)

    def fail(_):
        raise OSError("registry down")

    with caplog.at_level(logging.ERROR, logger="osd.distill.trainer"):
        assert dist.run(until=5.0, idle_sleep_s=1.0, on_publish=fail) == 2
    assert "registry down" in caplog.text and dist.publishes == 0
    assert t.now == pytest.approx(5.0) and t.sleeps == [1.0] * 5
    assert dist.run(until=lambda: True) == 0


def test_max_len_drops_late_positions_and_full_k_has_no_tail(records):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 2)  # positions 4..15 each
    dist = distiller(buf, max_len=8)  # rows up to 7: positions 4..8
    assert dist.step().positions == 2 * 5

    rec = records[0]
    ids = torch.from_numpy(rec.token_ids.astype(np.int64))[None]
    with torch.no_grad():
        logits = make_draft()(input_ids=ids).logits[0, rec.positions - 1]
    full = build_record("full-k", rec.token_ids, PROMPT, rec.positions, logits, k=V,
                        drafter_id=DRAFTER, version=0)  # fmt: skip
    for model in (make_draft(), PlainLM(make_draft())):  # logits_to_keep, and full logits
        buf.put(DRAFTER, encode(full))
        dist = OnlineDistiller(student(model, vocab_size=V), buf, DRAFTER, DistillConfig())
        report = dist.step()
        assert report.positions == 12 and np.isfinite(report.loss)
        assert report.loss < 1e-2  # the draft logged its own distribution: KL ≈ 0


class PlainLM(torch.nn.Module):
    """A causal LM without ``logits_to_keep``, ``config`` or ``get_output_embeddings``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_records_without_usable_positions_are_acked_without_a_step(records):
    buf = MemoryBuffer(consumer="t0")
    none = np.zeros(0, dtype=np.int32)  # a plain [] would be float64 to numpy
    empty = build_record("e", [1, 2, 3], 1, none, torch.zeros(0, V), drafter_id=DRAFTER, version=0)
    buf.put(DRAFTER, encode(empty))
    dist = distiller(buf)
    report = dist.step()
    assert report.records == 1 and report.positions == 0 and np.isnan(report.loss)
    assert dist.steps == 0 and buf.pending_count(DRAFTER) == 0


# ---- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "kl"}, "loss must be one of"),
        ({"beta": 1.0}, "beta"),
        ({"lr": -1e-3}, "lr must be"),
        ({"batch_records": 0}, "batch_records"),
        ({"max_len": 1}, "max_len"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"lora_target_modules": "q_proj"}, "lora_target_modules"),
        ({"publish_every_steps": 0}, "publish_every_steps"),
        ({"publish_every_s": -1}, "publish_every_s"),
        ({"publish_every_steps": None, "publish_every_s": None}, "nothing would ever"),
        ({"max_steps_per_s": 0}, "max_steps_per_s"),
        ({"reclaim_idle_ms": -1}, "reclaim_idle_ms"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"replay": -1}, "replay"),
        ({"replay_size": 0}, "replay_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_rehearsal_adds_earlier_records_and_keeps_a_uniform_reservoir(records):
    """``replay=R``: each step trains on its new records plus R from a bounded reservoir of
    earlier ones (none before any were seen); only the new records are acked."""
    buf = MemoryBuffer()
    d = distiller(buf, batch_records=4, replay=3, replay_size=6)
    fill(buf, records, 20)
    seen = []
    for _ in range(5):
        report = d.step()
        seen.append(report.replayed)
        assert report.records == 4
    assert seen == [0, 3, 3, 3, 3]
    assert len(d._reservoir) == 6 and d._offered == 20
    assert buf.pending_count(DRAFTER) == 0  # every new record acked
    plain = distiller(MemoryBuffer(), batch_records=4)
    fill(plain.buffer, records, 4)
    assert plain.step().replayed == 0 and plain._reservoir == []


def test_lora_on_missing_modules_says_what_to_set():
    cfg = DistillConfig(lora=True, lora_target_modules=["c_attn"])
    with pytest.raises(ValueError, match="lora_target_modules"):
        OnlineDistiller(student(), MemoryBuffer(consumer="t0"), DRAFTER, cfg)


# ---- the student contract ------------------------------------------------------------------


def test_causal_lm_student_predicts_rows_t_minus_1_in_a_ragged_batch(records):
    """The module docstring's example: positions [2, 3] of [5, 9, 2, 7] are rows 1 and 2."""
    model = make_draft()
    short = build_record("s", [5, 9, 2, 7], 2, [2, 3], torch.randn(2, V), k=4,
                         drafter_id=DRAFTER, version=0)  # fmt: skip
    st = student(model)
    with torch.no_grad():
        got = st.predict([short, records[0]])
        ref_short = model(torch.tensor([[5, 9, 2]])).logits[0, [1, 2]]  # [2, V]
        ids = torch.from_numpy(records[0].token_ids.astype(np.int64))[None]
        ref_long = model(ids).logits[0, records[0].positions - 1]  # [12, V]
        capped = st.predict([short, records[0]], max_len=2)
    assert [tuple(x.shape) for x in got] == [(2, V), (12, V)]
    torch.testing.assert_close(got[0], ref_short, rtol=1e-4, atol=1e-5)  # padding is harmless
    torch.testing.assert_close(got[1], ref_long, rtol=1e-4, atol=1e-5)
    assert [x.shape[0] for x in capped] == [1, 0]  # position 3 needs row 2; PROMPT is 4
    assert st.predictable(records[0], 8) == 5 and st.context == 64


@pytest.mark.parametrize("loss", ["fkl", "jsd"])
def test_the_objective_distils_each_record_at_its_temperature(records, loss):
    """T > 0 at the request's T; greedy (T = 0) at T = 1 (see distill_temperature)."""
    hot, greedy = replace(records[0], temperature=0.5), replace(records[1], temperature=0.0)
    model = make_draft()
    with torch.no_grad():
        logits = student(model).predict([hot, greedy])
        got = KDObjective(loss).loss(logits, [hot, greedy])  # [24]
    want = [
        distill_loss(loss, logits[i], sparse_target(r, V), temperature=t, reduction="none")
        for i, (r, t) in enumerate([(hot, 0.5), (greedy, 1.0)])
    ]
    torch.testing.assert_close(got, torch.cat(want))
    at_one = distill_loss(loss, logits[0], sparse_target(hot, V), reduction="none")
    assert not torch.allclose(got[:12], at_one)  # the temperature is honoured, not T = 1


class Adversarial(KDObjective):
    """KD plus a toy adversarial term (KOALA-style): a second network with its own
    parameters and optimiser, trained in ``after_step``; the trainer loop is unchanged."""

    def __init__(self) -> None:
        super().__init__("fkl")
        torch.manual_seed(5)
        self.disc = torch.nn.Linear(V, 1)  # scores a distribution: target-like or draft-like
        self.opt = torch.optim.SGD(self.disc.parameters(), lr=0.5)
        self.updates = 0

    def loss(self, logits, records):
        fake = self.disc(torch.cat(logits).softmax(-1)).squeeze(-1)  # [m]
        return super().loss(logits, records) + 0.1 * torch.nn.functional.softplus(-fake)

    def after_step(self, logits, records):
        assert not any(lg.requires_grad for lg in logits)
        fake = torch.cat(logits).softmax(-1)  # [m, V]
        pairs = zip(logits, records, strict=True)
        real = torch.cat([dense_target(r, V)[: lg.shape[0]] for lg, r in pairs])  # log q [m, V]
        d = self.disc(torch.cat([fake, real.exp()])).squeeze(-1)  # [2m]
        labels = torch.cat([torch.zeros(len(fake)), torch.ones(len(real))])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(d, labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.updates += 1


class AdversarialStudent(CausalLMStudent):
    def objective(self, config: DistillConfig) -> Objective:
        return Adversarial()


def test_an_objective_with_its_own_network_plugs_in(records):
    buf = MemoryBuffer(consumer="t0")
    fill(buf, records, 5 * 8)
    dist = OnlineDistiller(AdversarialStudent(make_draft()), buf, DRAFTER, DistillConfig(lr=1e-2))
    obj = dist.objective
    assert isinstance(obj, Adversarial)
    disc0 = obj.disc.weight.detach().clone()
    loss0, _ = evaluate(dist.student.module, records, "fkl")
    reports = [dist.step() for _ in range(5)]
    loss1, _ = evaluate(dist.student.module, records, "fkl")
    assert all(r.records == 8 for r in reports) and obj.updates == dist.steps == 5
    assert not torch.equal(obj.disc.weight, disc0)  # trained by its own optimiser
    trained = {id(p) for g in dist.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in obj.disc.parameters()}  # not by the student's
    assert loss1 < loss0


def test_draft_model_student_is_built_by_name():
    from osd.drafters import DRAFTERS, build_drafter, build_student

    draft = make_draft()
    st = build_student("draft_model", build_drafter("draft_model", None, draft, k=2))
    assert isinstance(st, CausalLMStudent) and st.module is draft and st.vocab_size == V
    assert DRAFTERS["draft_model"].trainable and not DRAFTERS["ngram"].trainable
    with pytest.raises(
        ValueError, match="nothing to train online; trainable drafters: draft_model"
    ):
        build_student("ngram", build_drafter("ngram", None, k=2))
    with pytest.raises(TypeError, match="build_student"):
        OnlineDistiller(draft, MemoryBuffer(consumer="t0"), DRAFTER)
