"""Incremental detokenisation (osd/serving/detok.py): a request's text, grown a few tokens a
step, equals the full decode of its tokens at every step, for the tokenizers we serve."""

import random

import pytest

from osd.models import load_tokenizer
from osd.serving.detok import IncrementalText


def _check_growth(tok, ids: list[int], seed: int = 0) -> None:
    rng = random.Random(seed)
    inc, n = IncrementalText(tok), 0
    while n < len(ids):
        n = min(len(ids), n + rng.randint(1, 5))  # 1–5 accepted tokens a step
        got = inc.update(ids[:n])
        assert got == tok.decode(ids[:n], skip_special_tokens=True), (n, ids[:n])
    assert not inc.fallback


def _streams(tok, data_dir, count: int) -> list[list[int]]:
    """Real text (the eval prompts of every domain) and random ids, specials included."""
    from osd.workloads.datasets import DOMAINS, load_domain

    rng = random.Random(1)
    texts = [q.prompt for d in DOMAINS for q in load_domain(d, "eval", data_dir)[:count]]
    real = [tok(t, add_special_tokens=False).input_ids[:200] for t in texts]
    vocab = len(tok)
    noise = [[rng.randrange(vocab) for _ in range(120)] for _ in range(count)]
    return real + noise


def test_zoo_tokenizer_text_equals_the_full_decode_at_every_step(data_dir):
    tok = load_tokenizer("zoo:target")
    for i, ids in enumerate(_streams(tok, data_dir, 6)):
        _check_growth(tok, ids, seed=i)


@pytest.mark.real
def test_smollm2_tokenizer_text_equals_the_full_decode_at_every_step(smollm2, data_dir):
    tok = load_tokenizer("zoo:smollm2")
    streams = _streams(tok, data_dir, 4)
    streams.append(tok("naïve café — 東京 🙂 ok", add_special_tokens=False).input_ids)  # multi-byte
    for i, ids in enumerate(streams):
        _check_growth(tok, ids, seed=i)


def test_a_tokenizer_that_rewrites_earlier_text_falls_back_to_full_decodes():
    class Rewriting:  # decodes "ab" as "X": a window's text need not extend its context's
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids)).replace("ab", "X")

    inc = IncrementalText(Rewriting())
    assert inc.update([ord("a")]) == "a"
    assert inc.update([ord("a"), ord("b")]) == "X" and inc.fallback
    assert inc.update([ord("a"), ord("b"), ord("c")]) == "Xc"


def test_a_character_cut_short_is_not_settled():
    class Bytes:  # utf-8 bytes as ids
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    ids = list("é!".encode())  # [0xC3, 0xA9, 0x21]
    inc = IncrementalText(Bytes())
    assert inc.update(ids[:1]) == "\ufffd" and inc.read == 0  # held, not settled
    assert inc.update(ids[:2]) == "é" and inc.read == 2
    assert inc.update(ids) == "é!"
