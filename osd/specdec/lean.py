"""A lean batched forward over a Hugging Face Llama-family model and a :class:`KVCache`.

Why: at the sizes this project serves on a CPU, a Hugging Face forward is mostly per-call
overhead (mask building, cache objects, output records), and it knows nothing of ragged
batches of token trees. This forward calls the model's own modules — embeddings, RMSNorms,
rotary embedding, projections, MLPs, LM head — and does only the attention itself: write
the new K/V at given positions of each sequence's slot, then SDPA over the slot with a
boolean mask. The weights stay the HF model's (a hot-swap loads into it, LoRA merges into
it), so there is one copy and no conversion.

One call: ``b`` sequences (slots), ``T`` new tokens each (padded)::

    ids        [b, T]      token ids (padding: any valid id)
    positions  [b, T]      rotary positions (prefix length + depth for tree nodes)
    write_at   [b, T]      cache positions the new K/V go to
    mask       [b, T, L]   bool, True = may attend; L ≤ cache length; every row has ≥ 1 True
    -> logits  [b, T, V],  hidden [b, T, H] (after the final norm, as HF's hidden_states[-1])

Supported: decoder stacks whose layers have ``self_attn.{q,k,v,o}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp`` and a ``rotary_emb`` on the
base model (Llama, Mistral, Qwen2, SmolLM2 …). Other architectures are refused with the
reason at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from osd.specdec.kvcache import KVCache

_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LeanLM:
    """Batched cached forward of ``model`` (see the module docstring)."""

    def __init__(self, model) -> None:
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        why = None
        if layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
            why = "no model.layers / rotary_emb / norm"
        elif not all(hasattr(ly, p) for ly in layers for p in _LAYER_PARTS):
            why = "decoder layers lack self_attn / norms / mlp"
        elif not all(hasattr(ly.self_attn, p) for ly in layers for p in _ATTN_PARTS):
            why = "attention lacks q/k/v/o projections"
        elif getattr(model.config, "sliding_window", None) and getattr(
            model.config, "use_sliding_window", True
        ):
            why = "sliding-window attention"
        if why:
            raise ValueError(
                f"the batched engine runs Llama-family decoders (Llama, Mistral, Qwen2, "
                f"SmolLM2); {type(model).__name__} has {why}"
            )
        cfg = model.config
        self.model = model.eval()
        self.base, self.layers = base, layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.context = int(getattr(cfg, "max_position_embeddings", 1 << 20))
        self.vocab = cfg.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def new_cache(self, slots: int = 4, length: int = 256, extra: int = 0) -> KVCache:
        """A cache for this model; ``extra`` positions beyond the context for tree nodes."""
        return KVCache(
            len(self.layers),
            self.kv_heads,
            self.head_dim,
            max_length=self.context + extra,
            dtype=self.dtype,
            device=self.device,
            slots=slots,
            length=length,
        )

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        slots: torch.Tensor,  # [b] long
        ids: torch.Tensor,  # [b, T]
        positions: torch.Tensor,  # [b, T]
        write_at: torch.Tensor,  # [b, T]
        mask: torch.Tensor,  # [b, T, L] bool
        hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = ids.shape
        length = mask.shape[-1]
        dev = self.device
        ids, positions, write_at = ids.to(dev), positions.to(dev), write_at.to(dev)
        slots, mask = slots.to(dev), mask.to(dev)[:, None]  # [b, 1, T, L]
        lo = int(slots[0])
        dense = bool(torch.equal(slots, torch.arange(lo, lo + b, device=dev)))
        rows = slots[:, None]  # [b, 1]
        h = self.base.embed_tokens(ids)  # [b, T, H]
        cos, sin = self.base.rotary_emb(h, positions)
        gqa = self.kv_heads != self.heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = cache.k[i], cache.v[i]  # [S, kvh, Lmax, hd]
            kc[rows, :, write_at] = k.transpose(1, 2)  # [b, T, kvh, hd]
            vc[rows, :, write_at] = v.transpose(1, 2)
            if dense:
                ks, vs = kc[lo : lo + b, :, :length], vc[lo : lo + b, :, :length]
            else:
                ks, vs = kc[slots, :, :length], vc[slots, :, :length]
            o = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=gqa)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.base.norm(h)
        return self.model.lm_head(h), (h if hidden else None)


def causal_mask(starts: torch.Tensor, counts: torch.Tensor, length: int) -> torch.Tensor:
    """[b, T, length] bool for feeding ``counts[i]`` new tokens after ``starts[i]`` cached
    ones, causally (padding rows see position 0 only, so no row is empty).

    >>> causal_mask(torch.tensor([2, 0]), torch.tensor([2, 1]), 4).int().tolist()
    [[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [1, 0, 0, 0]]]
    """
    t = int(counts.max())
    col = torch.arange(length)[None, None, :]  # [1, 1, L]
    row = torch.arange(t)[None, :, None]  # [1, T, 1]
    allowed = col <= starts[:, None, None] + row  # [b, T, L]
    allowed &= (row < counts[:, None, None]) | (col == 0)
    return allowed
