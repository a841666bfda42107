"""``osd serve --drafter medusa`` under real Ray, Serve, Redis and HTTP, with a trainer: the
replica serves the zoo's Medusa heads, its greedy text is the target's own greedy text,
its records (with the target's hidden states) reach the trainer, and a head version the
trainer publishes is gated, promoted and hot-swapped into the replica under traffic."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 24

CONFIG = """\
drafter: medusa
buffer: {holdout_every: 4}
registry: {poll_s: 0.2, gate_margin: 0.05}
trainer:
  distill: {lr: 1.0e-3, batch_records: 4, publish_every_steps: 4, publish_every_s: 5.0}
"""


@pytest.fixture(scope="module")
def served(osd_serve, tmp_path_factory, data_dir):
    """Requests (instruct, then math) until the replica serves a trained head version."""
    from osd.workloads.schedule import parse_schedule

    config = tmp_path_factory.mktemp("serve") / "medusa.yaml"
    config.write_text(CONFIG)
    reqs = parse_schedule("switch:instruct>math@12", 64, seed=3).build(data_dir=data_dir)
    answers = []
    with osd_serve("--config", str(config), "--trainers", "1") as url:
        deadline = time.monotonic() + 240
        for req in reqs:
            body = {"prompt": req.query.prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            answers.append((req, r))
            version = r.json()["osd"]["drafter_version"] if r.status_code == 200 else 0
            if (len(answers) >= 24 and version > 0) or time.monotonic() > deadline:
                break
        health = httpx.get(f"{url}/health", timeout=10).json()
    return answers, health


def test_medusa_replica_serves_and_adopts_a_trained_version(served):
    answers, health = served
    assert [r.status_code for _, r in answers] == [200] * len(answers), answers[-1][1].text
    versions = [r.json()["osd"]["drafter_version"] for _, r in answers]
    assert versions[0] == 0 and versions[-1] > 0, versions  # a trained head went live
    assert versions == sorted(versions)  # never rolled back under this traffic
    assert health["drafter_version"] == versions[-1]
    taus = [r.json()["osd"]["tau"] for _, r in answers]
    assert sum(taus) / len(taus) > 1.3, taus  # the heads are drafting, not idle


def test_medusa_replica_greedy_text_is_the_targets(served):
    import torch

    from osd.models import load_model, load_tokenizer

    answers, _ = served
    target, tok = load_model("zoo:target", "cpu"), load_tokenizer("zoo:target")
    picked = answers[:: max(1, len(answers) // 6)]
    for req, r in picked:
        ids = tok(req.query.prompt, add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = target.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == text, (req.index, r.json()["osd"])
    assert len(picked) >= 6
