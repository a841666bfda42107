"""The Triton kernels against their PyTorch references (``osd.kernels``).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here
before the kernel modules are imported): the same kernel code, on CPU tensors, slowly —
so shapes are small and seeds many. Vocabularies are chosen not to be multiples of the
block size (1030 over blocks of 1024, 37 over 64), so a masked load is the only thing
between an index and ``V``. The ``gpu`` tests repeat the checks on CUDA at serving shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from osd.distill.losses import LOSS_NAMES, SparseTarget, distill_loss
from osd.distill.record import topk_tail as ref_topk_tail
from osd.specdec import accept_batch as ref
from osd.specdec.tree import TokenTree, pad_trees

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FIELDS = ("path", "accepted_tokens", "num_accepted", "next_token", "is_bonus")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter's where()


@pytest.fixture(scope="module")
def kern():
    """The kernel modules (in Triton's interpreter without a GPU: tests/conftest.py)."""
    pytest.importorskip("triton")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from osd.kernels import accept, losses, topk
    return accept, topk, losses


def random_parents(n: int, g: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(-1, j, (1,), generator=g)) for j in range(1, n)] if n else []


def random_batch(sizes: list[int], vocab: int, g: torch.Generator, distinct: bool = True):
    """Ragged trees (padding parents -2) with random tokens, distinct among siblings."""
    trees = []
    for n in sizes:
        parents = random_parents(n, g)
        toks: list[int] = []
        for j in range(n):
            sibs = {toks[i] for i in range(j) if parents[i] == parents[j]}
            while True:
                t = int(torch.randint(0, vocab, (1,), generator=g))
                if not distinct or t not in sibs:
                    break
            toks.append(t)
        trees.append(TokenTree.from_parents(toks, parents))
    return pad_trees(trees)


def assert_same(a, b) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert torch.equal(x.cpu(), y.cpu()), (f, x, y)


@pytest.mark.parametrize("vocab", [37, 1030])
@pytest.mark.parametrize("mode", ["point", "iid", "without"])
def test_sampling_walk_equals_reference(kern, vocab: int, mode: str) -> None:
    accept = kern[0]
    g = torch.Generator().manual_seed(vocab)
    for _ in range(8):
        sizes = [int(torch.randint(0, 9, (1,), generator=g)) for _ in range(4)]
        tokens, parents = random_batch(sizes, vocab, g, distinct=mode != "iid")
        b, n = tokens.shape
        q = torch.softmax(3 * torch.randn(b, n + 1, vocab, generator=g, dtype=torch.float64), -1)
        q[q < 1e-3] = 0  # zeros in the target: residuals hit the support's edge
        p = torch.softmax(3 * torch.randn(b, n, vocab, generator=g, dtype=torch.float64), -1)
        p = None if mode == "point" else p
        u = torch.rand(b, n + 1, generator=g, dtype=torch.float64)
        args = (tokens, parents, q, p, mode == "without")
        want = ref.accept_sampling_batch(*args, uniforms=u, check_siblings=False)
        got = accept.accept_sampling_batch(*args, uniforms=u)
        assert_same(want, got)


def test_sampling_walk_repeated_siblings_and_float32(kern) -> None:
    """A drafter out of support repeats a sibling token (a point mass); float32 as served."""
    accept = kern[0]
    tokens = torch.tensor([[3, 3, 1, 2], [0, 1, 2, 2]])
    parents = torch.tensor([-1, -1, 0, 0])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = torch.softmax(2 * torch.randn(2, 5, 7, generator=g), -1)
        p = torch.softmax(2 * torch.randn(2, 4, 7, generator=g), -1)
        u = torch.rand(2, 5, generator=g)
        kw = {"uniforms": u, "dtype": torch.float32}
        want = ref.accept_sampling_batch(tokens, parents, q, p, True, check_siblings=False, **kw)
        assert_same(want, accept.accept_sampling_batch(tokens, parents, q, p, True, **kw))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 2, 2), (2, 3), ()])
def test_greedy_walk_equals_reference_on_engine_shapes(kern, shape) -> None:
    """k-config trees as the draft model builds them, tokens following the argmax along a
    random path (so walks of every length occur), batched with a ragged chain."""
    accept = kern[0]
    g = torch.Generator().manual_seed(len(shape))
    parents, frontier = [], [-1]
    for c in shape:
        level = []
        for node in frontier:
            for _ in range(c):
                parents.append(node)
                level.append(len(parents) - 1)
        frontier = level
    n, vocab = len(parents), 50
    for _ in range(10):
        argmax = torch.randint(0, vocab, (3, max(n, 1) + 1), generator=g)
        tokens = torch.randint(0, vocab, (3, n), generator=g)
        for b in range(3):  # siblings distinct; one child per node follows the argmax
            for j in range(n):
                sibs = [i for i in range(n) if parents[i] == parents[j]]
                if j == sibs[0] and torch.rand(1, generator=g) < 0.8:
                    tokens[b, j] = argmax[b, parents[j] + 1]
                else:
                    tokens[b, j] = (argmax[b, parents[j] + 1] + 1 + sibs.index(j)) % vocab
        trees = [TokenTree.from_parents(t.tolist(), parents) for t in tokens]
        trees.append(TokenTree.from_parents([int(argmax[0, 0])], [-1]))  # ragged: a chain of 1
        tok, par = pad_trees(trees)
        am = torch.cat([argmax, argmax[:1]])[:, : tok.shape[1] + 1]
        want = ref.accept_greedy_batch(tok, par, am)
        assert_same(want, accept.accept_greedy_batch(tok, par, am))


@pytest.mark.parametrize(("vocab", "k"), [(37, 4), (1030, 16), (12, 12), (5, 16)])
def test_topk_tail_equals_reference(kern, vocab: int, k: int) -> None:
    topk = kern[1]
    g = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(6, vocab, generator=g)
    logits[0, : vocab // 2] = -float("inf")  # masked-out tokens (top-k / top-p warps)
    ids, lp, tail = ref_topk_tail(logits, k)
    kids, klp, ktail = topk.topk_tail(logits, k)
    assert torch.equal(ids[1:], kids[1:].cpu())
    # row 0 has ties at -inf, which either order may list: the same set
    assert sorted(ids[0].tolist()) == sorted(kids[0].tolist())
    assert klp.dtype == torch.float16 and ktail.dtype == torch.float16
    assert (lp.float() - klp.cpu().float()).abs().max() <= 2e-3
    assert (tail.float() - ktail.cpu().float()).abs().max() <= 2e-3


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(
    ("vocab", "k", "temperature"), [(37, 4, 1.0), (1030, 16, 0.7), (6, 6, 1.3)]
)
def test_fused_loss_and_gradient_equal_reference(kern, name, vocab, k, temperature) -> None:
    losses = kern[2]
    g = torch.Generator().manual_seed(vocab + k)
    ids, lp, tail = ref_topk_tail(2 * torch.randn(5, vocab, generator=g), k)
    target = SparseTarget(ids, lp.float(), tail.float())
    x = 2 * torch.randn(5, vocab, generator=g)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    kw = {"temperature": temperature, "reduction": "sum"}
    want = distill_loss(name, a, target, **kw)
    got = losses.sparse_distill_loss(name, b, target, **kw)
    (want * 1.7).backward()
    (got * 1.7).backward()
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5), (want, got)
    assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), (a.grad - b.grad).abs().max()


def test_dispatcher_backends(monkeypatch) -> None:
    import osd.kernels as K

    assert K.backend() in K.BACKENDS
    with K.using("torch"):
        assert not K.use_triton("cuda")
    monkeypatch.setenv("OSD_KERNELS", "torch")
    assert K.backend() == "torch"
    monkeypatch.setenv("OSD_KERNELS", "bogus")
    with pytest.raises(ValueError, match="OSD_KERNELS"):
        K.backend()
    with pytest.raises(ValueError, match="backend"):
        K.set_backend("bogus")
    monkeypatch.setenv("OSD_KERNELS", "auto")
    assert K.use_triton("cpu") is False  # the reference runs on the CPU by default


def test_dispatcher_runs_the_kernel_when_forced(kern) -> None:
    """Through the dispatcher (as the engine, collector and trainer call it): the same
    result either way; and chi-square exactness of the kernel's sampling walk, with a
    negative control that the test can tell a wrong walk."""
    import osd.kernels as K
    from test_accept import MarkovLM, SamplingParams, chi_square_pvalue, draft_trees, random_lm

    lm: MarkovLM = random_lm(2, SamplingParams(temperature=1.0))
    g = torch.Generator().manual_seed(0)
    draws = 800  # the interpreter runs one program per draw
    trees = draft_trees(lm, (2,), "without", draws, g)
    u = torch.rand(draws, trees.tokens.shape[1] + 1, generator=g, dtype=torch.float64)
    args = (trees.tokens, trees.parents, trees.q, trees.p, True)
    with K.using("triton"):
        got = K.accept_sampling_batch(*args, uniforms=u)
    with K.using("torch"):
        want = K.accept_sampling_batch(*args, uniforms=u)
    assert_same(want, got)
    first = torch.where(got.num_accepted >= 1, got.accepted_tokens[:, 0], got.next_token)
    assert chi_square_pvalue(first, lm.q1) > 1e-3
    wrong = torch.where(got.num_accepted >= 0, trees.tokens[:, 0], got.next_token)  # always node 0
    assert chi_square_pvalue(wrong, lm.q1) < 1e-3


def test_engine_greedy_unchanged_with_kernels(kern) -> None:
    """The engine's acceptance through the forced kernel: output = HF greedy."""
    import osd.kernels as K

    from osd.drafters import build_drafter
    from osd.models import load_model, load_tokenizer
    from osd.specdec.engine import SpeculativeDecoder

    target, tok = load_model("zoo:target", "cpu"), load_tokenizer("zoo:target")
    draft = load_model("zoo:draft", "cpu")
    dec = SpeculativeDecoder(target, build_drafter("draft_model", target, draft, tree="2,2"), tok)
    ids = tok("Question: Tom has 3 apples and buys 4 more.", add_special_tokens=False).input_ids
    with torch.inference_mode():
        ref_out = target.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    with K.using("triton"):
        out = dec.generate(ids, max_new_tokens=12)
    assert out.tokens == ref_out[0, len(ids) :].tolist()[: len(out.tokens)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernels_on_gpu_at_serving_shapes(kern) -> None:
    accept, topk, _ = kern
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (4096, 49152):
        tokens, parents = random_batch([16] * 8, vocab, torch.Generator().manual_seed(0))
        b, n = tokens.shape
        q = torch.softmax(torch.randn(b, n + 1, vocab, device="cuda", generator=g), -1)
        u = torch.rand(b, n + 1, device="cuda", generator=g)
        kw = {"uniforms": u, "dtype": torch.float32}
        want = ref.accept_sampling_batch(tokens.cuda(), parents.cuda(), q, None, **kw)
        assert_same(
            want, accept.accept_sampling_batch(tokens.cuda(), parents.cuda(), q, None, **kw)
        )
        logits = torch.randn(64, vocab, device="cuda", generator=g)
        assert torch.equal(ref_topk_tail(logits, 16)[0], topk.topk_tail(logits, 16)[0])


def test_every_kernel_compiles_for_an_h100_without_one() -> None:
    """Triton's compiler (bundled ptxas) builds each kernel for sm_90 on this machine: what
    the interpreter cannot catch (types, control flow) fails here, not on a GPU later. In
    a fresh process: this module's kernels were decorated for the interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "osd.kernels.compile_check"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "11 kernels compiled for sm_90" in done.stdout


def test_the_top_level_name_kernels_is_hugging_faces_library():
    """Run from the repository root (``python -m …``), ``kernels/`` is importable as a
    top-level ``kernels``, the name of Hugging Face's library that transformers (5.25+)
    imports as it loads. The folder hands the name over where the library is installed:
    transformers loads either way, and ``kernels`` is then the library."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import transformers.activations\nimport kernels; print(kernels.__file__)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    where, ours = out.stdout.strip().splitlines()[-1], str(root / "kernels" / "__init__.py")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: the folder, as before
        assert where == ours
    else:
        assert where != ours and where.endswith("__init__.py"), where


def test_no_experiment_script_shadows_an_installed_package():
    """``python experiments/NAME.py`` puts ``experiments/`` first on ``sys.path``: a script
    named like a package that transformers imports (``kernels``, since 5.25) breaks every
    other script there."""
    import importlib.machinery
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "experiments"
    path = [p for p in sys.path if Path(p or ".").resolve() != folder]  # tests import scripts
    names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    found = importlib.machinery.PathFinder.find_spec
    shadowing = sorted(n for n in names if n == "kernels" or found(n, path) is not None)
    assert not shadowing, f"rename experiments/{shadowing[0]}: it shadows a package"
