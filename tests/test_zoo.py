import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from osd.models import load_model, load_tokenizer, resolve, zoo_dir
from osd.workloads.datasets import DOMAINS, load_domain
from osd.zoo.build import PRESETS, sample_batch
from osd.zoo.report import zoo_report


def test_micro_zoo_builds_loads_and_generates(micro_zoo):
    for role in ("target", "draft"):
        path = micro_zoo / role
        meta = json.loads((path / "zoo.json").read_text())
        assert meta["role"] == role and meta["preset"] == "micro"
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.dtype == torch.float16  # stored in half precision
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("Question: how many?", return_tensors="pt").input_ids
        out = model.float().generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert out.shape[1] == ids.shape[1] + 5
    # the draft really is smaller than the target
    t = load_model(str(micro_zoo / "target"))
    d = load_model(str(micro_zoo / "draft"))
    assert t.dtype == torch.float32  # loaded as fp32 on CPU
    assert d.config.num_hidden_layers < t.config.num_hidden_layers


def test_micro_zoo_is_reproducible(micro_zoo, tmp_path, data_dir):
    from osd.zoo.build import build_zoo

    build_zoo(tmp_path, "micro", data_dir=data_dir)
    a = AutoModelForCausalLM.from_pretrained(micro_zoo / "target").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "target").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_has_the_documented_shape(micro_zoo, data_dir):
    rep = zoo_report(
        str(micro_zoo / "target"), str(micro_zoo / "draft"), n=2, repeats=1, data_dir=data_dir
    )
    assert set(rep) == {"target", "draft", "cost_ratio"}
    for role in ("target", "draft"):
        assert set(rep[role]) == {"params", "decode_ms", "ppl"}
        assert set(rep[role]["ppl"]) == set(DOMAINS)
        assert all(v > 1 for v in rep[role]["ppl"].values())
    assert rep["target"]["params"] > rep["draft"]["params"]
    assert rep["cost_ratio"] == pytest.approx(
        rep["target"]["decode_ms"] / rep["draft"]["decode_ms"], rel=1e-2
    )


def test_sample_batch_respects_domain_weights():
    streams = {
        "math": torch.zeros(1000, dtype=torch.long),
        "sql": torch.ones(1000, dtype=torch.long),
    }
    gen = torch.Generator().manual_seed(0)
    batch = sample_batch(streams, {"math": 0.75, "sql": 0.25}, 4000, 8, gen)
    assert batch.shape == (4000, 8)
    frac_sql = (batch[:, 0] == 1).float().mean().item()
    assert abs(frac_sql - 0.25) < 0.03


def test_presets_keep_the_draft_on_general_text():
    for spec in PRESETS.values():
        assert set(spec.draft.domains) == {"prose", "instruct"}
        assert set(spec.target.domains) == set(DOMAINS)


def test_unknown_models_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo model 'zoo:nope'"):
        resolve("zoo:nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve("./no/such/model")
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        resolve(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        resolve("")
    with pytest.raises(ValueError, match="could not load 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(ValueError, match="could not load"):
        load_tokenizer("no-such-org/no-such-model")


def test_shipped_tokenizer_round_trips_every_domain(micro_zoo, data_dir):
    tok_dirs = [micro_zoo / "target"]
    if (zoo_dir() / "target" / "tokenizer.json").is_file():
        tok_dirs.append(zoo_dir() / "target")
    extra = "naïve café — 東京 🙂\ttabs\n\n  spaces  \r\n"
    for path in tok_dirs:
        tok = AutoTokenizer.from_pretrained(path)
        for d in DOMAINS:
            for q in load_domain(d, "eval", data_dir)[:20]:
                ids = tok(q.text, add_special_tokens=False).input_ids
                assert tok.decode(ids) == q.text
        assert tok.decode(tok(extra, add_special_tokens=False).input_ids) == extra
