"""Synthetic instruction tasks with gold scorers, for the InstructGPT pipeline (Ouyang et al. 2022).

Two families. The eight ``HARD_TASKS`` (reverse a word, sort numbers, count a letter, add, change
case, list items of a category, repeat a word, initials of words) need skills a 2-layer byte-level
model lacks, so they measure, they do not teach. The ``STYLE_TASKS`` are Ziegler et al. (2019)'s
stylistic continuation, the preference a small model can learn: "cheer" continues a corpus text,
and its gold scorer is a sentiment lexicon. Every task has four templates. A programmatic gold
scorer gives every response a score in [0, 1]; it stands in for human labellers as in Gao et al.
2022. The data of each stage: :func:`demonstrations` (SFT), :func:`comparisons` (K-way rankings by
a noisy Bradley-Terry labeller, for the reward model), :func:`rl_prompts` (PPO) and
:func:`pretraining_corpus` (the ptx term); each takes the ``tasks`` to draw from (default all).

Split: the last template of every task is held out; ``"train"`` prompts use only the others, so
``"held_out"`` prompts are phrasings never seen in training (the parameter ranges are shared).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxaigc.data import wordnet

SPLITS = ("train", "held_out")
# Independent random streams per data product, so e.g. RL prompts differ from SFT prompts.
_PROMPTS, _DEMOS, _COMPARISONS, _LABELLER, _RL, _CORPUS = range(6)

CATEGORIES = {
    "fruit": "apple apricot banana cherry coconut fig grape kiwi lemon lime mango melon orange "
    "papaya peach pear plum raspberry strawberry blueberry",
    "animal": "bear camel cat cow deer dog elephant fox giraffe goat horse lion monkey mouse "
    "otter rabbit sheep tiger wolf zebra",
    "colour": "beige black blue brown cyan gold green grey indigo magenta maroon orange pink "
    "purple red silver turquoise violet white yellow",
    "country": "australia brazil canada chile china egypt france germany greece india italy "
    "japan kenya mexico norway peru russia spain sweden turkey",
    "vegetable": "bean beet broccoli cabbage carrot celery corn cucumber garlic kale leek "
    "lettuce onion pea pepper potato pumpkin radish spinach turnip",
    "tool": "axe chisel clamp drill hammer knife ladder pliers rake saw scissors screwdriver "
    "shovel spade trowel wrench",
    "instrument": "accordion banjo bassoon cello clarinet drum flute guitar harmonica harp oboe "
    "piano saxophone trombone trumpet tuba ukulele violin",
    "sport": "archery baseball basketball boxing cricket cycling fencing football golf hockey "
    "judo rowing rugby skiing surfing swimming tennis volleyball",
}
CATEGORIES = {name: tuple(items.split()) for name, items in CATEGORIES.items()}
_PLURALS = {"country": "countries"}
WORDS = tuple(sorted({w for items in CATEGORIES.values() for w in items}))
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_ORDERS = ("smallest to largest", "largest to smallest")
_CASES = {"upper case": str.upper, "lower case": str.lower, "title case": str.title}


def _plural(category: str) -> str:
    return _PLURALS.get(category, category + "s")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """An instruction: ``text`` is ``task``'s template number ``template`` filled with ``params``
    (all the gold scorer needs); ``answer`` is a gold response."""

    task: str
    template: int
    text: str
    params: dict[str, Any]
    answer: str


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt with a response (a demonstration when the response is the gold answer)."""

    prompt: Prompt
    response: str


@dataclasses.dataclass(frozen=True)
class Comparison:
    """K responses to one prompt, their gold scores ``[K]`` and the labeller's ``ranking`` ``[K]``
    (response indices, best first)."""

    prompt: Prompt
    responses: tuple[str, ...]
    scores: np.ndarray
    ranking: np.ndarray

    def pairs(self) -> np.ndarray:
        """int ``[K(K-1)/2, 2]``: every (preferred, rejected) pair of response indices."""
        r = self.ranking
        return np.array([(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))])


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))  # Levenshtein, one row of the table at a time
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def similarity(response: str, gold: str) -> float:
    """1 - edit distance / the longer length: 1 for equal strings, 0 for nothing in common."""
    return 1.0 - _edit_distance(response, gold) / max(len(response), len(gold), 1)


def _clean(response: str) -> str:
    """Without surrounding whitespace, quotes and a final full stop."""
    return response.strip().strip("\"'`").rstrip(".!").strip()


def _integers(response: str, *, words: bool = False) -> list[int]:
    pattern = r"-?\d+" + (rf"|\b(?:{'|'.join(_NUMBER_WORDS)})\b" if words else "")
    found = re.findall(pattern, response.lower())
    return [_NUMBER_WORDS.index(x) if x in _NUMBER_WORDS else int(x) for x in found]


def _closeness(response: str, gold: int, *, words: bool = False) -> float:
    """1 / (1 + |error|) for the last number in the response; 0 with none."""
    found = _integers(response, words=words)
    return 1.0 / (1.0 + abs(found[-1] - gold)) if found else 0.0


def _items(response: str) -> list[str]:
    """List items split on commas, semicolons, newlines or "and", without bullets or articles."""
    parts = re.split(r",|;|\n|\band\b", response.lower())
    parts = [re.sub(r"^\s*(?:[-*•]|\d+[.)])?\s*(?:(?:a|an|the)\s+)?", "", p) for p in parts]
    return [p.strip(" .!\"'") for p in parts if p.strip(" .!\"'")]


def _singular(item: str, category: tuple[str, ...]) -> str:
    for form in (item, item[:-1], item[:-2], item[:-3] + "y"):  # x, xs, xes, xies
        if form in category:
            return form
    return item


def _word(rng: np.random.Generator) -> str:
    return WORDS[rng.integers(len(WORDS))]


def _phrase(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(_word(rng) for _ in range(rng.integers(lo, hi + 1)))


def _sample_reverse(rng):
    word = _word(rng)
    return {"word": word}, word[::-1]


def _score_reverse(p, response):
    return similarity(_clean(response).lower(), p["word"][::-1])


def _sample_sort(rng):
    numbers = rng.choice(100, rng.integers(3, 8), replace=False).tolist()
    order = _ORDERS[rng.integers(2)]
    gold = sorted(numbers, reverse=order == _ORDERS[1])
    return {"numbers": ", ".join(map(str, numbers)), "order": order}, ", ".join(map(str, gold))


def _score_sort(p, response):
    gold = sorted(_integers(p["numbers"]), reverse=p["order"] == _ORDERS[1])
    found = _integers(response)
    return sum(a == b for a, b in zip(found, gold, strict=False)) / max(len(gold), len(found))


def _sample_count(rng):
    word = _word(rng)
    # Mostly a letter of the word; sometimes one it lacks (answer 0).
    absent = sorted(set(_ALPHABET) - set(word))
    letters = word if rng.random() < 0.7 else absent
    letter = letters[rng.integers(len(letters))]
    return {"word": word, "letter": letter}, str(word.count(letter))


def _score_count(p, response):
    return _closeness(response, p["word"].count(p["letter"]), words=True)


def _sample_add(rng):
    a, b = rng.integers(0, 100, 2).tolist()
    return {"a": a, "b": b}, str(a + b)


def _score_add(p, response):
    return _closeness(response, p["a"] + p["b"])


def _sample_case(rng):
    case = list(_CASES)[rng.integers(3)]
    text = _phrase(rng, 2, 4)
    # Shown in another case, so copying the text is not the answer.
    shown = [c for c in _CASES if c != case][rng.integers(2)]
    return {"text": _CASES[shown](text), "case": case}, _CASES[case](text)


def _score_case(p, response):
    return similarity(_clean(response), _CASES[p["case"]](p["text"]))


def _sample_list(rng):
    category = list(CATEGORIES)[rng.integers(len(CATEGORIES))]
    n = int(rng.integers(2, 6))
    items = rng.choice(CATEGORIES[category], n, replace=False)
    return {"n": n, "category": _plural(category)}, ", ".join(items)


def _score_list(p, response):
    category = CATEGORIES[next(c for c in CATEGORIES if _plural(c) == p["category"])]
    found = [_singular(x, category) for x in _items(response)]
    # Distinct valid items (at most n) over max(n, items given): repeats and extras cost.
    return min(len({x for x in found if x in category}), p["n"]) / max(p["n"], len(found))


def _sample_repeat(rng):
    word, n = _word(rng), int(rng.integers(2, 6))
    return {"word": word, "n": n}, " ".join([word] * n)


def _score_repeat(p, response):
    found = re.findall(r"[a-z]+", response.lower())
    # Every copy counts here (no distinctness), up to n, over max(n, words given).
    return min(found.count(p["word"]), p["n"]) / max(p["n"], len(found))


def _initials(text: str) -> str:
    return "".join(w[0] for w in text.split())


def _sample_initials(rng):
    text = _phrase(rng, 3, 5)
    return {"text": text}, _initials(text)


def _score_initials(p, response):
    return similarity(re.sub(r"[^a-z]", "", response.lower()), _initials(p["text"]))


# The sentiment lexicon of the "cheer" task: common words of the corpus (each in 7 to 815
# WordNet glosses, so the pretrained model can spell them).
# fmt: off
POSITIVE = frozenset((
    "good", "great", "happy", "pleasant", "kind", "beautiful", "nice", "fine", "love", "loved",
    "loving", "joy", "joyful", "warm", "bright", "gentle", "friendly", "cheerful", "delightful",
    "wonderful", "pleasing", "lovely", "hope", "glad", "best", "better", "excellent", "fun",
    "pleasure", "pretty", "sweet", "calm", "peace", "peaceful", "success", "successful", "healthy",
    "safe", "generous", "grateful", "proud", "brave", "honest", "fair", "fresh", "favorable",
    "admirable", "pleased", "smile", "laugh", "enjoy", "enjoyable", "comfort", "comfortable",
    "charming", "helpful", "trust",
))
NEGATIVE = frozenset((
    "bad", "sad", "evil", "harm", "harmful", "pain", "painful", "cruel", "ugly", "angry", "anger",
    "fear", "hate", "poor", "sick", "dead", "death", "war", "wrong", "worst", "worse", "terrible",
    "unpleasant", "unhappy", "disease", "injury", "violent", "crime", "fail", "failure", "loss",
    "dirty", "dangerous", "danger", "disgust", "nasty", "awful", "horrible", "afraid", "weak",
    "lonely", "grief", "hurt", "kill", "damage",
))
# fmt: on
_CHEER_WORDS = tuple(sorted(POSITIVE))
_PREFIX_BYTES = 36  # the longest template (52 bytes) + 36 + " Answer: " fit 100
_CONTINUATION_BYTES = 40  # a demonstration's continuation, before its inserted positive word


def sentiment(response: str) -> float:
    """``(1 + tanh((P - N) / 2)) / 2`` for P distinct positive and N negative words (repeats
    of a positive word count once); 0 for fewer than 3 words, which continue nothing."""
    words = re.findall(r"[a-z]+", response.lower())
    if len(words) < 3:
        return 0.0
    positive = len(set(words) & POSITIVE)
    negative = sum(w in NEGATIVE for w in words)
    return 0.5 * (1.0 + math.tanh(0.5 * (positive - negative)))


@functools.cache
def _continuation_pool(wordnet_dir: Path) -> tuple[str, ...]:
    """Corpus texts of at least 8 words to continue: WordNet's "lemma: definition" lines, or
    generated sentences without WordNet."""
    if not (wordnet_dir / "data.noun").exists():
        rng = np.random.default_rng(0)
        texts = [_generated(rng) for _ in range(5_000)]
    else:
        texts = [f"{lemma}: {gloss.split(';')[0]}" for lemma, gloss in _wordnet_glosses()]
    return tuple(t for t in texts if len(t.split()) >= 8 and t.isascii())


def _insert(words: list[str], new: Sequence[str], rng: np.random.Generator) -> list[str]:
    """``words`` with each of ``new`` inserted at a random place."""
    words = list(words)
    for word in new:
        words.insert(int(rng.integers(len(words) + 1)), word)
    return words


def _sample_cheer(rng):
    pool = _continuation_pool(WORDNET_DIR)
    words = pool[rng.integers(len(pool))].split()
    cut = int(rng.integers(3, 6))
    while cut > 1 and len(" ".join(words[:cut])) > _PREFIX_BYTES:  # the prompt fits its row
        cut -= 1
    rest = []
    for word in words[cut:]:
        if len(" ".join([*rest, word])) > _CONTINUATION_BYTES:
            break
        rest.append(word)
    # The demonstration: the text's own continuation with one positive word in it, a fair
    # answer (gold 0.73) that leaves room above it (two distinct positive words: 0.88).
    answer = _insert(rest or words[cut : cut + 1], [rng.choice(_CHEER_WORDS)], rng)
    return {"text": " ".join(words[:cut])}, " ".join(answer)


def _score_cheer(p, response):
    del p  # any continuation: the preference is its tone
    return sentiment(response)


def _cheer_candidate(answer: str, rng: np.random.Generator) -> str:
    """The demonstration's continuation with 0-3 positive words (sometimes one repeated) and
    0-2 negative ones inserted, for the reward model to learn the lexicon's order from."""
    words = [w for w in answer.split() if w not in POSITIVE]
    positive = list(rng.choice(_CHEER_WORDS, int(rng.integers(0, 4)), replace=False))
    if positive and rng.random() < 0.2:
        positive.append(positive[0])
    negative = list(rng.choice(sorted(NEGATIVE), int(rng.integers(0, 3)), replace=False))
    return " ".join(_insert(words, positive + negative, rng))


# Four phrasings per task; the last one is held out of training.
TEMPLATES = {
    "reverse": (
        "Reverse the word {word}.",
        "Spell {word} backwards.",
        "Write {word} with its letters in reverse order.",
        "What do you get when you read {word} from right to left?",
    ),
    "sort": (
        "Sort these numbers from {order}: {numbers}.",
        "Put {numbers} in order from {order}.",
        "Arrange the numbers {numbers} from {order}.",
        "Order from {order}: {numbers}",
    ),
    "count": (
        "How many times does the letter {letter} appear in {word}?",
        "Count the letter {letter} in the word {word}.",
        "How many {letter}'s are in {word}?",
        "In the word {word}, how often does {letter} occur?",
    ),
    "add": (
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Compute the sum of {a} and {b}.",
        "{a} plus {b} equals what?",
    ),
    "case": (
        'Write "{text}" in {case}.',
        'Convert "{text}" to {case}.',
        "Rewrite this in {case}: {text}",
        'Change "{text}" into {case}.',
    ),
    "list": (
        "List {n} {category}.",
        "Name {n} different {category}.",
        "Give me {n} examples of {category}, separated by commas.",
        "Can you think of {n} {category}?",
    ),
    "repeat": (
        "Repeat the word {word} {n} times.",
        "Say {word} {n} times.",
        "Write {word} {n} times, separated by spaces.",
        "Type the word {word} exactly {n} times.",
    ),
    "initials": (
        "Write the first letter of each word in: {text}",
        "What are the initials of {text}?",
        'Take the first letter of every word of "{text}".',
        'Join the first letters of the words in "{text}".',
    ),
    "cheer": (
        "Continue on a happy note: {text}",
        "Carry on this text cheerfully: {text}",
        "Write what comes next, in a warm and positive tone: {text}",
        "Go on, keeping it upbeat: {text}",
    ),
}
# Per task: a sampler rng -> (params, gold answer) and the gold scorer (params, response) -> [0, 1].
_TASKS = {
    "reverse": (_sample_reverse, _score_reverse),
    "sort": (_sample_sort, _score_sort),
    "count": (_sample_count, _score_count),
    "add": (_sample_add, _score_add),
    "case": (_sample_case, _score_case),
    "list": (_sample_list, _score_list),
    "repeat": (_sample_repeat, _score_repeat),
    "initials": (_sample_initials, _score_initials),
    "cheer": (_sample_cheer, _score_cheer),
}
TASK_NAMES = tuple(TEMPLATES)
STYLE_TASKS = ("cheer",)
HARD_TASKS = tuple(t for t in TASK_NAMES if t not in STYLE_TASKS)


def score(prompt: Prompt, response: str) -> float:
    """The gold score in [0, 1] of ``response`` to ``prompt``."""
    return float(_TASKS[prompt.task][1](prompt.params, response))


def _rng(seed: int, split: str, stream: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return np.random.default_rng([seed, SPLITS.index(split), stream])


def _task_names(tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return TASK_NAMES
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown or not tasks:
        raise ValueError(f"tasks {list(tasks)}: use a non-empty subset of {TASK_NAMES}")
    return tuple(tasks)


def _sample_prompt(
    rng: np.random.Generator,
    split: str,
    *,
    exclude: str | None = None,
    tasks: Sequence[str] | None = None,
) -> Prompt:
    names = [t for t in _task_names(tasks) if t != exclude] or [
        t for t in TASK_NAMES if t != exclude
    ]
    name = names[rng.integers(len(names))]
    held_out = len(TEMPLATES[name]) - 1
    template = held_out if split == "held_out" else int(rng.integers(held_out))
    params, answer = _TASKS[name][0](rng)
    return Prompt(name, template, TEMPLATES[name][template].format(**params), params, answer)


def make_prompts(
    n: int, *, seed: int, split: str = "train", tasks: Sequence[str] | None = None
) -> list[Prompt]:
    """``n`` prompts, ``tasks`` (default all) uniform; ``"held_out"`` uses only each task's last
    template."""
    rng = _rng(seed, split, _PROMPTS)
    return [_sample_prompt(rng, split, tasks=tasks) for _ in range(n)]


def rl_prompts(
    n: int, *, seed: int, split: str = "train", tasks: Sequence[str] | None = None
) -> list[Prompt]:
    """``n`` prompts for PPO, from a stream apart from the SFT and reward-model prompts."""
    rng = _rng(seed, split, _RL)
    return [_sample_prompt(rng, split, tasks=tasks) for _ in range(n)]


def demonstrations(
    n: int, *, seed: int, split: str = "train", tasks: Sequence[str] | None = None
) -> list[Example]:
    """``n`` prompts with their gold answers, for supervised fine-tuning."""
    rng = _rng(seed, split, _DEMOS)
    prompts = (_sample_prompt(rng, split, tasks=tasks) for _ in range(n))
    return [Example(p, p.answer) for p in prompts]


def _misspell(word: str, edits: int, rng: np.random.Generator) -> str:
    for _ in range(edits):
        i, c = int(rng.integers(len(word) + 1)), _ALPHABET[rng.integers(26)]
        op = rng.integers(4) if word else 2  # an empty word can only grow
        if op == 0:  # substitute (past the last letter: append)
            word = word[:i] + c + word[i + 1 :]
        elif op == 1:  # delete
            word = word[:i] + word[i + 1 :]
        elif op == 2:  # insert
            word = word[:i] + c + word[i:]
        elif 0 < i < len(word):  # swap neighbours
            word = word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    return word


def corrupt(answer: str, level: float, rng: np.random.Generator) -> str:
    """``answer`` damaged in proportion to ``level`` in [0, 1]: a number shifted, list items
    swapped, dropped, repeated or misspelt, letters of a word misspelt."""
    if level <= 0:
        return answer
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + (1 + rng.poisson(20 * level)) * rng.choice((-1, 1)))
    sep = ", " if ", " in answer else " "
    parts = answer.split(sep)
    if len(parts) == 1:
        return _misspell(answer, math.ceil(level * len(answer)), rng)
    for _ in range(math.ceil(level * len(parts))):
        i, j = rng.integers(len(parts), size=2)
        op = rng.integers(4)
        if op == 0:
            parts[i], parts[j] = parts[j], parts[i]
        elif op == 1 and len(parts) > 1:
            del parts[i]
        elif op == 2:
            parts.insert(j, parts[i])
        else:
            parts[i] = _misspell(parts[i], 2, rng)
    return sep.join(parts)


def _candidates(prompt: Prompt, k: int, split: str, rng: np.random.Generator) -> list[str]:
    """Responses of mixed quality: gold, corrupted gold and answers to other tasks."""
    out = []
    for _ in range(k):
        u = rng.random()
        if u < 0.15:
            out.append(_sample_prompt(rng, split, exclude=prompt.task).answer)
        elif u < 0.3:
            out.append(prompt.answer)
        elif prompt.task == "cheer":
            out.append(_cheer_candidate(prompt.answer, rng))
        else:
            out.append(corrupt(prompt.answer, rng.uniform(0.05, 1.0), rng))
    return out


def noisy_ranking(
    scores: np.ndarray | Sequence[float], *, temperature: float, rng: np.random.Generator
) -> np.ndarray:
    """A labeller's ranking ``[K]`` (indices, best first) of items with gold ``scores`` ``[K]``.

    A Plackett-Luce draw with utilities ``scores / temperature`` by the Gumbel trick, so each
    pair is ordered as Bradley-Terry says: P(i above j) = sigmoid((s_i - s_j) / temperature).
    ``temperature=0`` gives the gold order (ties by index).
    """
    scores = np.asarray(scores, np.float64)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if temperature == 0:
        return np.argsort(-scores, kind="stable")
    return np.argsort(-(scores / temperature + rng.gumbel(size=scores.shape)))


Policy = Callable[[Prompt, int], Sequence[str]]


def comparisons(
    n: int,
    *,
    seed: int,
    k: int | tuple[int, int] = (4, 9),
    temperature: float = 0.1,
    split: str = "train",
    policy: Policy | None = None,
    tasks: Sequence[str] | None = None,
) -> list[Comparison]:
    """``n`` prompts, each with K responses ranked by a noisy labeller, for the reward model.

    Args:
      k: responses per prompt, or an inclusive range to draw K from per prompt (paper: 4 to 9).
      temperature: the labeller's noise (see :func:`noisy_ranking`). With the synthetic
        responses, 0.1 agrees with the gold order on 88% of untied pairs, 0.3 on 74% (near the
        paper's 73% agreement between labellers). The responses depend only on ``seed``.
      policy: ``policy(prompt, K) -> K responses`` (e.g. samples of the SFT model); by default
        synthetic responses of mixed quality.
    """
    lo, hi = (k, k) if isinstance(k, int) else k
    if not 2 <= lo <= hi:
        raise ValueError(f"k must be at least 2 (and a range lo <= hi); got {k}")
    rng, label_rng = _rng(seed, split, _COMPARISONS), _rng(seed, split, _LABELLER)
    out = []
    for _ in range(n):
        prompt = _sample_prompt(rng, split, tasks=tasks)
        size = int(rng.integers(lo, hi + 1))
        if policy is None:
            responses = _candidates(prompt, size, split, rng)
        else:
            responses = list(policy(prompt, size))
            if len(responses) != size:
                raise ValueError(f"policy gave {len(responses)} responses; asked for {size}")
        out.append(rank(prompt, responses, temperature=temperature, rng=label_rng))
    return out


def rank(
    prompt: Prompt, responses: Sequence[str], *, temperature: float, rng: np.random.Generator
) -> Comparison:
    """The labeller's comparison of ``responses`` to ``prompt``: their gold scores and a
    :func:`noisy_ranking` of them (for responses a model sampled in batches)."""
    scores = np.array([score(prompt, r) for r in responses])
    ranking = noisy_ranking(scores, temperature=temperature, rng=rng)
    return Comparison(prompt, tuple(responses), scores, ranking)


# Where the corpus reads its texts (module attributes, so tests can point them elsewhere).
WORDNET_DIR = wordnet.WORDNET_DIR
FORTUNES_DIR = Path("/usr/share/games/fortunes")
CORPUS_SOURCES = ("wordnet", "fortunes", "generated")


def _wordnet_glosses() -> list[tuple[str, str]]:
    """``(lemma, gloss)`` of every synset in WordNet's data files (Debian ``wordnet-base``)."""
    return [pair for part in wordnet.PARTS for pair in wordnet.synsets(part, WORDNET_DIR)]


def _wordnet() -> list[str]:
    """The "lemma: gloss" of every synset in WordNet's data files."""
    return [f"{lemma}: {gloss}" for lemma, gloss in _wordnet_glosses()]


def _fortunes() -> list[str]:
    """Every fortune in the top-level files of the Debian ``fortunes`` data (``%``-separated)."""
    texts = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.is_file() and not path.suffix:  # .dat indices and .u8 links are not text
            entries = re.split(
                r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M
            )
            texts += [e.strip() for e in entries if e.strip()]
    return texts


def _generated(rng: np.random.Generator) -> str:
    """A sentence of facts related to the tasks (categories, spelling, arithmetic, order)."""
    category = list(CATEGORIES)[rng.integers(len(CATEGORIES))]
    a, b, c = rng.choice(CATEGORIES[category], 3, replace=False)
    word = _word(rng)
    x, y = rng.integers(0, 100, 2).tolist()
    numbers = rng.choice(100, 4, replace=False).tolist()
    choices = (
        f"The word {a} names {'an' if category[0] in 'aeiou' else 'a'} {category}.",
        f"{a.title()}, {b} and {c} are all {_plural(category)}.",
        f"The word {word} has {len(word)} letters and starts with {word[0]}.",
        f"{word.title()} spelled backwards is {word[::-1]}.",
        f"{x} plus {y} makes {x + y}.",
        f"In order, {', '.join(map(str, numbers))} become {', '.join(map(str, sorted(numbers)))}.",
    )
    return choices[rng.integers(len(choices))]


def pretraining_corpus(n: int, *, seed: int, source: str = "auto") -> tuple[list[str], str]:
    """``n`` texts for the pretraining (ptx) term, and the source used.

    ``source="auto"`` takes WordNet glosses if ``wordnet-base`` is installed, else fortunes if
    ``fortunes`` is, else generated sentences. Installed sources are sampled without replacement
    while they last.
    """
    available = {"wordnet": WORDNET_DIR / "data.noun", "fortunes": FORTUNES_DIR}
    if source == "auto":
        source = next((s for s, path in available.items() if path.exists()), "generated")
    if source not in CORPUS_SOURCES:
        raise ValueError(f"unknown source {source!r}; use 'auto' or one of {CORPUS_SOURCES}")
    rng = _rng(seed, "train", _CORPUS)
    if source == "generated":
        return [_generated(rng) for _ in range(n)], source
    if not available[source].exists():
        package = {"wordnet": "wordnet-base", "fortunes": "fortunes"}[source]
        raise FileNotFoundError(f"{available[source]} is missing: apt-get install {package}")
    pool = _wordnet() if source == "wordnet" else _fortunes()
    return [pool[i] for i in rng.choice(len(pool), n, replace=n > len(pool))], source
