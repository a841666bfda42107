"""Triton kernels vs their PyTorch references at serving shapes, on a GPU.

    python experiments/kernel_timings.py --json kernels.json --plot kernels.png

Per piece (``osd.kernels``), each shape timed with ``triton.testing.do_bench`` (median of
repeated runs, CUDA events), kernel and reference in the same process, same inputs:

- ``accept_greedy``: B trees of n nodes (B = 1…64, n up to 64);
- ``accept_sampling``: the same trees, point-mass candidates, V = 4,096 and 49,152;
- ``topk_tail``: B · 8 logged rows, k = 16;
- ``loss_fkl`` / ``loss_jsd``: forward + backward over B · 64 positions, k = 16.

Writes ``{"device": ..., "rows": [{"piece", "B", "n", "V", "kernel_ms", "reference_ms",
"speedup"}, ...]}`` and a PNG of the speedups. Without CUDA it says so and measures
nothing (timings of Triton's CPU interpreter mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _trees(batch: int, n: int, vocab: int, g: torch.Generator):
    from osd.specdec.tree import TokenTree, pad_trees

    parents = [-1] + [(j - 1) // 2 for j in range(1, n)]  # a binary tree, level by level
    trees = []
    for _ in range(batch):
        toks = torch.randperm(vocab, generator=g)[:n].tolist()  # distinct tokens
        trees.append(TokenTree.from_parents(toks, parents))
    return pad_trees(trees)


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50))


def run(batches: list[int], nodes: list[int], vocabs: list[int]) -> list[dict]:
    import osd.kernels as K

    from osd.distill.losses import SparseTarget
    from osd.specdec.accept_batch import TreeBatch

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    rows = []

    def both(piece: str, fn, **shape) -> None:
        with K.using("triton"):
            fn()  # compile
            kernel = _bench(fn)
        with K.using("torch"):
            reference = _bench(fn)
        row = {"piece": piece, **shape, "kernel_ms": kernel, "reference_ms": reference}
        row["speedup"] = reference / kernel
        rows.append(row)
        print(
            f"{piece:16s} {json.dumps(shape):40s} kernel {kernel:8.3f} ms  "
            f"reference {reference:8.3f} ms  {row['speedup']:6.2f}x",
            flush=True,
        )

    for vocab in vocabs:
        for b in batches:
            for n in nodes:
                tokens, parents = _trees(b, n, vocab, g)
                tokens, parents = tokens.to(dev), parents.to(dev)
                tb = TreeBatch.of(parents, b, dev)
                argmax = torch.randint(0, vocab, (b, n + 1), device=dev)
                if vocab == vocabs[0]:  # greedy does not read V
                    both(
                        "accept_greedy",
                        lambda t=tokens, p=parents, a=argmax, tb=tb: K.accept_greedy_batch(
                            t, p, a, tb
                        ),
                        B=b,
                        n=n,
                        V=None,
                    )
                q = torch.softmax(torch.randn(b, n + 1, vocab, device=dev), -1)
                u = torch.rand(b, n + 1, device=dev)
                both(
                    "accept_sampling",
                    lambda t=tokens, p=parents, q=q, u=u, tb=tb: K.accept_sampling_batch(
                        t, p, q, None, uniforms=u, dtype=torch.float32, trees=tb
                    ),
                    B=b,
                    n=n,
                    V=vocab,
                )
                del q
            logits = torch.randn(b * 8, vocab, device=dev)
            both("topk_tail", lambda x=logits: K.topk_tail(x, 16), B=b, n=None, V=vocab)
            m = b * 64
            with torch.no_grad():
                ids, lp, tail = K.topk_tail(torch.randn(m, vocab, device=dev), 16)
            target = SparseTarget(ids, lp.float(), tail.float())
            draft = torch.randn(m, vocab, device=dev, requires_grad=True)
            for name in ("fkl", "jsd"):
                both(
                    f"loss_{name}",
                    lambda name=name, d=draft, t=target: K.sparse_distill_loss(
                        name, d, t
                    ).backward(),
                    B=b,
                    n=None,
                    V=vocab,
                )
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces = sorted({r["piece"] for r in rows})
    fig, axes = plt.subplots(1, len(pieces), figsize=(4 * len(pieces), 3.5), squeeze=False)
    for ax, piece in zip(axes[0], pieces, strict=True):
        sel = [r for r in rows if r["piece"] == piece]
        labels = [f"B{r['B']} n{r['n'] or '-'} V{(r['V'] or 0) // 1024}k" for r in sel]
        ax.bar(range(len(sel)), [r["speedup"] for r in sel])
        ax.axhline(2.0, color="red", lw=1, ls="--", label="goal 2x")
        ax.set_xticks(range(len(sel)), labels, rotation=90, fontsize=6)
        ax.set_title(piece)
        ax.set_ylabel("reference ms / kernel ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG of the speedups here")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--nodes", default="8,32,64", help="tree sizes")
    ap.add_argument("--vocabs", default="4096,49152")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    if not torch.cuda.is_available():
        print("no CUDA device here: the kernels are timed on a GPU only; nothing measured")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": None, "rows": []}, indent=1))
        return 0
    rows = run(ints(args.batches), ints(args.nodes), ints(args.vocabs))
    report = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
