"""The figures the drift and cost experiments derive from their runs, on synthetic runs
(the runs themselves take minutes to hours: they are the experiments, not tests)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
from cost import _rows
from drift import SCHEDULES, summarise_run

from osd.online import RequestLog


def _log(i, domain, online, frozen, proposed=10):
    return RequestLog(
        i, domain, 0, online / proposed, frozen / proposed, proposed, online, proposed, frozen
    )


def test_drift_figures_on_a_synthetic_return_run():
    # instruct (α 0.8 both), sql (online climbs 0.2 -> 0.7, frozen stays 0.2), instruct again
    rows = [_log(i, "instruct", 8, 8) for i in range(40)]
    rows += [_log(40 + i, "sql", min(2 + i // 4, 7), 2) for i in range(40)]
    rows += [_log(80 + i, "instruct", 7, 8) for i in range(40)]
    run = summarise_run(rows, [40, 80], "return")
    assert run["recover_frozen"][0] is None  # the frozen draft never gets back to 0.8
    assert run["recover_online"][0] is None  # 0.7 < 0.8 - 0.05 either
    assert run["recover_online"][1] == 20 and run["recover_frozen"][1] == 20
    assert run["final_gain"] == pytest.approx(0.70 - 0.68)  # last 50: 10 sql + 40 instruct
    assert run["forgetting_online"] == pytest.approx(0.1)
    assert run["forgetting_frozen"] == pytest.approx(0.0)
    assert len(run["alpha_online"]) == 120


def test_drift_tau_from_the_steps_each_drafter_needed():
    from dataclasses import replace

    rows = [
        replace(_log(i, "sql", 9, 9), steps_online=8, steps_frozen=16, emitted=32)
        for i in range(60)
    ]
    run = summarise_run(rows, [20], "abrupt")
    assert run["alpha_last_online"] == run["alpha_last_frozen"]  # α equal, τ not
    assert run["tau_last_online"] == pytest.approx(4.0)
    assert run["tau_last_frozen"] == pytest.approx(2.0)
    assert "tau_last_online" not in summarise_run(
        [_log(i, "sql", 9, 9) for i in range(60)], [20], "abrupt"
    )


def test_drift_schedules_put_the_shift_where_they_say():
    from osd.workloads.schedule import parse_schedule

    for name, make in SCHEDULES.items():
        spec, shifts = make(120)
        mix = parse_schedule(spec, 120, seed=0).mix
        first = mix.probs(0)
        assert mix.probs(shifts[0] - 1) == first, name
        assert mix.probs(shifts[0] + 1) != first, name


def test_drift_variants_are_options_of_a_trainable_drafter():
    from drift import FAMILIES, VARIANTS, family

    from osd.drafters import drafter_spec

    for name in FAMILIES.split(","):
        drafter, options = family(name)
        spec = drafter_spec(drafter)
        assert spec.trainable, name
        assert set(options) <= set(spec.options()), name
    assert family("mcsd") == ("draft_model", VARIANTS["mcsd"][1])
    assert family("mcsd")[1]["target_init"] is True


def _drift_doc(families, n=120, schedules=("abrupt", "return")):
    rows = [_log(i, "instruct", 8, 8) for i in range(n // 3)]
    rows += [_log(n // 3 + i, "sql", 5, 2) for i in range(n // 3)]
    rows += [_log(2 * n // 3 + i, "instruct", 7, 8) for i in range(n - 2 * (n // 3))]
    runs = {}
    for f in families:
        for s in schedules:
            runs[f"{f}/{s}"] = summarise_run(rows, SCHEDULES[s](n)[1], s)
    config = {"n": n, "max_new_tokens": 32, "steps_per_request": 2, "lr": None, "seed": 0}
    return {"runs": runs, "config": {**config, "data_dir": None}}


def test_drift_merge_keeps_earlier_runs_and_draws_every_family(tmp_path, monkeypatch):
    import json

    import drift

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_drift_doc(["draft_model", "medusa"])))
    new.write_text(json.dumps(_drift_doc(["koala-eagle", "mcsd"], schedules=("abrupt",))))
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    argv = ["drift.py", "--drafters", "", "--n", "120", "--json", str(out), "--plot", str(png)]
    monkeypatch.setattr(sys, "argv", [*argv, "--merge", str(old), "--merge", str(new)])
    drift.main()
    doc = json.loads(out.read_text())
    assert list(doc["runs"]) == [  # FAMILIES order, then schedule order
        "draft_model/abrupt",
        "draft_model/return",
        "mcsd/abrupt",
        "medusa/abrupt",
        "medusa/return",
        "koala-eagle/abrupt",
    ]
    assert doc["config"]["drafters"] == "draft_model,mcsd,medusa,koala-eagle"
    assert doc["config"]["schedules"] == "abrupt,return"
    assert png.stat().st_size > 0
    # rows made at other settings are refused before anything runs
    monkeypatch.setattr(sys, "argv", [*argv[:4], "99", *argv[5:], "--merge", str(old)])
    with pytest.raises(SystemExit, match="n=120"):
        drift.main()
    # files from before rehearsal were made without it: not mixed with a --replay run
    monkeypatch.setattr(sys, "argv", [*argv, "--replay", "4", "--merge", str(old)])
    with pytest.raises(SystemExit, match="replay=0"):
        drift.main()


def test_cost_rows_average_rounds_and_compare_with_the_trainer_off():
    phases = [
        {
            "concurrency": 2,
            "round": r,
            "trainer": t,
            "tokens_per_s": v,
            "p99_s": 1.0 + r,
            "failed": 0,
            "trainer_steps": s,
            "trainer_steps_per_s": s / 10,
        }
        for r, pair in enumerate(
            [[("off", 100.0, 0), ("max", 90.0, 20)], [("max", 60.0, 20), ("off", 50.0, 0)]]
        )
        for t, v, s in pair
    ]
    rows = {r["trainer"]: r for r in _rows(phases)}
    assert rows["off"]["ratio_vs_off"] == 1.0
    assert rows["max"]["ratio_vs_off"] == pytest.approx(75 / 75)  # means: 75 vs 75
    # each round against its own trainer-off phase: 0.9 in a fast round, 1.2 in a slow one
    assert rows["max"]["ratio_per_round"] == pytest.approx([0.9, 1.2])
    assert rows["max"]["ratio_median"] == pytest.approx(1.05)
    assert rows["max"]["tokens_per_s_rounds"] == [90.0, 60.0]
    assert rows["max"]["trainer_steps"] == 40 and rows["max"]["p99_s"] == 2.0


def test_log_cost_redis_run_and_plot(tmp_path):
    from log_cost import KS, plot, redis_run

    run = redis_run([b"x" * 500, b"y" * 900], n=40, batch=8)
    assert run["redis_us_per_record"] > 0 and run["shard_records_per_s"] > 0
    cost = [
        {"mode": m, "k": k, "bytes_per_request": 100.0 * k, "shard_records_per_s": 1e4}
        for m in ("all", "rejected")
        for k in KS
    ]
    gain = [{"mode": "all", "k": 16, "rate": 0.5, "alpha_gain": 0.2}]
    plot({"cost": cost, "gain": gain}, str(tmp_path / "log_cost.png"))
    assert (tmp_path / "log_cost.png").stat().st_size > 1000
