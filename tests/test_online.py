"""The in-process online loop: the online draft beats the frozen one on a drift stream."""

from dataclasses import replace

import pytest

from osd.buffer import EmbeddedRedis, RedisStreamBuffer
from osd.models import load_model, load_tokenizer
from osd.online import REPLAY_DISTILL, OnlineConfig, plot_online, run_online


@pytest.mark.integration
@pytest.mark.slow
def test_online_draft_learns_the_drifted_domain(tmp_path, data_dir):
    target, draft = load_model("zoo:target", "cpu"), load_model("zoo:draft", "cpu")
    tok = load_tokenizer("zoo:target")
    cfg = OnlineConfig(
        schedule="switch:instruct>sql@10",
        n=40,  # 30 sql requests: gain 0.13 here (0.23 with 90; the claim asks > 0.05)
        max_new_tokens=24,
        distill=replace(REPLAY_DISTILL, publish_every_steps=8, lr=1e-3),
        window=10,
    )
    with EmbeddedRedis() as server:
        buffer = RedisStreamBuffer(server.url, maxlen=cfg.maxlen)
        result = run_online(target, draft, tok, buffer, cfg, data_dir=data_dir)
        assert buffer.length("draft") > 0  # records really went through Redis
    rep = result.to_json()
    sql = rep["by_domain"]["sql"]
    assert sql["requests"] == 30 and rep["by_domain"]["instruct"]["requests"] == 10
    assert any(v["promoted"] for v in rep["versions"])
    # conservative: the learning draft's α on the new domain beats the frozen draft's
    assert sql["gain"] > 0.05, rep["by_domain"]
    assert rep["bytes_ratio"] < 0.02
    plot_online(result, tmp_path / "alpha.png")
    assert (tmp_path / "alpha.png").stat().st_size > 10_000
