"""InstructGPT's records as GPT-2 BPE rows: responses and their EOS masked, long prompts cut at
their start, K-way rankings and pairs in one batch, pretraining windows."""

import numpy as np
import pytest

from jaxaigc.data.preference_tokens import Encoder
from jaxaigc.data.preferences import Comparison, Demonstration
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from tests.helpers import tiny_gpt2_bpe

TEXTS = ["\n\nHuman: Please say apple.\n\nAssistant: Apple!", "one two three", "Hi there"]


@pytest.fixture(scope="module")
def encoder():
    """A byte-level BPE with GPT-2's EOS, as a converted GPT-2 folder holds it."""
    bpe = tiny_gpt2_bpe(TEXTS, 280)
    tokenizer = Gpt2Tokenizer(bpe)
    return Encoder(tokenizer, prompt_length=12, response_length=6, context_length=32,
                   vocab_size=300)  # fmt: skip


def test_demonstrations_mask_the_response_and_its_eos(encoder):
    demo = Demonstration("\n\nHuman: Please say apple.\n\nAssistant:", " Apple!")
    long = Demonstration("Hi", " one two three one two three one two three")
    rows = encoder.demonstrations([demo, long])
    tokens, mask = rows["tokens"], rows["response_mask"]
    eos = encoder.tokenizer.eos_id
    assert encoder.tokenizer.decode(tokens[0][mask[0]].tolist()) == " Apple!"
    assert tokens[0][mask[0]][-1] == eos and tokens.shape[1] % 8 == 0
    assert mask[1].sum() == 6 and tokens[1][mask[1]][-1] == eos  # 5 tokens kept, then EOS
    prompt = encoder.prompt_ids(demo.prompt)
    assert len(prompt) == 12 and encoder.tokenizer.decode(prompt).endswith("Assistant:")


def test_prompts_keep_their_end_left_padded(encoder):
    tokens, valid = encoder.prompts(["one two three " * 6 + "Hi there", "Hi"])
    assert tokens.shape == (2, 12) and valid[0].all()
    assert encoder.tokenizer.decode(tokens[0].tolist()).endswith("Hi there")
    assert valid[1].sum() == len(encoder.tokenizer.tokenize("Hi")) and valid[1, -1]


def test_a_ranking_and_a_pair_in_one_batch(encoder):
    ranking = Comparison("Hi", (" one", " two", " three"), (2, 0, 1))
    pair = Comparison("Hi", (" there", " one"), (0, 1))
    rows = encoder.comparisons([ranking, pair])
    assert rows["tokens"].shape[:2] == (2, 3)  # padded to the largest K
    np.testing.assert_array_equal(rows["ranks"], [[1, 2, 0], [0, 1, -1]])
    assert not rows["response_mask"][1, 2].any()  # the pair's missing third response


def test_pretraining_windows(encoder):
    ptx = encoder.pretraining(["one two", "three"], 3, seed=0)
    assert ptx["ptx"].shape == (3, 32) and ptx["ptx_weights"].shape == (3, 31)
    stream = sum(len(encoder.tokenizer.tokenize(t)) + 1 for t in ("one two", "three"))
    assert ptx["ptx_weights"][0].sum() == stream - 1  # one window, its pads unweighted
    np.testing.assert_array_equal(ptx["ptx"][0], ptx["ptx"][2])  # repeated to fill the rows
    many = encoder.pretraining(TEXTS * 20, 2, seed=0)
    assert many["ptx_weights"].all() and not np.array_equal(many["ptx"][0], many["ptx"][1])
