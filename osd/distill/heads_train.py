"""``osd heads train``: the offline warm start of draft heads on the frozen target.

Self-distillation (Medusa's recipe when no data fits the target): the target greedily
continues the train-split prompts of the five domains; one forward over each sequence
gives its last hidden states ``h_t`` and distributions ``q_t = softmax(lm_head(h_t))``
(the distribution of token ``t + 1``). Then, with a fixed seed:

- **Medusa**: head ``j`` on ``h_t`` learns ``q_{t+j}`` (soft cross-entropy), heads
  weighted equally; afterwards each head's top-k accuracy on held-out sequences
  (``accuracy[j-1][r]``: how often the target's token is the head's rank-``r`` one) is
  measured — the static tree is built from it.
- **EAGLE-style**: teacher-forced pairs ``(h_j + noise, x_{j+1})`` → ``f̂_{j+1}``; loss =
  smooth-L1 to ``h_{j+1}`` + soft cross-entropy of ``lm_head(f̂_{j+1})`` against
  ``q_{j+1}``.
- **Recurrent** (ReDrafter): from ``h_{t-1}`` and the tokens ``x_t, x_{t+1}, …`` through
  the recurrence, depth ``j`` learns ``q_{t+j-1}`` for ``j = 1 .. L`` (the next ``L``
  tokens), ``soft`` (forward KL to the target's top-k + tail) or ``hard`` (cross-entropy
  with the target's argmax); ``accuracy[j-1]`` is depth j's teacher-forced top-k accuracy.
- ``adversarial`` (KOALA): + ``λ`` · the GAN term of
  :class:`~osd.distill.head_student.AdversarialObjective`, whose discriminator is trained
  after each head step.

The result is ``heads.safetensors`` + ``heads.json`` (a few MB: the target's embedding and
LM head are shared, not copied).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from osd.distill.head_student import AdversarialObjective
from osd.distill.losses import SparseTarget, distill_loss
from osd.drafters.heads import HeadConfig, build_heads, eagle_train_forward, save_heads
from osd.drafters.recurrent import unroll
from osd.specdec.engine import SpeculativeDecoder
from osd.workloads.datasets import load_domain, parse_domains

log = logging.getLogger(__name__)


@dataclass
class HeadTrainConfig:
    kind: str = "medusa"
    layers: int = 1
    adversarial: bool = False
    num_heads: int = 4
    prompts_per_domain: int = 300
    domains: str | None = None  # comma-separated; None: all five (a drift study: a subset)
    max_new_tokens: int = 64
    prompt_tokens: int = 96
    epochs: int = 4
    batch: int = 16
    lr: float = 2e-3
    adv_lambda: float = 0.1
    noise: float = 0.05  # eagle: std of the Gaussian noise on input features
    length: int = 5  # recurrent: L, the depths trained
    target_loss: str = "soft"  # recurrent: soft (top-k KL) | hard (argmax CE)
    topk: int = 16  # recurrent, soft: the target's support kept
    held_out: float = 0.1
    seed: int = 0


@dataclass
class Sequence_:
    ids: torch.Tensor  # [L]
    feats: torch.Tensor  # [L, H] target last hidden states
    prompt_len: int


@torch.inference_mode()
def self_distill(target, tok, cfg: HeadTrainConfig, data_dir=None, progress=None) -> list:
    """The target's greedy continuations of train prompts, with its hidden states."""
    prompts = []
    for d in parse_domains(cfg.domains):
        for q in load_domain(d, "train", data_dir)[: cfg.prompts_per_domain]:
            prompts.append(tok(q.prompt, add_special_tokens=False).input_ids[-cfg.prompt_tokens :])
    dec = SpeculativeDecoder(target, None, tok)
    seqs = []
    for lo in range(0, len(prompts), cfg.batch):
        states, _ = dec.decode_batch(prompts[lo : lo + cfg.batch], cfg.max_new_tokens)
        for s in states:
            ids = torch.tensor(s.tokens)
            feats = target.model(input_ids=ids[None]).last_hidden_state[0]
            seqs.append(Sequence_(ids, feats.float().clone(), s.prompt_len))
        if progress:
            progress(min(lo + cfg.batch, len(prompts)), len(prompts))
    return seqs


def _pad(seqs: list[Sequence_]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(s.ids) for s in seqs)
    h = seqs[0].feats.shape[-1]
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    feats = torch.zeros(len(seqs), n, h)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        L = len(s.ids)
        ids[i, :L], feats[i, :L] = s.ids, s.feats
        valid[i, max(0, s.prompt_len - 16) : L] = True  # the generated part and a bit before
    return ids, feats, valid


def _soft_ce(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return -(torch.softmax(target_logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


def _sparse(target_logits: torch.Tensor, k: int) -> SparseTarget:
    logp = torch.log_softmax(target_logits, -1)
    top = logp.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return SparseTarget(top.indices, top.values, tail)


def _medusa_pairs(heads, lm_head, feats, valid):
    """Per head j: (head logits [m, V], target logits [m, V]) at valid positions."""
    out = heads(feats)  # [B, L, K, H]
    pairs = []
    for j in range(1, out.shape[2] + 1):
        ok = valid[:, :-j] & valid[:, j:]
        pairs.append((lm_head(out[:, :-j, j - 1][ok]), lm_head(feats[:, j:][ok])))
    return pairs


def _recurrent_pairs(module, target, ids, feats, valid, length: int):
    """Per depth j: (head logits [m, V], target logits [m, V]) for roots t = 1 .. N - L:
    context h_{t-1}, inputs x_t .. x_{t+L-1}, depth j against q_{t+j-1}."""
    n = ids.shape[1] - length
    inputs = ids[:, 1:].unfold(1, length, 1)  # [B, n, L]
    pred = unroll(module, target.get_input_embeddings(), feats[:, :n], inputs)  # [B, n, L, H]
    lm_head = target.get_output_embeddings()
    pairs = []
    for j in range(1, length + 1):
        ok = valid[:, :n] & valid[:, j : n + j]
        pairs.append((lm_head(pred[:, :, j - 1][ok]), lm_head(feats[:, j : n + j][ok])))
    return pairs


def _eagle_pairs(head, target, ids, feats, valid, noise: float):
    fin = feats[:, :-1] + noise * torch.randn_like(feats[:, :-1]) if noise else feats[:, :-1]
    pred = eagle_train_forward(head, target, fin, ids[:, 1:])  # [B, L-1, H] = f̂_{1..}
    ok = valid[:, 1:] & valid[:, :-1]
    return pred[ok], feats[:, 1:][ok]


def train_heads(
    target,
    tok,
    cfg: HeadTrainConfig,
    out: str | Path | None = None,
    data_dir=None,
    progress: Callable[[str, int, int], None] | None = None,
    seqs: list | None = None,
) -> tuple[torch.nn.Module, HeadConfig, dict]:
    """Generate (unless ``seqs`` are given), train, measure; save to ``out`` if given."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    for p in target.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    if seqs is None:
        seqs = self_distill(
            target, tok, cfg, data_dir, progress and (lambda i, n: progress("generate", i, n))
        )
    seqs = list(seqs)
    rng.shuffle(seqs)
    n_val = max(1, int(len(seqs) * cfg.held_out))
    val, train = seqs[:n_val], seqs[n_val:]
    hc = HeadConfig(
        cfg.kind,
        target.config.hidden_size,
        target.config.vocab_size,
        cfg.layers,
        cfg.num_heads,
        cfg.adversarial,
    )
    module = build_heads(hc, target).float().train()
    lm_head = target.get_output_embeddings()
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps = cfg.epochs * ((len(train) + cfg.batch - 1) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(1, steps))
    adv = AdversarialObjective(lam=cfg.adv_lambda, seed=cfg.seed) if cfg.adversarial else None
    losses, step = [], 0
    first = _val_loss(module, target, lm_head, val, cfg)
    for _epoch in range(cfg.epochs):
        rng.shuffle(train)
        for lo in range(0, len(train), cfg.batch):
            ids, feats, valid = _pad(train[lo : lo + cfg.batch])
            loss, fakes = _loss(module, target, lm_head, ids, feats, valid, cfg, adv)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            if adv is not None:
                for lg, tg in fakes:
                    adv.disc_step(lg, tg)
            losses.append(float(loss.detach()))
            step += 1
            if progress:
                progress("train", step, steps)
    module.eval()
    last = _val_loss(module, target, lm_head, val, cfg)
    hc.accuracy = measure_accuracy(module, target, lm_head, val, cfg)
    hc.meta = {
        "train": asdict(cfg),
        "sequences": len(seqs),
        "val_loss_before": first,
        "val_loss_after": last,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if out is not None:
        save_heads(module, hc, out)
    return module, hc, {"losses": losses, "val_loss_before": first, "val_loss_after": last}


def _loss(module, target, lm_head, ids, feats, valid, cfg, adv):
    """The head's training loss on one batch, and the (head, target) pairs the
    discriminator then trains on."""
    fakes = []
    if cfg.kind == "medusa":
        pairs = _medusa_pairs(module, lm_head, feats, valid)
        terms = []
        for lg, tl in pairs:
            term = _soft_ce(lg, tl)
            if adv is not None:
                sp = _sparse(tl, adv.k)
                term = term + adv.lam * adv.head_loss(lg, sp)
                fakes.append((lg.detach(), sp))
            terms.append(term.mean())
        return torch.stack(terms).mean(), fakes
    if cfg.kind == "recurrent":
        terms = []
        for lg, tl in _recurrent_pairs(module, target, ids, feats, valid, cfg.length):
            if cfg.target_loss == "hard":
                terms.append(F.cross_entropy(lg, tl.argmax(-1)))
            else:
                terms.append(distill_loss("fkl", lg, _sparse(tl, cfg.topk)))
        return torch.stack(terms).mean(), fakes
    pred, true = _eagle_pairs(
        module, target, ids, feats, valid, cfg.noise if module.training else 0
    )
    lg, tl = lm_head(pred), lm_head(true)
    loss = F.smooth_l1_loss(pred, true) + _soft_ce(lg, tl).mean()
    if adv is not None:
        sp = _sparse(tl, adv.k)
        loss = loss + adv.lam * adv.head_loss(lg, sp).mean()
        fakes.append((lg.detach(), sp))
    return loss, fakes


@torch.no_grad()
def _val_loss(module, target, lm_head, val, cfg) -> float:
    was = module.training
    module.eval()
    ids, feats, valid = _pad(val)
    loss, _ = _loss(module, target, lm_head, ids, feats, valid, cfg, None)
    module.train(was)
    return float(loss)


@torch.no_grad()
def measure_accuracy(module, target, lm_head, val, cfg, topk: int = 10) -> list[list[float]]:
    """Medusa: ``acc[j-1][r]`` = P(target's token is head j's rank-r candidate); recurrent:
    the same per depth j, teacher-forced. EAGLE: one
    row, teacher-forced (true features), of the depth-1 prediction."""
    ids, feats, valid = _pad(val)
    if cfg.kind == "medusa":
        pairs = _medusa_pairs(module, lm_head, feats, valid)
    elif cfg.kind == "recurrent":
        pairs = _recurrent_pairs(module, target, ids, feats, valid, cfg.length)
    else:
        pred, true = _eagle_pairs(module, target, ids, feats, valid, 0.0)
        pairs = [(lm_head(pred), lm_head(true))]
    acc = []
    for lg, tl in pairs:
        want = tl.argmax(-1)
        top = lg.topk(topk, -1).indices
        hit = top == want[:, None]  # [m, topk]
        acc.append([round(float(h), 4) for h in hit.float().mean(0)])
    return acc
