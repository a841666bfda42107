"""Build the tiny model zoo: a byte-level BPE tokenizer, a Llama target, a general draft.

``osd zoo build`` calls :func:`build_zoo`. Everything is seeded, so the same data and preset
give the same zoo. The target learns all five domains; the draft learns the target's
next-token distribution (distillation) on prose + instruct only, so math, sql and code are
the drift the online loop has to learn (as in the OSD paper).

Training samples fixed-length windows from one token stream per domain (documents joined
by EOS), picking each row's domain by the preset's weights, so that a small domain (sql)
is not drowned by a large one (math).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from osd.workloads.datasets import DOMAINS, load_domain

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class LMSpec:
    """Size and training budget of one zoo model (Llama architecture)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    steps: int
    domains: dict[str, float]  # domain -> sampling weight of training rows
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    # learn the target's next-token distribution (forward KL) instead of the data's next
    # token: a draft must agree with its target, not just model the same text
    distill: bool = False


@dataclass(frozen=True)
class ZooSpec:
    vocab_size: int
    target: LMSpec
    draft: LMSpec
    tokenizer_chars: int = 2_000_000  # characters per domain fed to the BPE trainer
    max_docs: int | None = None  # cap on training documents per domain (micro builds)
    seed: int = 0
    max_position: int = 1024
    name: str = "default"


_ALL = {"math": 0.3, "code": 0.25, "prose": 0.2, "sql": 0.15, "instruct": 0.1}
_GENERAL = {"prose": 0.6, "instruct": 0.4}

PRESETS: dict[str, ZooSpec] = {
    # ~9.1M-parameter target (8 × 288) and ~1M draft (2 × 128): a target decode step costs
    # ≈ 5× a draft step on a 2-core CPU; ≈ 20 MB in fp16; ≈ 25 min to build on 2 cores.
    "default": ZooSpec(
        vocab_size=4096,
        target=LMSpec(hidden=288, layers=8, intermediate=768, heads=4, steps=1100, domains=_ALL),
        draft=LMSpec(
            hidden=128,
            layers=2,
            intermediate=384,
            heads=2,
            steps=1000,
            domains=_GENERAL,
            distill=True,
        ),
    ),
    # Seconds-long build for tests: same code path, toy sizes.
    "micro": ZooSpec(
        vocab_size=320,
        target=LMSpec(
            hidden=32,
            layers=2,
            intermediate=64,
            heads=2,
            steps=6,
            domains=_ALL,
            batch=2,
            seq_len=32,
            warmup=2,
        ),
        draft=LMSpec(
            hidden=16,
            layers=1,
            intermediate=32,
            heads=2,
            steps=4,
            domains=_GENERAL,
            batch=2,
            seq_len=32,
            warmup=2,
            distill=True,
        ),
        tokenizer_chars=20_000,
        max_docs=200,
        max_position=256,
        name="micro",
    ),
}


@dataclass
class BuildResult:
    out_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every string round-trips (no unknown tokens, no normalisation)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def token_streams(
    tokenizer: PreTrainedTokenizerFast,
    domains: list[str],
    data_dir=None,
    max_docs: int | None = None,
) -> dict[str, torch.Tensor]:
    """One 1-D token stream per domain: train-split texts joined by EOS."""
    eos = tokenizer.eos_token_id
    streams = {}
    for d in domains:
        texts = [q.text for q in load_domain(d, "train", data_dir)[:max_docs]]
        ids: list[int] = []
        for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        streams[d] = torch.tensor(ids, dtype=torch.long)
    return streams


def llama_config(spec: LMSpec, zoo: ZooSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        intermediate_size=spec.intermediate,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=zoo.max_position,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sample_batch(
    streams: dict[str, torch.Tensor],
    weights: dict[str, float],
    batch: int,
    seq_len: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """[batch, seq_len] windows, each row from a domain drawn by ``weights``."""
    names = [d for d in weights if d in streams]
    w = torch.tensor([weights[d] for d in names], dtype=torch.float)
    rows = []
    for i in torch.multinomial(w, batch, replacement=True, generator=gen).tolist():
        s = streams[names[i]]
        if len(s) <= seq_len:  # tiny domain (micro tests): repeat it
            s = s.repeat(seq_len // max(len(s), 1) + 2)
        start = int(torch.randint(0, len(s) - seq_len, (1,), generator=gen))
        rows.append(s[start : start + seq_len])
    return torch.stack(rows)


def train_lm(
    config: LlamaConfig,
    spec: LMSpec,
    streams: dict[str, torch.Tensor],
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    teacher: LlamaForCausalLM | None = None,
) -> tuple[LlamaForCausalLM, float]:
    """Train from scratch with AdamW and warmup + cosine decay; returns (model, final loss).

    With ``spec.distill`` the loss is KL(teacher ‖ model) per token on the same windows.
    """
    if spec.distill and teacher is None:
        raise ValueError("spec.distill needs a teacher model")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = float("nan")
    for step in range(spec.steps):
        ids = sample_batch(streams, spec.domains, spec.batch, spec.seq_len, gen)
        if spec.distill:
            with torch.no_grad():
                t_logp = teacher(input_ids=ids).logits.log_softmax(-1).flatten(0, 1)
            s_logp = model(input_ids=ids).logits.log_softmax(-1).flatten(0, 1)
            loss = torch.nn.functional.kl_div(
                s_logp, t_logp, log_target=True, reduction="batchmean"
            )
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        if on_step is not None:
            on_step(step + 1, ema)
    model.eval()
    return model, ema


def save_model(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path, meta: dict
) -> None:
    """HF folder: config.json, model.safetensors (fp16), tokenizer files, zoo.json."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(path)
    (path / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")


def build_zoo(
    out_dir: str | Path,
    preset: str | ZooSpec = "default",
    data_dir=None,
    seed: int | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    only: str | None = None,
) -> BuildResult:
    """Build tokenizer, target and draft into ``out_dir/{target,draft}``.

    ``progress(stage, step, total, loss)`` is called after every training step.
    """
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    if seed is not None:
        spec = replace(spec, seed=seed)
    out = Path(out_dir)
    result = BuildResult(out_dir=out)

    if only not in (None, "draft"):
        raise ValueError(f"only must be None or 'draft', got {only!r}")
    t0 = time.perf_counter()
    teacher = None
    if only == "draft":  # keep the tokenizer and target already in out_dir
        if not (out / "target" / "config.json").is_file():
            raise FileNotFoundError(f"--only draft needs a built target in {out / 'target'}")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "target")
        teacher = LlamaForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    else:
        tokenizer = train_tokenizer(_tokenizer_texts(spec, data_dir), spec.vocab_size)
    result.seconds["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    streams = token_streams(tokenizer, list(DOMAINS), data_dir, spec.max_docs)
    result.seconds["tokenize"] = time.perf_counter() - t0
    log.info("token streams: %s", {d: len(s) for d, s in streams.items()})

    for i, (role, lm) in enumerate((("target", spec.target), ("draft", spec.draft))):
        if only is not None and role != only:
            continue
        t0 = time.perf_counter()
        cb = None
        if progress is not None:
            cb = lambda step, loss, role=role, lm=lm: progress(role, step, lm.steps, loss)  # noqa: E731
        config = llama_config(lm, spec, tokenizer)
        model, loss = train_lm(
            config, lm, {d: streams[d] for d in lm.domains}, spec.seed + i, cb, teacher
        )
        result.seconds[role] = time.perf_counter() - t0
        result.final_loss[role] = loss
        meta = {
            "role": role,
            "preset": spec.name,
            "seed": spec.seed + i,
            "spec": asdict(lm),
            "train_tokens": lm.steps * lm.batch * lm.seq_len,
            "stream_tokens": {d: len(streams[d]) for d in lm.domains},
            "final_train_loss": loss,
            "train_seconds": result.seconds[role],
        }
        save_model(model, tokenizer, out / role, meta)  # rounds the weights to fp16
        if role == "target":
            teacher = model  # the draft learns from the target exactly as shipped
    return result


def _tokenizer_texts(spec: ZooSpec, data_dir) -> list[str]:
    """Train-split texts, up to ``spec.tokenizer_chars`` characters per domain."""
    texts = []
    for d in DOMAINS:
        budget = spec.tokenizer_chars
        for q in load_domain(d, "train", data_dir):
            texts.append(q.text)
            budget -= len(q.text)
            if budget <= 0:
                break
    return texts
