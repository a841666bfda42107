"""The cluster commands: help texts, config errors, and `osd replay` without a server."""

import json

import pytest
import typer
from typer.testing import CliRunner

from osd.cli import cluster as cli_cluster

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    for fn in (cli_cluster.demo, cli_cluster.serve, cli_cluster.launch, cli_cluster.replay):
        app.command()(fn)
    return app


@pytest.mark.parametrize(
    "cmd, words",
    [
        ("demo", "--json"),
        ("serve", "--trainers"),
        ("launch", "--address"),
        ("replay", "--schedule"),
    ],
)
def test_every_command_has_help(app, cmd, words):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and words in r.output


def test_bad_config_is_a_clear_error(app, tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("serve: {replicas: 0}\n")
    r = runner.invoke(app, ["launch", "--config", str(bad)])
    assert r.exit_code == 2 and "serve.replicas" in r.output


def test_serve_names_the_drafter(app, tmp_path):
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--drafter" in r.output and "--max-batch" in r.output
    r = runner.invoke(app, ["serve", "--drafter", "redrafter"])
    assert r.exit_code == 2 and "unknown drafter 'redrafter'" in r.output
    bad = tmp_path / "t.yaml"
    bad.write_text("serve: {drafter_options: {depth: 3}}\n")
    r = runner.invoke(app, ["serve", "--config", str(bad), "--drafter", "ngram"])
    assert r.exit_code == 2 and "takes no option" in r.output and "'depth'" in r.output


def test_replay_records_failures_when_nothing_listens(app, tmp_path, data_dir):
    out = tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "replay",
            "--schedule",
            "math",
            "--n",
            "3",
            "--url",
            "http://127.0.0.1:9",  # discard port: connection refused
            "--json",
            str(out),
            "--data-dir",
            str(data_dir),
        ],
    )
    assert r.exit_code == 1, r.output  # failed requests make the command fail
    doc = json.loads(out.read_text())
    assert doc["summary"]["failed"] == 3 and len(doc["requests"]) == 3
    assert all(q["status"] == 0 and q["error"] for q in doc["requests"])
