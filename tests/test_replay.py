import pytest
import torch

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
        # improved MCSD: target-initialised (the kept token's row from the target's logits)
        lambda d: DraftModelDrafter(d, tree=(1, 3, 2), target_init=True),
        lambda d: DraftModelDrafter(d, tree=(2, 2, 1), target_init=True, early_stop=0.6),
    ],
)
def test_replay_reproduces_the_engine_counters(micro_zoo, make):
    target = load_model(str(micro_zoo / "target"))
    draft = load_model(str(micro_zoo / "draft"))
    dec = SpeculativeDecoder(target, make(draft))
    dec.eos = set()
    replayer = make(draft)  # one per run, as the online loop's frozen drafter
    for prompt in ([3, 7, 11, 19], [42]):
        out = dec.generate(prompt, max_new_tokens=30)
        tokens = prompt + out.tokens
        with torch.inference_mode():
            logits = target(torch.tensor([tokens])).logits[0]
        replayed = replay_greedy(replayer, tokens, len(prompt), logits=logits)
        assert replayed.as_dict() == out.stats.as_dict()


def test_target_init_replay_needs_the_target_logits(micro_zoo):
    draft = load_model(str(micro_zoo / "draft"))
    with pytest.raises(ValueError, match="target logits"):
        replay_greedy(DraftModelDrafter(draft, tree=(1, 2), target_init=True), [3, 7, 9], 2)
