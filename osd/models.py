"""Load targets, drafts and tokenizers by one name: ``zoo:NAME``, a local path, or a Hub id.

>>> model, tok = load_model("zoo:target"), load_tokenizer("zoo:target")   # doctest: +SKIP

The zoo ships its models inside the package (``osd/zoo/artifacts/``) in plain Hugging Face
format, so ``AutoModelForCausalLM.from_pretrained(zoo_path("target"))`` works too.
Weights are stored in fp16 and loaded as fp32 on the CPU (fp16 matmuls are slow there).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).parent / "zoo" / "artifacts"
ZOO_DIR_ENV = "OSD_ZOO_DIR"
ZOO_PREFIX = "zoo:"


def zoo_dir() -> Path:
    """The folder holding the zoo (``$OSD_ZOO_DIR`` overrides the shipped one)."""
    return Path(os.environ.get(ZOO_DIR_ENV, ZOO_DIR))


def zoo_names() -> list[str]:
    """Names loadable as ``zoo:NAME``: the shipped zoo and the models fetched or built into
    the user's cache (``osd models get``)."""
    from osd.zoo.fetch import models_dir

    names = set()
    for d in (zoo_dir(), models_dir()):
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if (p / "config.json").is_file())
    return sorted(names)


def resolve(name: str) -> str:
    """Map a model name to what ``from_pretrained`` takes; raise a clear error if impossible.

    ``zoo:target`` → the shipped folder; ``zoo:smollm2`` (and its ``zoo:smollm2-draft``) →
    the user's model cache (``osd models get``, ``osd.zoo.fetch``); an existing local path →
    itself; anything else is treated as a Hub id and checked only when loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("model name is empty; use zoo:target, zoo:draft, a local path or a Hub id")
    if name.startswith(ZOO_PREFIX):
        short = name[len(ZOO_PREFIX) :]
        path = zoo_dir() / short
        if not (path / "config.json").is_file():
            from osd.zoo.fetch import REAL_MODELS, is_fetched, missing_message, model_path

            if is_fetched(short):  # fetched or built into the user's cache
                return str(model_path(short))
            if short.removesuffix("-draft") in REAL_MODELS:
                raise ValueError(missing_message(short))
            have = ", ".join(ZOO_PREFIX + n for n in zoo_names()) or "none (run `osd zoo build`)"
            raise ValueError(
                f"unknown zoo model {name!r}; the zoo at {zoo_dir()} and the model cache have: "
                f"{have} (`osd models get smollm2` fetches a real target)"
            )
        return str(path)
    p = Path(name).expanduser()
    if not p.exists() and _real_name(name):  # `--target smollm2` means zoo:smollm2
        return resolve(ZOO_PREFIX + name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{p} exists but holds no config.json; is it a Hugging Face model folder?"
            )
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"model path {name!r} does not exist")
    return name


def _real_name(name: str) -> bool:
    from osd.zoo.fetch import REAL_MODELS

    return name.removesuffix("-draft") in REAL_MODELS


def default_draft(target: str) -> str:
    """The draft that goes with ``target``: ``zoo:NAME-draft`` for a real target (``smollm2``
    or ``zoo:smollm2``; built by ``osd zoo build --target NAME``), else ``zoo:draft``.

    >>> default_draft("smollm2"), default_draft("zoo:target")
    ('zoo:smollm2-draft', 'zoo:draft')
    """
    short = target.removeprefix(ZOO_PREFIX)
    return f"{ZOO_PREFIX}{short}-draft" if _real_name(short) else f"{ZOO_PREFIX}draft"


def is_real(target: str) -> bool:
    """Whether ``target`` names a real pretrained target (``smollm2``, ``zoo:smollm2``)."""
    return _real_name(target.removeprefix(ZOO_PREFIX)) and not target.endswith("-draft")


def _hub_error(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"could not load {name!r}: not a zoo name (zoo:…), not a local folder, and the Hugging "
        f"Face Hub could not provide it ({type(err).__name__}: {err}). Without a network, use "
        "a zoo model or a local path."
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A causal LM in eval mode: fp32 on CPU, bf16 on CUDA unless ``dtype`` says otherwise."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except OSError as err:
        raise _hub_error(name, err) from err
    log.debug("loaded %s (%s) on %s", name, path, device)
    return model.to(device).eval()


def load_tokenizer(name: str):
    """The tokenizer shipped with a model (zoo models share one)."""
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _hub_error(name, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
