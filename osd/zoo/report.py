"""``osd zoo report``: held-out perplexity per domain, parameter counts and decode cost.

Perplexity is exp(mean token NLL) over the *eval* split's full texts (prompt + reference),
the first ``n`` queries of each domain, truncated to the model's context.

Decode cost is the wall time of one single-token forward with a KV cache (batch 1, the
step a speculative decoder repeats), measured for target and draft **interleaved in the
same process** and reported as the median over repeats; ``cost_ratio`` = target ÷ draft.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from osd.models import count_params, load_model, load_tokenizer
from osd.workloads.datasets import DOMAINS, load_domain


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_len: int | None = None) -> float:
    max_len = max_len or model.config.max_position_embeddings
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        ids = ids[:, :max_len]
        if ids.shape[1] < 2:
            continue
        logits = model(ids).logits[0, :-1].float()  # [T-1, V]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


@torch.inference_mode()
def decode_step_ms(model, steps: int = 32, prefix: int = 32, seed: int = 0) -> float:
    """Mean ms of one cached single-token forward, after a ``prefix``-token prefill."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prefix), generator=gen).to(device)
    out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1000


def compare_decode_cost(models: dict[str, torch.nn.Module], repeats: int = 7) -> dict[str, float]:
    """Median decode ms per model, repetitions interleaved so machine noise hits all alike."""
    for m in models.values():
        decode_step_ms(m, steps=4)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            samples[name].append(decode_step_ms(m))
    return {k: statistics.median(v) for k, v in samples.items()}


def zoo_report(
    target: str = "zoo:target",
    draft: str = "zoo:draft",
    n: int = 50,
    data_dir=None,
    repeats: int = 7,
) -> dict:
    """The JSON the issue asks for: per-model params, decode_ms, ppl per domain; cost_ratio."""
    if n <= 0 or repeats <= 0:
        raise ValueError(f"n and repeats must be positive, got n={n}, repeats={repeats}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = {"target": load_model(target, device="cpu"), "draft": load_model(draft, device="cpu")}
    tok = load_tokenizer(target)
    report: dict = {}
    ms = compare_decode_cost(models, repeats)
    for role, model in models.items():
        ppl = {}
        for d in DOMAINS:
            texts = [q.text for q in load_domain(d, "eval", data_dir)[:n]]
            ppl[d] = round(perplexity(model, tok, texts), 3)
        report[role] = {"params": count_params(model), "decode_ms": round(ms[role], 3), "ppl": ppl}
    report["cost_ratio"] = round(ms["target"] / ms["draft"], 3)
    return report
