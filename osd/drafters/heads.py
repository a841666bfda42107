"""Draft heads on the target's last hidden state: Medusa's and an EAGLE-style one (+ KOALA).

Both heads are small modules that live **beside** a frozen target and reuse its token
embedding, rotary embedding and LM head (never copied: a head's ``state_dict`` holds only
its own weights, which is what the zoo ships and the registry versions).

- :class:`MedusaHeads`: ``K`` heads; head ``i`` (1-based) maps the target's last hidden
  state ``h_t`` of token ``t`` to a feature whose LM-head logits predict token ``t + 1 + i``
  (the target's own LM head on ``h_t`` predicts ``t + 1``). Each head is ``layers``
  ResBlocks ``x + SiLU(W x + b)`` with ``W = 0`` at init (so a fresh head starts as the
  target's own next-token head), i.e. KOALA's K-layer head when ``layers > 1``.
- :class:`EagleHead`: an autoregressive feature predictor: ``f̂_{j+1} = layers(fc([e(x_{j+1}),
  f_j]))`` with ``layers`` Llama decoder layers (KOALA: ``layers > 1``), the target's
  embedding ``e`` and rotary embedding; ``lm_head(f̂_{j+1})`` predicts token ``j + 2``.
  :func:`eagle_layers` runs it over ``[b, T]`` pairs with a boolean mask and an optional
  :class:`~osd.specdec.kvcache.KVCache` (the same attention as :mod:`osd.specdec.lean`).

Files: ``save_heads`` / ``load_heads`` write ``heads.safetensors`` + ``heads.json`` (kind,
sizes, measured accuracies); weights are never pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

from osd.models import zoo_dir
from osd.specdec.kvcache import KVCache
from osd.specdec.lean import norm_op
from osd.specdec.packed import linear_module

HEAD_KINDS = ("medusa", "eagle", "recurrent")


@dataclass
class HeadConfig:
    """What a head file says about itself (``heads.json``)."""

    kind: str  # medusa | eagle | recurrent
    hidden_size: int
    vocab_size: int
    layers: int = 1  # KOALA's K (1 = the original single-layer head)
    num_heads: int = 4  # medusa only
    adversarial: bool = False
    # medusa: accuracy[i][r] = P(rank-r candidate of head i+1 is the target's token)
    accuracy: list[list[float]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind {self.kind!r}; choose from {', '.join(HEAD_KINDS)}")
        if self.layers < 1 or self.num_heads < 1:
            raise ValueError(
                f"layers and num_heads must be >= 1, got {self.layers}, {self.num_heads}"
            )


class ResBlock(nn.Module):
    """Medusa's residual block: ``x + SiLU(W x + b)``, ``W`` zero-initialised."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        # linear_module: the linear measured cheaper here, when drafting on a CPU
        return x + F.silu(linear_module(self.linear, x))


class MedusaHeads(nn.Module):
    """``num_heads`` stacks of ``layers`` ResBlocks; ``forward(h [..., H]) -> [..., K, H]``."""

    def __init__(self, hidden: int, num_heads: int = 4, layers: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(layers)]) for _ in range(num_heads)
        )

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, h: Tensor) -> Tensor:
        return torch.stack([head(h) for head in self.heads], dim=-2)


class EagleHead(nn.Module):
    """``fc`` over ``[embedding, feature]`` then ``layers`` Llama decoder layers."""

    def __init__(self, target_config, layers: int = 1) -> None:
        super().__init__()
        h = target_config.hidden_size
        self.fc = nn.Linear(2 * h, h)
        self.layers = nn.ModuleList(LlamaDecoderLayer(target_config, i) for i in range(layers))
        self.heads = target_config.num_attention_heads
        self.kv_heads = getattr(target_config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(target_config, "head_dim", None) or h // self.heads

    def new_cache(self, context: int, dtype=torch.float32, device="cpu") -> KVCache:
        return KVCache(
            len(self.layers),
            self.kv_heads,
            self.head_dim,
            max_length=context,
            dtype=dtype,
            device=device,
        )


def eagle_layers(
    head: EagleHead,
    x: Tensor,  # [b, T, H] fc output
    cos_sin: tuple[Tensor, Tensor],
    mask: Tensor,  # [b, T, L] bool, True = may attend
    cache: KVCache | None = None,
    slots: Tensor | None = None,  # [b]
    write_at: Tensor | None = None,  # [b, T]
) -> Tensor:
    """The decoder layers over ``x``: without a cache, self-attention within ``x``
    (``L = T``, training); with one, the new K/V are written at ``write_at`` of each slot
    and attention reads the slot's first ``L`` positions (drafting). Outside autograd on
    a CPU the linears run on oneDNN's packed weights or MKL's, whichever this process
    measured cheaper (:func:`osd.specdec.packed.preferred`), and the norms as one fused op."""
    b, t, _ = x.shape
    cos, sin = cos_sin
    mask = mask[:, None]
    gqa = head.kv_heads != head.heads
    for i, layer in enumerate(head.layers):
        attn = layer.self_attn
        y = norm_op(layer.input_layernorm, x)
        q = linear_module(attn.q_proj, y).view(b, t, head.heads, head.head_dim).transpose(1, 2)
        k = linear_module(attn.k_proj, y).view(b, t, head.kv_heads, head.head_dim)
        v = linear_module(attn.v_proj, y).view(b, t, head.kv_heads, head.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            rows = slots[:, None]
            kc, vc = cache.k[i], cache.v[i]
            kc[rows, :, write_at] = k.transpose(1, 2)
            vc[rows, :, write_at] = v.transpose(1, 2)
            length = mask.shape[-1]
            k, v = kc[slots, :, :length], vc[slots, :, :length]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        x = x + linear_module(attn.o_proj, o.transpose(1, 2).reshape(b, t, -1))
        x = x + _mlp(layer.mlp, norm_op(layer.post_attention_layernorm, x))
    return x


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """Llama's gated MLP through :func:`~osd.specdec.packed.linear_module` (the measured
    cheaper linear when drafting on a CPU; the modules themselves when training)."""
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None or not hasattr(mlp, "act_fn"):
        return mlp(x)
    return linear_module(down, mlp.act_fn(linear_module(gate, x)) * linear_module(up, x))


def eagle_train_forward(head: EagleHead, target, feats: Tensor, next_ids: Tensor) -> Tensor:
    """Teacher-forced features ``[b, T, H]`` from true features ``f_j`` and tokens
    ``x_{j+1}`` (``[b, T]``), causal, positions ``0 .. T-1``: ``out[:, j] = f̂_{j+1}``."""
    base = target.model
    b, t, _ = feats.shape
    x = head.fc(torch.cat([base.embed_tokens(next_ids), feats], dim=-1))
    pos = torch.arange(t, device=x.device)[None].expand(b, t)
    mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None].expand(b, t, t)
    return eagle_layers(head, x, base.rotary_emb(x, pos), mask)


def build_heads(config: HeadConfig, target) -> nn.Module:
    if config.kind == "medusa":
        return MedusaHeads(config.hidden_size, config.num_heads, config.layers)
    if config.kind == "recurrent":  # ReDrafter's head: osd.drafters.recurrent
        from osd.drafters.recurrent import RecurrentHead

        return RecurrentHead(config.hidden_size, config.layers)
    return EagleHead(target.config, config.layers)


# ---- files -----------------------------------------------------------------------------------


def heads_dir(name: str) -> Path:
    """Where the zoo ships the heads registered as drafter ``name``."""
    return zoo_dir() / "heads" / name


def save_heads(module: nn.Module, config: HeadConfig, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # fp16 on disk like the zoo's models (loaded in the target's dtype)
    state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()
    }
    save_file(state, str(out / "heads.safetensors"))
    (out / "heads.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    return out


def load_heads(path: str | Path, target) -> tuple[nn.Module, HeadConfig]:
    """Heads saved by :func:`save_heads` for ``target`` (sizes checked), in eval mode."""
    path = Path(path)
    if not (path / "heads.json").is_file():
        raise ValueError(f"no heads at {path} (heads.json missing); run `osd heads train`")
    config = HeadConfig(**json.loads((path / "heads.json").read_text()))
    if (config.hidden_size, config.vocab_size) != (
        target.config.hidden_size,
        target.config.vocab_size,
    ):
        raise ValueError(
            f"heads at {path} are for hidden {config.hidden_size} / vocab {config.vocab_size}; "
            f"the target has {target.config.hidden_size} / {target.config.vocab_size}"
        )
    module = build_heads(config, target)
    module.load_state_dict(load_file(str(path / "heads.safetensors")), strict=True)
    p = next(target.parameters())
    return module.to(device=p.device, dtype=p.dtype).eval(), config
