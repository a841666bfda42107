"""The mixture of drafts (issue 15.2): the router, the mixture drafter (lossless, batched
across adapters), its student (each adapter trains on the records it drafted) and the
product path — replica, trainer and registry on the zoo models — without Ray."""

import numpy as np
import pytest
import torch

from osd.buffer import MemoryBuffer
from osd.distill.config import DistillConfig
from osd.distill.record import build_record, encode
from osd.distill.trainer import OnlineDistiller
from osd.drafters import build_drafter, build_student
from osd.drafters.draft_model import DraftModelDrafter
from osd.drafters.mixture import MixtureDrafter, MixtureStudent
from osd.drafters.router import Router, prompt_features
from osd.models import load_model, load_tokenizer
from osd.specdec.engine import DecodeStats, SpeculativeDecoder

MAX_NEW = 16
PROMPTS = {  # one per domain: the router's features tell them apart
    "math": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
    "sql": "-- Database: concert_singer (stadium, singer)\n-- Question: How many singers are there?\n",
    "code": 'def add(a: int, b: int) -> int:\n    """ Return the sum of a and b. """\n',
}


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return load_model("zoo:target"), load_model("zoo:draft"), load_tokenizer("zoo:target")


def noisy(model, scale=0.3, seed=0):
    import copy

    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return out


def three_adapters(zoo, mode="tag", explore=0.0):
    """Adapters that really differ: the draft, a noisy draft, the target drafting itself."""
    target, draft, _ = zoo
    adapters = {
        "math": DraftModelDrafter(draft, k=4),
        "sql": DraftModelDrafter(noisy(draft), k=4),
        "code": DraftModelDrafter(target, k=4),  # α = 1
    }
    return MixtureDrafter(adapters, Router(list(adapters), mode=mode, explore=explore))


# ---- the router --------------------------------------------------------------------------


def test_router_routes_by_tag_and_refuses_unknown_tags():
    r = Router(["math", "sql"])
    assert r.route([1, 2, 3], tag="sql") == "sql"
    assert r.route([1, 2, 3]) in ("math", "sql")  # no tag: the learned rule
    with pytest.raises(ValueError, match=r"domain 'prose' names no adapter.*math, sql"):
        r.route([1, 2, 3], tag="prose")
    assert r.routed == {"math": 1, "sql": 1}
    with pytest.raises(ValueError, match="router mode 'best'"):
        Router(["a"], mode="best")
    with pytest.raises(ValueError, match="distinct adapter names"):
        Router(["a", "a"])
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        r.update([1], "c", 0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        r.update([1], "math", 1.5)


def test_learned_router_worked_example():
    """The module docstring's example: two prompt kinds, two clusters, homes, a move."""
    r = Router(["a", "b"], mode="learned", explore=0.0, prior=0.6)
    kind_a, kind_b = [1, 2, 1, 2], [7, 8, 7, 8]
    assert (r.route(kind_a), r.route(kind_b)) == ("a", "b")  # each kind at its home
    r.update(kind_a, "a", 0.4), r.update(kind_b, "b", 0.3)
    assert (r.route(kind_a), r.route(kind_b)) == ("b", "a")  # untried: prior 0.6 > 0.5
    r.update(kind_a, "b", 0.2), r.update(kind_b, "a", 0.9)
    assert (r.route(kind_a), r.route(kind_b)) == ("a", "a")
    assert r.scores(r.cluster(r.features(kind_b))) == pytest.approx({"a": 0.9, "b": 0.4})
    assert r.route(kind_b, tag="b") == "a"  # learned mode: tags only label records


def test_router_clusters_prompt_kinds_and_keeps_them_home():
    """Three kinds of prompts, adapters equally good everywhere: each kind settles on its
    own adapter (no collapse), and an adapter must beat home by the margin to take over."""
    kinds = [[1, 2, 3, 1, 2, 3], [40, 41, 42, 40], [90, 91, 92, 93, 90]]
    r = Router(["x", "y", "z"], mode="learned")
    gen = np.random.default_rng(0)
    for i in range(120):
        kind = kinds[i % 3]
        a = r.route(kind)
        r.update(kind, a, float(np.clip(0.5 + 0.05 * gen.standard_normal(), 0, 1)))
    homes = [r.route(k) for k in kinds]
    assert sorted(homes) == ["x", "y", "z"]  # one adapter per kind
    assert len(r.centroids) == 3 and sorted(r.cluster(r.features(k)) for k in kinds) == [0, 1, 2]


def test_prompt_features_are_a_normalised_hashed_histogram():
    x = prompt_features([5, 9, 5], dim=16)
    assert x.shape == (16,)
    np.testing.assert_allclose(np.linalg.norm(x), 1.0)
    np.testing.assert_array_equal(x, prompt_features([5, 9, 5], dim=16))  # no Python hash()
    assert (prompt_features([], dim=16) == 0).all()


def test_doctests():
    import doctest

    from osd.drafters import mixture, router

    assert doctest.testmod(router).failed == 0
    assert doctest.testmod(mixture).failed == 0


# ---- the mixture drafter -----------------------------------------------------------------


def test_mixture_greedy_equals_target_greedy_batched_across_adapters(zoo):
    """Lossless: three different adapters in one batch, each request as the target alone."""
    target, _, tok = zoo
    dec = SpeculativeDecoder(target, three_adapters(zoo), tok)
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS.values()]
    refs = [
        target.generate(torch.tensor([x]), max_new_tokens=MAX_NEW, do_sample=False)[
            0, len(x) :
        ].tolist()
        for x in ids
    ]
    states = dec.start_batch(ids * 2, [MAX_NEW] * 6, domains=[*PROMPTS, "sql", "code", None])
    assert [s.route for s in states][:5] == ["math", "sql", "code", "sql", "code"]
    stats = [DecodeStats() for _ in states]
    while active := [i for i, s in enumerate(states) if not s.finished]:
        dec.step_batch([states[i] for i in active], [stats[i] for i in active])
    for i, s in enumerate(states):
        assert s.tokens[s.prompt_len :] == refs[i % 3], f"sequence {i} ({s.route})"
        dec.release(s)
    assert stats[2].alpha == 1.0  # the target drafting itself
    assert stats[0].accepted > 0


def test_learned_router_finds_the_adapter_that_accepts_best(zoo):
    target, _, tok = zoo
    mix = three_adapters(zoo, mode="learned")
    dec = SpeculativeDecoder(target, mix, tok)
    for _ in range(3):
        for prompt in PROMPTS.values():
            dec.generate(prompt, max_new_tokens=MAX_NEW)
    # every adapter was tried (optimistic prior), then the self-drafting one wins everywhere
    assert set(mix.router.routed) == {"math", "sql", "code"}
    assert min(mix.router.routed.values()) >= 1
    assert mix.router.updates == 9
    x = mix.router.features(tok(PROMPTS["sql"], add_special_tokens=False).input_ids)
    assert mix.router.route(x) == "code"


def test_mixture_weights_are_every_adapter_by_name(zoo):
    target, draft, _ = zoo
    mix = build_drafter("mixture", target, draft, domains="math,sql")
    sd = mix.state_dict()
    assert {k.split(".")[0] for k in sd} == {"math", "sql"}
    assert len(sd) == 2 * len(draft.state_dict())
    new = {k: v + 1.0 if k.startswith("sql.") else v for k, v in sd.items()}
    mix.load_state_dict(new, 3)
    assert mix.version == 3 and all(mix.adapters[n].version == 3 for n in ("math", "sql"))
    torch.testing.assert_close(mix.state_dict()["sql.lm_head.weight"], new["sql.lm_head.weight"])
    with pytest.raises(ValueError, match=r"'code\.lm_head\.weight' names no adapter"):
        mix.load_state_dict({**sd, "code.lm_head.weight": sd["sql.lm_head.weight"]}, 4)
    with pytest.raises(ValueError, match="adapter 'sql': weights missing"):
        mix.load_state_dict({k: v for k, v in sd.items() if k != "sql.lm_head.weight"}, 4)
    assert mix.version == 3  # nothing loaded
    with pytest.raises(ValueError, match="mixture domains must be"):
        build_drafter("mixture", target, draft, domains="math,Math")
    with pytest.raises(ValueError, match="domain 'prose' names no adapter"):
        SpeculativeDecoder(target, mix).start([1, 2, 3], 4, domain="prose")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft's call
def test_mixture_student_trains_each_adapter_on_the_records_it_drafted(zoo):
    target, draft, _ = zoo
    mix = build_drafter("mixture", target, draft, domains="math,sql")
    names = set(mix.state_dict())
    student = build_student("mixture", mix)  # its modules are the drafter's (trained in place)
    assert isinstance(student, MixtureStudent)
    buf = MemoryBuffer()
    trainer = OnlineDistiller(student, buf, "draft", DistillConfig(lora=True, lr=1e-2))
    before = {k: v.clone() for k, v in student.export().weights.items()}
    gen = torch.Generator().manual_seed(0)
    for i in range(4):  # sql records, one labelled only by its domain; one of no adapter
        logits = torch.randn(6, draft.config.vocab_size, generator=gen)
        meta = {"adapter": "sql"} if i < 2 else {}
        domain = {2: "sql", 3: "prose"}.get(i)
        rec = build_record(f"r{i}", list(range(10, 22)), 6, list(range(6, 12)), logits,
                           drafter_id="draft", version=0, domain=domain, meta=meta)  # fmt: skip
        buf.put("draft", encode(rec))
    report = trainer.step()
    assert (report.records, report.positions) == (4, 18)  # the prose record predicts nothing
    after = student.export()
    assert after.kind == "lora"
    changed = {
        k.split(".")[2] for k in after.weights if not torch.equal(after.weights[k], before[k])
    }
    assert changed == {"sql"}  # names: base_model.model.<adapter>.…
    merged = student.merged_state_dict()
    assert set(merged) == names  # a replica loads the merged mixture as is


# ---- the product path: replica, trainer, registry (no Ray) --------------------------------


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_serve_trains_and_versions_a_mixture(monkeypatch):
    """``osd serve`` with ``drafter: mixture``: tagged requests are drafted by their domain's
    adapter (400 for a tag of no adapter), records carry the adapter, the trainer actor
    trains the LoRA adapters and publishes, the registry actor gates and versions the
    mixture, and the replica adopts the new version between steps."""
    from _served import follow, served, start_trainer, wait_until

    from osd.buffer import RedisStreamBuffer
    from osd.buffer.redis_stream import redis_client
    from osd.distill.record import decode

    config = {
        "drafter": "mixture",
        "buffer": {"holdout_every": 2},  # random request ids: ~8 of 16 held out
        "registry": {"gate_margin": 1.0},  # promote every candidate
        "serve": {"drafter_options": {"domains": "math,sql", "router": "tag"}},
        "trainer": {"distill": {"lora": True, "publish_every_steps": 1, "batch_records": 4}},
    }
    with served(monkeypatch, config) as ns:
        registry, replica, client = ns.registry, ns.replica, ns.client
        card = client.get("/v1/models").json()["data"][0]["osd"]
        assert card["drafter"] == "mixture" and card["adapters"] == ["math", "sql"]
        bad = client.post("/v1/completions", json={"prompt": "x", "domain": "prose"})
        assert bad.status_code == 400 and "domain 'prose'" in bad.text
        assert bad.json()["error"]["param"] == "domain"
        for i in range(16):
            domain = ("math", "sql")[i % 2]
            body = {"prompt": PROMPTS[domain], "max_tokens": 12, "temperature": 0,
                    "domain": domain}  # fmt: skip
            out = client.post("/v1/completions", json=body)
            assert out.status_code == 200, out.text
            assert out.json()["osd"]["adapter"] == domain
        wait_until(lambda: replica.sink.written >= 16, "records not written", 20)
        peek = RedisStreamBuffer(redis_client(ns.cfg.redis_url), group="peek")
        entries = peek.read("draft", 64)
        adapters = [decode(e.data).meta["adapter"] for e in entries]
        assert set(adapters) == {"math", "sql"}  # each record names its adapter

        trainer = start_trainer(ns)
        wait_until(lambda: trainer.decisions, lambda: f"no publish: {trainer.stats()}")
        decision = trainer.decisions[0]
        version = decision["version"]
        info = registry.versions("draft")[-1]
        assert info["kind"] == "lora" and info["lora"]["base_version"] == 0
        assert decision["promoted"] and decision["records"] >= 1  # held-out records
        assert follow(replica.follower, registry, "draft") == "adopt"
        body = {"prompt": PROMPTS["sql"], "max_tokens": 12, "temperature": 0,
                "domain": "sql"}  # fmt: skip
        out = client.post("/v1/completions", json=body).json()
        adopted = replica.follower.serving["version"]  # the trainer may have published again
        assert adopted >= version
        assert out["osd"]["drafter_version"] == adopted  # adopted between steps
        stats = client.get("/v1/osd/stats").json()
        assert stats["failed"] == 0 and stats["swaps"][-1]["version"] == adopted


# ---- the experiment's figures, on a synthetic run ----------------------------------------


def test_mixture_experiment_figures_on_a_synthetic_run(tmp_path):
    import sys
    from pathlib import Path

    from osd.online import RequestLog

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    from mixture import plot, routing_table, summarise, verdict

    def rows(online):  # 90 requests, math / sql / code in turn; frozen α 0.2 throughout
        return [
            RequestLog(i, d, 0, online[d] / 10, 0.2, 10, online[d], 10, 2)
            for i, d in zip(range(90), ["math", "sql", "code"] * 30, strict=True)
        ]

    domains = ["math", "sql", "code"]
    shared = summarise(rows({"math": 5, "sql": 4, "code": 3}), domains)
    mixed = summarise(rows({"math": 6, "sql": 5, "code": 4}), domains)
    assert shared["last_requests"] == 30
    assert shared["alpha_online"] == pytest.approx(0.4)
    assert mixed["alpha_online_by_domain"] == pytest.approx({"math": 0.6, "sql": 0.5, "code": 0.4})
    assert mixed["alpha_frozen"] == pytest.approx(0.2)
    v = verdict({"shared": shared, "mixture-tag": mixed})
    assert v["mixture-tag"] == pytest.approx(0.1) and v["best"] == "mixture-tag" and v["goal_met"]
    assert v["ci95"]["mixture-tag"] == pytest.approx([0.1, 0.1])  # every request +0.1
    routes = [("math", "a")] * 3 + [("math", "b")] + [("sql", "b")] * 4 + [("code", None)]
    r = routing_table(routes, domains)
    assert r["table"] == {"math": {"a": 3, "b": 1}, "sql": {"b": 4}, "code": {}}
    assert r["purity"] == pytest.approx(7 / 8)
    assert r["top"] == {"math": "a", "sql": "b"} and not r["specialised"]
    assert routing_table([("math", "a"), ("sql", "b")], ["math", "sql"])["specialised"]
    doc = {"runs": {"shared": shared, "mixture-tag": mixed}, "config": {"schedule": "s"}}
    plot(doc, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_the_mixture_topology_loads():
    from pathlib import Path

    from osd.actors.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "deploy" / "mixture.yaml")
    assert cfg.drafter == "mixture" and cfg.trainer.distill.lora
    assert cfg.serve.drafter_config(cfg.drafter, cfg.k) == {
        "k": 4,
        "domains": "math,sql,code",
        "router": "tag",
        "explore": 0.05,
        "home": 0.1,
        "versioning": "adapter",
    }
