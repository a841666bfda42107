import pytest

from osd.drafters.base import Drafter
from osd.drafters.draft_model import DraftModelDrafter
from osd.drafters.ngram import NgramDrafter
from osd.models import load_model
from osd.specdec.engine import SpeculativeDecoder
from osd.specdec.replay import replay_greedy
from osd.specdec.tree import TokenTree


class FixedChain(Drafter):
    def __init__(self, chain):
        super().__init__()
        self.chain = chain

    def propose(self, state, max_depth):
        return TokenTree.chain(self.chain[:max_depth])


def test_worked_example():
    stats = replay_greedy(FixedChain([5, 6, 9]), [1, 5, 6, 7, 8], prompt_len=1)
    assert stats.steps == 2 and stats.accepted == 2 and stats.emitted == 4
    assert stats.alpha == pytest.approx(2 / 3) and stats.tau == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda d: DraftModelDrafter(d, k=3),
        lambda d: DraftModelDrafter(d, tree=(3, 2)),
        lambda d: NgramDrafter(k=3),
    ],
)
def test_replay_reproduces_the_engine_counters(micro_zoo, make):
    target = load_model(str(micro_zoo / "target"))
    draft = load_model(str(micro_zoo / "draft"))
    dec = SpeculativeDecoder(target, make(draft))
    dec.eos = set()
    for prompt in ([3, 7, 11, 19], [42]):
        out = dec.generate(prompt, max_new_tokens=30)
        replayed = replay_greedy(make(draft), prompt + out.tokens, len(prompt))
        assert replayed.as_dict() == out.stats.as_dict()
