"""A draft for a real target (``osd zoo build --target smollm2``).

No smaller SmolLM2 exists, so the draft is made here with the target's tokenizer: a Llama
with the target's width whose token embedding — tied to its LM head — is the target's,
frozen; its few decoder layers start as the target's first layers and its final norm as
the target's, and only those are trained, by distillation (forward KL to the target's
full next-token distribution) on **prose + instruct only** (raw text and the instruct
pairs through the chat template), so math, sql and code stay the drift the online loop
must learn. Everything is seeded.

A 49,152-row LM head dominates such a draft's cost, so the build also writes the draft's
**frequent-token shortlist** (FR-Spec): the ``shortlist`` most frequent target tokens of the
training text (special tokens included), saved as ``shortlist.json``; the draft-model
drafter can draft over those rows of the head only and map them back to the target's ids
(``build_drafter("draft_model", …, shortlist=True)``), which stays lossless.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from osd.drafters.draft_model import SHORTLIST_FILE
from osd.workloads.datasets import load_domain


@dataclass(frozen=True)
class RealDraftSpec:
    layers: int = 1  # decoder layers, initialised from the target's first ones
    steps: int = 150
    batch: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 10
    shortlist: int = 4096  # FR-Spec frequent-token shortlist size
    max_docs: int = 4000  # training documents per domain
    seed: int = 0


def _instruction(prompt: str) -> str:
    """``Instruction: …\n[Input: …\n]Output:`` → the user's message."""
    return prompt.removeprefix("Instruction: ").removesuffix("Output:").strip()


def _texts(tok, max_docs: int, data_dir=None) -> dict[str, list[str]]:
    """Prose as raw text; instruct as raw text and, for every other pair, through the chat
    template (the shape of chat-completion traffic)."""
    prose = [q.text for q in load_domain("prose", "train", data_dir)[:max_docs]]
    instruct = []
    for i, q in enumerate(load_domain("instruct", "train", data_dir)[:max_docs]):
        if i % 2 == 0 or not q.reference or not tok.chat_template:
            instruct.append(q.text)
            continue
        msgs = [
            {"role": "user", "content": _instruction(q.prompt)},
            {"role": "assistant", "content": q.reference.strip()},
        ]
        instruct.append(tok.apply_chat_template(msgs, tokenize=False))
    return {"prose": prose, "instruct": instruct}


def _streams(tok, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    sep = tok.convert_tokens_to_ids(tok.unk_token or tok.eos_token)  # <|endoftext|> here
    out = {}
    for d, docs in texts.items():
        ids: list[int] = []
        for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(sep)
        out[d] = torch.tensor(ids, dtype=torch.long)
    return out


def shortlist_of(streams: dict[str, torch.Tensor], tok, size: int) -> list[int]:
    """The ``size`` most frequent tokens of the streams, special tokens first, sorted."""
    special = set(tok.all_special_ids)
    counts = Counter()
    for s in streams.values():
        counts.update(s.tolist())
    ids = list(special) + [t for t, _ in counts.most_common() if t not in special]
    return sorted(ids[:size])


def init_draft(target, layers: int) -> LlamaForCausalLM:
    """The target's embedding (tied head), final norm and first ``layers`` layers."""
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = layers
    cfg.tie_word_embeddings = True
    draft = LlamaForCausalLM(cfg)
    keep = {
        k: v
        for k, v in target.state_dict().items()
        if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers
    }
    draft.load_state_dict(keep, strict=False)
    draft.tie_weights()
    draft.model.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
    return draft


def train_real_draft(
    target,
    tok,
    out: Path,
    spec: RealDraftSpec = RealDraftSpec(),
    progress: Callable[[str, int, int, float], None] | None = None,
    meta: dict | None = None,
    data_dir=None,
) -> dict:
    """Distil a draft from ``target`` on prose + instruct and save it (HF folder) to ``out``."""
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    streams = _streams(tok, _texts(tok, spec.max_docs, data_dir))
    draft = init_draft(target, spec.layers)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    from osd.zoo.build import sample_batch

    weights = {"prose": 0.5, "instruct": 0.5}
    ema = float("nan")
    target.eval()
    for step in range(spec.steps):
        ids = sample_batch(streams, weights, spec.batch, spec.seq_len, gen)
        with torch.no_grad():
            t_logp = target(input_ids=ids).logits.log_softmax(-1).flatten(0, 1)
        s_logp = draft(input_ids=ids).logits.log_softmax(-1).flatten(0, 1)
        loss = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema = loss.item() if math.isnan(ema) else 0.9 * ema + 0.1 * loss.item()
        if progress is not None:
            progress("draft", step + 1, spec.steps, ema)
    draft.eval()
    seconds = time.perf_counter() - t0
    shortlist = shortlist_of(streams, tok, spec.shortlist)
    covered = sum(torch.isin(s, torch.tensor(shortlist)).sum().item() for s in streams.values())
    total = sum(len(s) for s in streams.values())
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / SHORTLIST_FILE).write_text(json.dumps(shortlist) + "\n")
    info = {
        "role": "draft",
        **(meta or {}),
        "spec": asdict(spec),
        "train_tokens": spec.steps * spec.batch * spec.seq_len,
        "stream_tokens": {d: len(s) for d, s in streams.items()},
        "final_train_kl": ema,
        "train_seconds": round(seconds, 1),
        "shortlist": len(shortlist),
        "shortlist_coverage": covered / max(total, 1),
    }
    (out / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
