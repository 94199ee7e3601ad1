"""WordNet 3.0 as Debian's ``wordnet-base`` installs it: every synset's gloss, and the
definitions of a noun's most frequent sense (for captions that explain the words of a name)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
PARTS = ("noun", "verb", "adj", "adv")


def synsets(part: str, directory: Path = WORDNET_DIR) -> Iterator[tuple[str, str]]:
    """``(first lemma, gloss)`` of every synset in ``directory/data.<part>``, in file order."""
    path = directory / f"data.{part}"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or " | " not in line:  # the licence header
            continue
        fields, gloss = line.split(" | ", 1)
        # The first lemma; adjectives may carry a syntax marker such as "(a)".
        yield re.sub(r"\(\w+\)$", "", fields.split()[4]).replace("_", " "), gloss.strip()


@functools.cache
def _first_noun_senses(directory: Path) -> dict[str, str]:
    """Each noun lemma's most frequent synset, by its byte offset in ``data.noun``."""
    path = directory / "index.noun"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install it with `sudo apt-get install -y wordnet-base`"
        )
    senses = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
        fields = line.split()
        senses[fields[0]] = fields[4 + int(fields[3]) + 2]
    return senses


@functools.cache
def noun_definition(term: str, directory: Path = WORDNET_DIR) -> str | None:
    """The definition (the gloss without its quoted examples) of the most frequent sense of the
    noun ``term`` ("ice cream" or "ice_cream"), or None when WordNet has no such noun."""
    offset = _first_noun_senses(directory).get(term.lower().replace(" ", "_").replace("-", "_"))
    if offset is None:
        return None
    with open(directory / "data.noun", "rb") as f:  # synset offsets are byte offsets
        f.seek(int(offset))
        gloss = f.readline().decode("utf-8", errors="replace").split(" | ", 1)[1]
    return re.split(r';\s*"', gloss.strip(), maxsplit=1)[0].strip()


def name_definitions(name: str, directory: Path = WORDNET_DIR) -> tuple[str, ...]:
    """Definitions of the noun senses of ``name`` as a whole and of each of its words, in that
    order and without repeats; a word's most frequent sense need not be the one ``name`` means
    ("mouse" is the animal)."""
    terms = [name, *name.split()]
    found = (noun_definition(t, directory) for t in terms)
    return tuple(dict.fromkeys(d for d in found if d))


@functools.cache
def _noun_graph(directory: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each noun synset's lemmas and the synsets it is a kind or an instance of, by offset."""
    lemmas, parents = {}, {}
    path = directory / "data.noun"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: install it with `sudo apt-get install -y wordnet-base`"
        )
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or " | " not in line:  # the licence header
            continue
        # offset lex_filenum ss_type w_cnt [word lex_id]... p_cnt [symbol offset pos source]...
        fields = line.split(" | ", 1)[0].split()
        count = int(fields[3], 16)
        lemmas[fields[0]] = [fields[4 + 2 * i].replace("_", " ").lower() for i in range(count)]
        start = 5 + 2 * count
        pointers = [
            fields[start + 4 * i : start + 4 * i + 2] for i in range(int(fields[start - 1]))
        ]
        parents[fields[0]] = [offset for symbol, offset in pointers if symbol in ("@", "@i")]
    return lemmas, parents


def kinds_of(
    words: Iterable[str], depth: int = 2, directory: Path = WORDNET_DIR
) -> tuple[tuple[str, str], ...]:
    """``(noun, word)`` for every noun that is a kind of one of ``words`` within ``depth``
    hypernym steps ("eagle" -> "bird of prey" -> "bird": ``("eagle", "bird")``), sorted."""
    lemmas, parents = _noun_graph(directory)
    words = set(words)
    pairs = set()
    for offset, nouns in lemmas.items():
        frontier = parents[offset]
        for _ in range(depth):
            reached = {w for parent in frontier for w in lemmas[parent] if w in words}
            pairs.update((noun, w) for noun in nouns for w in reached if noun != w)
            frontier = [grand for parent in frontier for grand in parents[parent]]
    return tuple(sorted(pairs))
