"""osd bench: methods chosen by drafter name, and the serving benchmark's levels and report."""

import json

import pytest
from typer.testing import CliRunner

from osd.bench.decode import default_methods
from osd.bench.serving import ServingBenchConfig, _percentile, parse_levels, run_serving_bench
from osd.cli.main import app

runner = CliRunner()


def test_default_methods_by_drafter_name():
    names = [m.name for m in default_methods(4)]
    assert names == [
        "target_only (HF)",
        "hf_assisted k=4",
        "ours target_only",
        "ours draft chain k=4",
        "ours draft chain adaptive",
        "ours draft chain k=8 early-stop",
        "ours draft tree 2,2,1",
        "ours draft tree 4,2,2",
        "ours ngram k=4",
        "ours ngram tree",
        "ours ngram tree+history",
    ]
    ngram = default_methods(3, ["ngram", "none"])
    assert [m.name for m in ngram] == [
        "target_only (HF)",
        "ours target_only",
        "ours ngram k=3",
        "ours ngram tree",
        "ours ngram tree+history",
    ]
    assert dict(ngram[-1].options) == {"nodes": 10, "history": 1 << 16}
    assert ngram[0].kind == "hf"  # the reference of speedup and matches_target comes first
    with pytest.raises(ValueError, match="unknown drafter 'redrafter'; choose from"):
        default_methods(4, ["redrafter"])
    heads = default_methods(4, ["medusa", "eagle"])  # head drafters: a row each, by name
    assert [m.name for m in heads][-3:] == ["medusa", "medusa 32 nodes", "eagle"]
    assert heads[-3].options == () and dict(heads[-2].options) == {"nodes": 32}  # auto-sized


def test_levels_and_percentiles():
    assert parse_levels("1, 8,32") == (1, 8, 32)
    for bad in ("0,8", "a", ""):
        with pytest.raises(ValueError, match="concurrency"):
            parse_levels(bad)
    assert _percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert _percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError, match="unknown drafter"):
        ServingBenchConfig(drafter="nope").validate()


def test_serving_bench_serves_every_prompt_at_every_level(data_dir):
    cfg = ServingBenchConfig(
        concurrency=(1, 3), n=1, requests=3, max_new_tokens=6, domains="math,sql,code", device="cpu"
    )
    seen = []
    rep = run_serving_bench(cfg, data_dir, lambda c, done, total: seen.append((c, done, total)))
    assert rep["requests_per_level"] == 3 and rep["max_batch"] == 3
    c1, c3 = rep["serving"]
    assert [c1["concurrency"], c3["concurrency"]] == [1, 3]
    for lv in (c1, c3):
        assert lv["requests"] == 3 and lv["tokens"] == 18  # EOS ignored: exactly 6 each
        assert lv["tokens_per_s"] > 0 and 0 < lv["p50_s"] <= lv["p99_s"]
        assert lv["matches_c1"] == 3  # greedy: batching does not change any output
    assert c1["ratio_vs_c1"] == 1.0 and c1["mean_batch"] == 1.0
    assert c3["ratio_vs_c1"] == c3["tokens_per_s"] / c1["tokens_per_s"]
    assert (1, 0, 3) in seen and (1, 3, 3) in seen and (3, 3, 3) in seen
    json.dumps(rep)  # JSON-able as written by --json


def test_serving_rounds_interleave_the_levels_and_pool_them(data_dir):
    cfg = ServingBenchConfig(
        concurrency=(1, 2), n=1, requests=2, max_new_tokens=4, domains="math,sql", rounds=2
    )
    seen = []
    rep = run_serving_bench(cfg, data_dir, lambda c, done, total: seen.append((c, done)))
    assert [c for c, done in seen if done == 0] == [1, 2, 1, 2]  # 1, 2, then 1, 2 again
    assert rep["rounds"] == 2
    for lv in rep["serving"]:
        assert lv["requests"] == 4 and lv["tokens"] == 16  # both rounds pooled
        assert lv["matches_c1"] == 4
        assert len(lv["tokens_per_s_rounds"]) == 2 and len(lv["ratio_vs_c1_rounds"]) == 2
        pooled = lv["tokens"] / lv["wall_s"]
        assert lv["tokens_per_s"] == pytest.approx(pooled)
    assert rep["serving"][0]["ratio_vs_c1_rounds"] == [1.0, 1.0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rounds"):
            ServingBenchConfig(rounds=bad).validate()
    with pytest.raises(ValueError, match="repeat"):  # a repeated level would be pooled twice
        ServingBenchConfig(concurrency=(1, 8, 8)).validate()


def test_serving_takes_one_drafter():
    r = runner.invoke(app, ["bench", "--serving", "--drafters", "draft_model,ngram"])
    assert r.exit_code != 0 and "one drafter" in r.output


def test_verify_costs_time_every_token_count_from_one_forward_each_round():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from osd.bench.costs import verify_costs

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    out = verify_costs(LlamaForCausalLM(cfg).eval(), context=16, ns=[1, 3, 5], reps=3)
    assert sorted(out["ms"]) == [1, 3, 5] and all(v > 0 for v in out["ms"].values())
    assert out["c1_ms"] == out["ms"][1] and out["ratio"][1] == 1.0
