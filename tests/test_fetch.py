"""Real models by name without fetching anything: what zoo:smollm2 resolves to, the error
that says what to run when it is missing, and fetch's checks (checksum, atomic folder)."""

import json

import pytest

from osd.models import default_draft, is_real, resolve
from osd.zoo import fetch as fetch_mod


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch_mod.MODELS_DIR_ENV, str(tmp_path / "models"))
    return tmp_path / "models"


def test_missing_real_models_say_what_to_run(empty_cache):
    with pytest.raises(ValueError, match="osd models get smollm2"):
        resolve("zoo:smollm2")
    with pytest.raises(ValueError, match="osd models get smollm2"):
        resolve("smollm2")  # the bare name means the same
    with pytest.raises(ValueError, match="osd zoo build --target smollm2"):
        resolve("zoo:smollm2-draft")


def test_a_fetched_model_resolves_from_the_cache(empty_cache):
    (empty_cache / "smollm2").mkdir(parents=True)
    (empty_cache / "smollm2" / "config.json").write_text("{}")
    assert resolve("zoo:smollm2") == resolve("smollm2") == str(empty_cache / "smollm2")
    assert resolve("zoo:target").endswith("target")  # the shipped zoo is unaffected


def test_default_drafts():
    assert default_draft("smollm2") == default_draft("zoo:smollm2") == "zoo:smollm2-draft"
    assert default_draft("zoo:target") == "zoo:draft"
    assert is_real("smollm2") and not is_real("zoo:smollm2-draft") and not is_real("zoo:target")


def test_unknown_model_is_refused(empty_cache):
    with pytest.raises(ValueError, match="knows: smollm2"):
        fetch_mod.fetch("llama-70b")


def _fake_sources(tmp_path, monkeypatch, content: bytes):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(content)
    monkeypatch.setattr(fetch_mod, "ensure_gguf_support", lambda say: None)
    monkeypatch.setattr(fetch_mod, "_installed_gguf", lambda spec: gguf)

    def convert(src, out, say):
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(fetch_mod, "convert_gguf", convert)


def test_fetch_refuses_a_file_with_the_wrong_checksum(tmp_path, empty_cache, monkeypatch):
    _fake_sources(tmp_path, monkeypatch, b"not the model")
    with pytest.raises(RuntimeError, match="refusing it"):
        fetch_mod.fetch("smollm2", say=lambda m: None)
    assert not fetch_mod.is_fetched("smollm2")


def test_fetch_writes_the_folder_once(tmp_path, empty_cache, monkeypatch):
    import hashlib
    from dataclasses import replace

    content = b"a gguf"
    spec = replace(
        fetch_mod.REAL_MODELS["smollm2"], gguf_sha256=hashlib.sha256(content).hexdigest()
    )
    monkeypatch.setitem(fetch_mod.REAL_MODELS, "smollm2", spec)
    _fake_sources(tmp_path, monkeypatch, content)
    said = []
    out = fetch_mod.fetch("smollm2", say=said.append)
    assert out == empty_cache / "smollm2" and fetch_mod.is_fetched("smollm2")
    meta = json.loads((out / "osd_model.json").read_text())
    assert meta["gguf_sha256"] == spec.gguf_sha256 and meta["hub_id"].startswith("HuggingFaceTB/")
    assert not (empty_cache / "smollm2.partial").exists()
    fetch_mod.fetch("smollm2", say=said.append)  # second time: nothing to do
    assert "already" in said[-1]
