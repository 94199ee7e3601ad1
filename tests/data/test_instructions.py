import numpy as np
import pytest

from jaxaigc.data import instructions
from jaxaigc.data.instructions import (
    TEMPLATES,
    Prompt,
    comparisons,
    demonstrations,
    make_prompts,
    noisy_ranking,
    pretraining_corpus,
    rl_prompts,
    score,
)
from jaxaigc.pipelines.instructgpt import prompt_bytes

# (task, params, gold answer, [(response, expected score)]).
CASES = [
    (
        "reverse",
        {"word": "apple"},
        "elppa",
        [(" 'Elppa.' ", 1.0), ("elpa", 0.8), ("elpap", 0.6), ("zzzzz", 0.0), ("", 0.0)],
    ),
    (
        "sort",
        {"numbers": "5, 3, 9", "order": "smallest to largest"},
        "3, 5, 9",
        [
            ("The sorted list is 3, 5 and 9.", 1.0),
            ("3, 9, 5", 1 / 3),
            ("3, 5", 2 / 3),
            ("3, 5, 9, 9", 3 / 4),
            ("9, 5, 3", 1 / 3),
            ("", 0.0),
        ],
    ),
    ("sort", {"numbers": "5, 3, 9", "order": "largest to smallest"}, "9, 5, 3", [("3 5 9", 1 / 3)]),
    (
        "count",
        {"word": "strawberry", "letter": "r"},
        "3",
        [("There are 3.", 1.0), ("three", 1.0), ("2", 0.5), ("5", 1 / 3), ("none", 0.0), ("", 0.0)],
    ),
    ("add", {"a": 17, "b": 25}, "42", [("17 + 25 = 42", 1.0), ("40", 1 / 3), ("", 0.0)]),
    (
        "case",
        {"text": "hello world", "case": "upper case"},
        "HELLO WORLD",
        [('"HELLO WORLD."', 1.0), ("HELLO WORLd", 10 / 11), ("hello world", 1 / 11), ("", 0.0)],
    ),
    (
        "case",
        {"text": "HELLO WORLD", "case": "title case"},
        "Hello World",
        [("hello world", 9 / 11)],
    ),
    (
        "list",
        {"n": 3, "category": "fruits"},
        "apple, banana, cherry",
        [
            ("1. Apples\n2. a banana\n3. cherries", 1.0),
            ("apple, banana, apple", 2 / 3),
            ("apple, dog, cherry", 2 / 3),
            ("apple, banana, cherry, grape", 3 / 4),
            ("apple and banana", 2 / 3),
            ("", 0.0),
        ],
    ),
    ("list", {"n": 2, "category": "countries"}, "peru, chile", [("Peru; Chile.", 1.0)]),
    (
        "repeat",
        {"word": "cat", "n": 3},
        "cat cat cat",
        [("Cat, cat, cat.", 1.0), ("cat cat", 2 / 3), ("cat cat cat cat", 3 / 4), ("dog", 0.0)],
    ),
    (
        "initials",
        {"text": "red apple tree"},
        "rat",
        [("R. A. T.", 1.0), ("ra", 2 / 3), ("tar", 1 / 3), ("", 0.0)],
    ),
]


@pytest.mark.parametrize(("task", "params", "answer", "cases"), CASES)
def test_gold_scorer_on_hand_written_cases(task, params, answer, cases):
    prompt = Prompt(task, 0, TEMPLATES[task][0].format(**params), params, answer)
    assert score(prompt, answer) == 1.0
    for response, expected in cases:
        assert score(prompt, response) == pytest.approx(expected), response


def test_gold_answers_score_one_and_every_task_appears():
    for split in instructions.SPLITS:
        prompts = make_prompts(400, seed=0, split=split)
        assert all(score(p, p.answer) == 1.0 for p in prompts if p.task in instructions.HARD_TASKS)
        assert {p.task for p in prompts} == set(TEMPLATES)
        assert all(p.text == TEMPLATES[p.task][p.template].format(**p.params) for p in prompts)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("a small tool", 0.5),  # no lexicon word
        ("a good small tool", (1 + np.tanh(0.5)) / 2),
        ("a good good tool", (1 + np.tanh(0.5)) / 2),  # a repeated positive word counts once
        ("a good, warm and kind tool", (1 + np.tanh(1.5)) / 2),
        ("a good tool of war", 0.5),
        ("war and death", (1 + np.tanh(-1.0)) / 2),  # every negative word counts
        ("good warm", 0.0),  # under 3 words continues nothing
    ],
)
def test_sentiment_counts_distinct_positive_and_every_negative_word(response, expected):
    assert instructions.sentiment(response) == pytest.approx(expected)


def test_cheer_prompts_continue_corpus_texts_with_room_above_the_demonstration():
    prompts = make_prompts(300, seed=0, tasks=["cheer"])
    assert {p.task for p in prompts} == {"cheer"}
    for p in prompts:
        assert len(prompt_bytes(p)) <= 100 and p.text.endswith(p.params["text"])  # its row
        # The demonstration holds a positive word, and two more distinct ones would score more.
        assert set(p.answer.split()) & instructions.POSITIVE
        assert score(p, p.answer + " glad and grateful") > score(p, p.answer)
    # The labeller's comparisons order responses of several sentiments: few ties.
    data = comparisons(200, seed=0, tasks=["cheer"])
    untied = [s[i] != s[j] for c in data for s in [c.scores] for i, j in c.pairs()]
    assert np.mean(untied) > 0.6
    with pytest.raises(ValueError, match="tasks \\['cheerful'\\]"):
        make_prompts(3, seed=0, tasks=["cheerful"])


def test_data_is_deterministic_by_seed():
    assert make_prompts(50, seed=3) == make_prompts(50, seed=3)
    assert make_prompts(50, seed=3) != make_prompts(50, seed=4)
    assert demonstrations(30, seed=1) == demonstrations(30, seed=1)
    assert all(d.response == d.prompt.answer for d in demonstrations(30, seed=1))
    # Each stage has its own stream: RL prompts are not the SFT prompts of the same seed.
    assert [p.text for p in rl_prompts(30, seed=3)] != [p.text for p in make_prompts(30, seed=3)]
    a, b = comparisons(20, seed=2), comparisons(20, seed=2)
    assert [(c.prompt, c.responses) for c in a] == [(c.prompt, c.responses) for c in b]
    assert all((x.ranking == y.ranking).all() for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="unknown split"):
        make_prompts(5, seed=0, split="test")


def test_held_out_prompts_never_appear_in_training():
    train = make_prompts(3000, seed=0) + rl_prompts(1000, seed=0)
    train += [d.prompt for d in demonstrations(1000, seed=0)]
    train += [c.prompt for c in comparisons(500, seed=0)]
    held_out = make_prompts(500, seed=0, split="held_out")
    held_out += rl_prompts(200, seed=0, split="held_out")
    assert all(p.template < len(TEMPLATES[p.task]) - 1 for p in train)
    assert all(p.template == len(TEMPLATES[p.task]) - 1 for p in held_out)
    assert not {p.text for p in train} & {p.text for p in held_out}


def test_comparisons_rank_k_responses():
    data = comparisons(300, seed=0)
    sizes = [len(c.responses) for c in data]
    assert set(sizes) == set(range(4, 10))
    for c in data:
        k = len(c.responses)
        assert c.scores.shape == (k,) and ((c.scores >= 0) & (c.scores <= 1)).all()
        assert c.scores.tolist() == [score(c.prompt, r) for r in c.responses]
        assert sorted(c.ranking.tolist()) == list(range(k))
        assert c.pairs().shape == (k * (k - 1) // 2, 2)
    # Varied quality: gold, partial credit and failures all occur.
    scores = np.concatenate([c.scores for c in data])
    assert (scores == 1).mean() > 0.1 and (scores == 0).mean() > 0.05
    assert ((scores > 0.2) & (scores < 0.8)).mean() > 0.2
    assert {len(c.responses) for c in comparisons(20, seed=0, k=5)} == {5}
    with pytest.raises(ValueError, match="at least 2"):
        comparisons(1, seed=0, k=1)


def test_labeller_without_noise_gives_the_gold_order():
    for temperature in (0.0, 1e-9):
        for c in comparisons(300, seed=1, temperature=temperature):
            ranked = c.scores[c.ranking]
            assert (np.diff(ranked) <= 0).all()
            for winner, loser in c.pairs():
                assert c.scores[winner] >= c.scores[loser]


def test_policy_responses_are_scored_and_ranked():
    def policy(prompt, k):
        return [prompt.answer, "", prompt.answer[:-1], "nonsense"][:k]

    data = comparisons(50, seed=0, k=4, temperature=0.0, policy=policy)
    for c in data:
        assert c.responses[0] == c.prompt.answer and c.ranking[0] == 0
        assert c.scores[1] == 0.0
    with pytest.raises(ValueError, match="policy gave 4 responses; asked for 5"):
        comparisons(1, seed=0, k=5, policy=policy)


def test_noisy_ranking_orders_a_pair_as_bradley_terry_says():
    rng = np.random.default_rng(0)
    draws = np.array([noisy_ranking([0.4, 0.6], temperature=0.1, rng=rng) for _ in range(20000)])
    p_first = (draws[:, 0] == 1).mean()
    assert p_first == pytest.approx(1 / (1 + np.exp(-2.0)), abs=0.01)  # sigmoid(0.2 / 0.1)


def _agreement(data, temperature):
    """Fraction of untied pairs in gold order, and its Bradley-Terry expectation."""
    agree, expected = [], []
    for c in data:
        for winner, loser in c.pairs():
            gap = c.scores[winner] - c.scores[loser]
            if gap != 0:
                agree.append(gap > 0)
                expected.append(1 / (1 + np.exp(-abs(gap) / temperature)))
    return np.mean(agree), np.mean(expected)


def test_labeller_agreement_falls_with_temperature_as_bradley_terry_predicts():
    reference = comparisons(1000, seed=5, temperature=0.0)
    measured = []
    for temperature in (0.05, 0.2, 1.0):
        data = comparisons(1000, seed=5, temperature=temperature)
        # The same responses at every temperature: only the labeller's noise changes.
        assert [c.responses for c in data] == [c.responses for c in reference]
        agree, expected = _agreement(data, temperature)
        assert agree == pytest.approx(expected, abs=0.02)
        measured.append(agree)
    assert measured[0] > 0.9 and measured[0] > measured[1] > measured[2] > 0.5
    assert measured[2] < 0.65


def _write_wordnet(root):
    root.mkdir()
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    synsets = {
        "noun": "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n"
        "00001930 03 n 01 physical_entity 0 000 | an entity that has physical existence  \n",
        "verb": "00001740 29 v 04 breathe 0 take_a_breath 0 000 | draw air into the lungs  \n",
        "adj": "00001740 00 a 01 able(a) 0 000 | having the necessary means  \n",
        "adv": "00001837 02 r 01 barely 0 000 | only just  \n",
    }
    for part, lines in synsets.items():
        (root / f"data.{part}").write_text(header + lines)


def test_pretraining_corpus_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(instructions, "WORDNET_DIR", tmp_path / "wordnet")
    monkeypatch.setattr(instructions, "FORTUNES_DIR", tmp_path / "fortunes")
    texts, source = pretraining_corpus(200, seed=0)
    assert source == "generated" and len(texts) == 200 and len(set(texts)) > 150
    assert pretraining_corpus(200, seed=0) == (texts, source)
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        pretraining_corpus(5, seed=0, source="wordnet")
    with pytest.raises(ValueError, match="unknown source"):
        pretraining_corpus(5, seed=0, source="books")

    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "riddles").write_text("Q: Why?\nA: Because.\n%\nA short one.\n%\n")
    (fortunes / "riddles.dat").write_bytes(b"\x00\x02binary index")
    texts, source = pretraining_corpus(2, seed=0)
    assert source == "fortunes" and sorted(texts) == ["A short one.", "Q: Why?\nA: Because."]

    _write_wordnet(tmp_path / "wordnet")
    texts, source = pretraining_corpus(5, seed=0)
    assert source == "wordnet"
    assert sorted(texts) == [
        "able: having the necessary means",
        "barely: only just",
        "breathe: draw air into the lungs",
        "entity: that which is perceived",
        "physical entity: an entity that has physical existence",
    ]
    assert len(pretraining_corpus(12, seed=0)[0]) == 12  # more than there are: drawn again


def test_rank_scores_and_orders_the_given_responses():
    prompt = make_prompts(1, seed=0)[0]
    responses = ["", prompt.answer, "nonsense"]
    c = instructions.rank(prompt, responses, temperature=0.0, rng=np.random.default_rng(0))
    assert c.responses == tuple(responses)
    assert c.scores.tolist() == [score(prompt, r) for r in responses]
    assert c.ranking[0] == 1  # the gold answer first
