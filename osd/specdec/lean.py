"""A lean batched forward over a Hugging Face Llama-family model and a :class:`KVCache`.

Why: at the sizes this project serves on a CPU, a Hugging Face forward is mostly per-call
overhead (mask building, cache objects, output records), and it knows nothing of ragged
batches of token trees. This forward calls the model's own modules — embeddings, RMSNorms,
rotary embedding, projections, MLPs, LM head — and does only the attention itself: write
the new K/V at given positions of each sequence's slot, then attend over the slot with a
boolean mask: the CPU attention kernel (:mod:`osd.kernels.cpu_attention`) for steps of
up to three new tokens per sequence on fp32 CPU models (plain decode, short drafts), SDPA
for prefill and elsewhere (``kernel=False`` forces SDPA). The weights stay the HF model's
(a hot-swap loads into it, LoRA merges into it), so there is one copy and no conversion.

Fewer, larger ops (at batch 1 on a CPU a step is mostly per-op overhead): the q/k/v
projections run as **one** matmul and the MLP's gate/up as another, as vLLM's merged
layers do; the model's own parameters become views of the merged weight (still one copy,
so a ``load_state_dict``, an optimiser step or a LoRA merge in place is seen at once), and
a layer whose parameters were replaced (``.to(device)``, a wrapper module) is merged again
or run module by module. Rotary embedding is applied to q and k in one go, RMSNorm is
``F.rms_norm`` (fp32 models; the same formula as HF's).

One call: ``b`` sequences (slots), ``T`` new tokens each (padded)::

    ids        [b, T]      token ids (padding: any valid id)
    positions  [b, T]      rotary positions (prefix length + depth for tree nodes)
    write_at   [b, T]      cache positions the new K/V go to
    mask       [b, T, L]   bool, True = may attend; L ≤ cache length; every row has ≥ 1 True
    -> logits  [b, T, V],  hidden [b, T, H] (after the final norm, as HF's hidden_states[-1])

``logits_at`` ``[b]`` (a position per row) returns ``[b, V]`` logits there only, and
``logits=False`` none (``None``): a prefill or a catch-up needs at most the last row, and
the LM head over the vocabulary is a large share of a small model's forward.

Supported: decoder stacks whose layers have ``self_attn.{q,k,v,o}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp`` and a ``rotary_emb`` on the
base model (Llama, Mistral, Qwen2, SmolLM2 …). Other architectures are refused with the
reason at load time.
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from osd.kernels import cpu_attention
from osd.specdec.kvcache import KVCache
from osd.specdec.packed import linear, linear_module
from osd.specdec.rowcost import RowPadding, row_padding

_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
# RMSNorms computing weight * x / rms(x) (Gemma's (1 + weight) is not one of them)
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


class Merged:
    """Linear layers sharing an input, run as one matmul over their stacked weights; the
    layers' own parameters are made views of the stacked ones (one copy of the weights).

    >>> a, b = nn.Linear(4, 3), nn.Linear(4, 2)
    >>> m = Merged([a, b]); x = torch.randn(5, 4)
    >>> ya, yb = m(x)
    >>> torch.allclose(ya, a(x)) and torch.allclose(yb, b(x))
    True
    >>> with torch.no_grad():
    ...     _ = a.weight.mul_(2)  # in place: the merged weight sees it
    >>> torch.allclose(m(x)[0], a(x)) and m.valid()
    True
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.sizes = [ly.weight.shape[0] for ly in layers]
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([ly.weight.detach() for ly in layers])
            self.bias = (
                torch.cat([ly.bias.detach() for ly in layers])
                if layers[0].bias is not None
                else None
            )
            off = 0
            for ly, n in zip(layers, self.sizes, strict=True):
                ly.weight.data = self.weight[off : off + n]
                if self.bias is not None:
                    ly.bias.data = self.bias[off : off + n]
                off += n
        self._ptrs = [(ly.weight.data_ptr(), ly.bias) for ly in layers]

    @staticmethod
    def possible(layers: list[nn.Module]) -> bool:
        if not all(type(ly) is nn.Linear for ly in layers):
            return False
        w = layers[0].weight
        with_bias = {ly.bias is not None for ly in layers}
        return len(with_bias) == 1 and all(
            ly.weight.device == w.device and ly.weight.dtype == w.dtype for ly in layers
        )

    def valid(self) -> bool:
        """Still the layers' storage (nothing replaced a parameter since)?"""
        return all(
            type(ly) is nn.Linear and ly.weight.data_ptr() == p and ly.bias is b
            for ly, (p, b) in zip(self.layers, self._ptrs, strict=True)
        )

    def stamp(self) -> tuple[int, ...] | None:
        """The layers' version counters (a view made by assigning ``.data`` has its own):
        they move when a layer's weight is changed in place; ``None`` for inference
        tensors, which keep none."""
        ps = [ly.weight for ly in self.layers] + (
            [] if self.bias is None else [ly.bias for ly in self.layers]
        )
        if any(p.is_inference() for p in ps):
            return None
        return tuple(p._version for p in ps)

    def linear(self, x: torch.Tensor, packed: bool = True) -> torch.Tensor:
        stamp = self.stamp() if packed else None
        if stamp is None:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, stamp)

    def __call__(self, x: torch.Tensor, packed: bool = True) -> list[torch.Tensor]:
        return list(self.linear(x, packed).split(self.sizes, dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (HF's rotate-half convention) of ``x`` [b, T, heads, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


_MERGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its merges


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
        # shared by every LeanLM over this model: two engines over one target (a bench's
        # methods, a replica's decoders) would otherwise re-merge — and repack — each
        # other's weights at every switch
        self._merged: dict[tuple[int, str], Merged | None] = _MERGES.setdefault(model, {})
        for i in range(len(layers)):
            self._qkv(i), self._gate_up(i)
        self._plan: RowPadding | None = None
        if self.device.type == "cpu" and self.dtype == torch.float32:
            cpu_attention.available()  # a first build (≈ 35 s) at load, not in a request

    def _merge(self, i: int, what: str, layers: list[nn.Module]) -> Merged | None:
        m = self._merged.get((i, what))
        if m is None or not m.valid():
            m = Merged(layers) if Merged.possible(layers) else None
            self._merged[(i, what)] = m
        return m

    def _qkv(self, i: int) -> Merged | None:
        a = self.layers[i].self_attn
        return self._merge(i, "qkv", [a.q_proj, a.k_proj, a.v_proj])

    def _gate_up(self, i: int) -> Merged | None:
        mlp = self.layers[i].mlp
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        return self._merge(i, "gate_up", [mlp.gate_proj, mlp.up_proj])

    def _mlp(self, i: int, x: torch.Tensor, packed: bool) -> torch.Tensor:
        mlp = self.layers[i].mlp
        gu = self._gate_up(i)
        if gu is None:
            return mlp(x)
        g, u = gu(x, packed)
        return linear_module(mlp.down_proj, mlp.act_fn(g) * u, packed)

    def plan(self) -> RowPadding:
        """This model's measured costs per row count (:func:`~osd.specdec.rowcost.row_padding`,
        once per process per shapes): which linear to run a forward of ``m`` rows through."""
        if self._plan is None:
            self._plan = row_padding(self)
        return self._plan

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def new_cache(self, slots: int = 4, length: int = 64, extra: int = 0) -> KVCache:
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
        *,
        logits_at: torch.Tensor | None = None,  # [b]: logits at this position of each row only
        logits: bool = True,
        kernel: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b, t = ids.shape
        order = _dense_order(slots)
        if order is not None:  # the batch holds a run of slots, out of order: run it in order
            back = torch.empty_like(order)
            back[order] = torch.arange(b)
            at = None if logits_at is None else logits_at[order]
            lg, h = self.forward(
                cache,
                slots[order],
                ids[order],
                positions[order],
                write_at[order],
                mask[order],
                hidden,
                logits_at=at,
                logits=logits,
                kernel=kernel,
            )
            return (None if lg is None else lg[back.to(lg.device)]), (
                None if h is None else h[back.to(h.device)]
            )
        length = mask.shape[-1]
        dev = self.device
        ids, positions, write_at = ids.to(dev), positions.to(dev), write_at.to(dev)
        mask3 = mask.to(dev)
        slots, mask = slots.to(dev), mask3[:, None]  # [b, 1, T, L]
        lo = int(slots[0])
        dense = bool(torch.equal(slots, torch.arange(lo, lo + b, device=dev)))
        rows = slots[:, None]  # [b, 1]
        h = self.base.embed_tokens(ids)  # [b, T, H]
        pick = (
            cpu_attention.choice(self.heads, self.kv_heads, self.head_dim, b)
            if kernel and cpu_attention.applies(h, t)
            else None
        )
        fused = pick is not None and pick.next()
        timed = pick is not None and pick.trying()  # a trial forward: time its attention
        spent = 0.0
        pk = self.plan().use_packed(b * t)  # the cheaper linear at this many rows
        cos, sin = self.base.rotary_emb(h, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [b, T, 1, d]
        gqa = self.kv_heads != self.heads
        nh, nkv, hd = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = norm_op(layer.input_layernorm, h)
            qkv = self._qkv(i)
            if qkv is not None:
                y = qkv.linear(x, pk).view(b, t, nh + 2 * nkv, hd)
                qk = _rotate(y[:, :, : nh + nkv], cos, sin)  # q and k heads at once
                q, k, v = qk[:, :, :nh], qk[:, :, nh:], y[:, :, nh + nkv :]  # [b, T, heads, d]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
                q = _rotate(q.view(b, t, nh, hd), cos, sin)
                k = _rotate(k.view(b, t, nkv, hd), cos, sin)
            v = v.view(b, t, nkv, hd)
            kc, vc = cache.k[i], cache.v[i]  # [S, kvh, Lmax, hd]
            kc[rows, :, write_at] = k  # [b, T, kvh, hd]
            vc[rows, :, write_at] = v
            if dense:
                ks, vs = kc[lo : lo + b, :, :length], vc[lo : lo + b, :, :length]
            else:
                ks, vs = kc[slots, :, :length], vc[slots, :, :length]
            start = time.perf_counter() if timed else 0.0
            if fused:  # [b, T, heads, d] in and out
                o = cpu_attention.attend(q, ks, vs, mask3, hd**-0.5).view(b, t, -1)
            else:
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), ks, vs, attn_mask=mask, enable_gqa=gqa
                )
                o = o.transpose(1, 2).reshape(b, t, -1)
            if timed:
                spent += time.perf_counter() - start
            h = h + linear_module(attn.o_proj, o, pk)
            h = h + self._mlp(i, norm_op(layer.post_attention_layernorm, h), pk)
        if timed:
            pick.record(fused, spent)
        h = norm_op(self.base.norm, h)
        out = h if hidden else None
        if not logits:
            return None, out
        if logits_at is not None:
            h = h[torch.arange(b, device=dev), logits_at.to(dev)]  # [b, H]
        return linear_module(self.model.lm_head, h, pk), out


def norm_op(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; an RMSNorm of the Llama family in fp32 as one fused op (``F.rms_norm``,
    the same formula as HF's)."""
    w = getattr(norm, "weight", None)
    if type(norm).__name__ in _RMS_NORMS and w is not None and x.dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, norm.variance_epsilon)
    return norm(x)


def _dense_order(slots: torch.Tensor) -> torch.Tensor | None:
    """The order that sorts ``slots`` when they are a contiguous run out of order (a batch
    over them can then read cache views instead of gathering copies), else ``None``.

    >>> _dense_order(torch.tensor([2, 0, 1])).tolist(), _dense_order(torch.tensor([0, 1]))
    ([1, 2, 0], None)
    >>> _dense_order(torch.tensor([3, 0]))
    """
    s = slots.cpu()
    if s.numel() < 2 or bool((s[1:] - s[:-1] == 1).all()):
        return None
    order = s.argsort()
    run = s[order]
    return order if bool((run[1:] - run[:-1] == 1).all()) else None


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


PREFILL_TOKENS = 4096  # padded tokens per batched prefill forward: bounds its [b, T, T] mask


def prefill(
    lm: LeanLM,
    cache: KVCache,
    slots: list[int],
    seqs: list[list[int]],
    hidden: bool = False,
) -> list[torch.Tensor | None]:
    """Feed ``seqs[i]`` into cache slot ``slots[i]`` from position 0 — many prompts in few
    forwards (rows sorted by length, grouped so one forward pads at most
    :data:`PREFILL_TOKENS` tokens). The caller reserves the cache length. Returns each row's
    last hidden states ``[len(seqs[i]), H]`` (``None`` without ``hidden`` or for an empty
    row); K/V written past a row's end by the padding are never attended (every later
    mask stops at the row's own length) and are overwritten as it grows.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    >>> lm = LeanLM(LlamaForCausalLM(cfg).eval())
    >>> cache = lm.new_cache(slots=3)
    >>> cache.reserve(8)
    >>> h = prefill(lm, cache, [0, 1, 2], [[5, 6, 7], [], [9]], hidden=True)
    >>> [None if x is None else tuple(x.shape) for x in h]
    [(3, 16), None, (1, 16)]
    """
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted((i for i, s in enumerate(seqs) if len(s)), key=lambda i: len(seqs[i]))
    groups: list[list[int]] = []
    for i in order:  # sorted: the newest row is the longest of its group
        if groups and (len(groups[-1]) + 1) * len(seqs[i]) <= PREFILL_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        b, t = len(group), len(seqs[group[-1]])
        ids = torch.zeros(b, t, dtype=torch.long)
        counts = torch.tensor([len(seqs[i]) for i in group])
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        pos = torch.arange(t).repeat(b, 1)
        mask = causal_mask(torch.zeros(b, dtype=torch.long), counts, t)
        rows = torch.tensor([slots[i] for i in group])
        _, h = lm.forward(
            cache, rows, ids, pos, pos, mask, hidden=hidden, logits=False, kernel=False
        )
        if h is not None:
            for row, i in enumerate(group):
                out[i] = h[row, : len(seqs[i])]
    return out
