"""Tokenizers: OpenAI's CLIP BPE (ids identical to ``clip.simple_tokenizer``) and a trainable
byte-level BPE for the DALL-E text stream and the small language models.

CLIP's tokenizer (Radford et al. 2021) cleans text with ftfy and a double HTML unescape, collapses
whitespace, lowercases, splits words with a regex, maps each word's UTF-8 bytes to printable
characters and merges them with 48,894 BPE merges, marking word ends with ``</w>``. The merges run
in HF ``tokenizers``; the cleaning and the word split stay in Python because HF's regex engine and
special-token matching differ from OpenAI's on some inputs (unicode categories, ``<|endoftext|>``
inside punctuation).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49408 - 2 * 256 - 2
_WORD_END = "</w>"
# OpenAI's word split; IGNORECASE matters even on lowercased text (it changes which unicode
# characters count as letters).
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_SPACES = regex.compile(r"\s+")
_TEXT_CACHE_SIZE = 200_000  # captions whose ids are kept (~100 MB at most)


def _byte_chars() -> list[str]:
    """GPT-2's reversible map from each byte (the index) to a printable character."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}  # ! to ~, ¡ to ¬, ® to ÿ
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _rows(ids: np.ndarray | Sequence[Sequence[int]] | Sequence[int]) -> list[Sequence[int]]:
    """The rows of ``[B, T]`` ids (lists may be ragged), or ``[T]`` as one row."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids if ids and isinstance(ids[0], list | tuple) else [ids]


def _find_vocab() -> Path:
    for package in ("open_clip", "clip"):
        # find_spec locates the package without importing it (clip's __init__ needs torchvision).
        spec = importlib.util.find_spec(package)
        for location in (spec and spec.submodule_search_locations) or ():
            if (path := Path(location) / VOCAB_FILE).is_file():
                return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary {VOCAB_FILE} was not found in an installed open_clip or clip "
        "package; run `pip install --no-deps openai-clip==1.0.1` or pass vocab_path"
    )


class ClipTokenizer:
    """OpenAI CLIP's tokenizer: 49,408 ids, SOT 49406, EOT 49407, padding 0."""

    def __init__(self, vocab_path: str | Path | None = None):
        path = Path(vocab_path) if vocab_path is not None else _find_vocab()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]  # line 0: a header
        if len(merges) != _N_MERGES:
            raise ValueError(f"{path} has {len(merges)} merges; CLIP's vocabulary has {_N_MERGES}")
        self._byte_chars = _byte_chars()
        # The 256 byte characters in code-point order, then each with </w>, then one per merge.
        units = sorted(self._byte_chars)
        tokens = [*units, *(u + _WORD_END for u in units), *("".join(m) for m in merges), SOT, EOT]
        self._bpe = models.BPE(
            {t: i for i, t in enumerate(tokens)}, merges, end_of_word_suffix=_WORD_END
        )
        self.vocab_size = len(tokens)
        self.sot_token, self.eot_token = self.vocab_size - 2, self.vocab_size - 1
        char_to_byte = {c: b for b, c in enumerate(self._byte_chars)}
        self._token_bytes = [
            bytes(char_to_byte[c] for c in t.removesuffix(_WORD_END))
            + (b" " if t.endswith(_WORD_END) else b"")
            for t in tokens[:-2]
        ]
        # Words and captions recur, so most lookups skip the merges and ftfy's text repair
        # (dicts, not lru_cache, so the tokenizer pickles).
        self._cache: dict[str, tuple[int, ...]] = {SOT: (self.sot_token,), EOT: (self.eot_token,)}
        self._text_cache: dict[str, tuple[int, ...]] = {}

    def _word_ids(self, word: str) -> tuple[int, ...]:
        if (ids := self._cache.get(word)) is None:
            chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            ids = self._cache[word] = tuple(t.id for t in self._bpe.tokenize(chars))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """The ids of ``text`` without SOT and EOT (OpenAI's ``SimpleTokenizer.encode``)."""
        if (ids := self._text_cache.get(text)) is None:
            clean = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
            clean = _SPACES.sub(" ", clean).strip().lower()
            ids = tuple(i for word in _WORDS.findall(clean) for i in self._word_ids(word))
            if len(self._text_cache) < _TEXT_CACHE_SIZE:  # bounded: web captions rarely recur
                self._text_cache[text] = ids
        return list(ids)

    def encode(
        self, texts: str | Sequence[str], *, context_length: int = 77, truncate: bool = False
    ) -> np.ndarray:
        """int32 ``[B, context_length]``: SOT, the text's ids, EOT, then zeros.

        Text longer than ``context_length`` raises ``ValueError`` unless ``truncate``, which keeps
        the first ``context_length`` ids and ends them with EOT (as ``clip.tokenize`` does).
        """
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot_token, *self.tokenize(text), self.eot_token]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {text[:40]!r}... is {len(ids)} tokens with SOT and EOT, longer than "
                        f"context_length {context_length}; pass truncate=True to cut it"
                    )
                ids = [*ids[: context_length - 1], self.eot_token]
            row[: len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]] | Sequence[int]) -> list[str]:
        """The text of each row of ``ids`` ``[B, T]`` (or one row ``[T]``), read up to its first
        EOT, without SOT; words are joined by single spaces."""
        texts = []
        for row in _rows(ids):
            if self.eot_token in row:
                row = row[: row.index(self.eot_token)]
            data = b"".join(self._token_bytes[i] for i in row if i != self.sot_token)
            texts.append(data.decode("utf-8", errors="replace").strip())
        return texts


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def train_bpe(
    texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> BPETokenizer:
    """A byte-level BPE learnt from ``texts``; the same texts give the same tokenizer.

    Args:
      texts: the training corpus.
      vocab_size: total ids, special tokens and the 256 bytes included (fewer only when the
        corpus runs out of pairs to merge).
      special_tokens: pad, BOS and EOS (ids 0, 1, 2), then any extra reserved tokens.
    """
    if len(special_tokens) < 3:
        raise ValueError(f"special_tokens must start with pad, BOS and EOS; got {special_tokens}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + the special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # All 256 bytes, so any text round-trips exactly, seen in training or not.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)


class BPETokenizer:
    """A byte-level BPE whose first three special tokens are pad, BOS and EOS."""

    def __init__(self, tokenizer: Tokenizer):
        special = sorted(tokenizer.get_added_tokens_decoder())
        if len(special) < 3:
            raise ValueError("the tokenizer needs pad, BOS and EOS as its first special tokens")
        self.pad_id, self.bos_id, self.eos_id = special[:3]
        # A literal "<pad>" in the text is encoded as text, so every text round-trips.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer

    # Pickled as JSON: the encode_special_tokens flag does not survive HF's own pickling.
    def __getstate__(self) -> str:
        return self._tokenizer.to_str()

    def __setstate__(self, state: str) -> None:
        self.__init__(Tokenizer.from_str(state))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> None:
        """Writes the tokenizer as HF ``tokenizers`` JSON."""
        self._tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text, without special tokens or padding."""
        # One call per text: the *_batch calls start a thread pool that misbehaves in forked
        # data workers.
        return [self._tokenizer.encode(t, add_special_tokens=False).ids for t in texts]

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        length: int,
        bos: bool = False,
        eos: bool = False,
        truncate: bool = False,
    ) -> np.ndarray:
        """int32 ``[B, length]``: optional BOS, the text's ids, optional EOS, then pad ids.

        Text longer than ``length`` raises ``ValueError`` unless ``truncate``, which keeps the
        first ``length`` ids (the last one EOS when ``eos``).
        """
        texts = [texts] if isinstance(texts, str) else texts
        out = np.full((len(texts), length), self.pad_id, np.int32)
        for row, text, ids in zip(out, texts, self.tokenize(texts), strict=True):
            ids = [self.bos_id] * bos + ids + [self.eos_id] * eos
            if len(ids) > length:
                if not truncate:
                    raise ValueError(
                        f"text {text[:40]!r}... is {len(ids)} tokens, longer than length "
                        f"{length}; pass truncate=True to cut it"
                    )
                ids = ids[: length - 1] + [self.eos_id if eos else ids[length - 1]]
            row[: len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]] | Sequence[int]) -> list[str]:
        """The text of each row of ``ids`` ``[B, T]`` (or one row ``[T]``), read up to its first
        EOS, without pad, BOS or other special tokens."""
        rows = [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in _rows(ids)]
        return [self._tokenizer.decode(row, skip_special_tokens=True) for row in rows]


GPT2_EOS = "<|endoftext|>"
GPT2_FILES = ("vocab.json", "merges.txt")


class Gpt2Tokenizer:
    """GPT-2's byte-level BPE (Radford et al. 2019) from the files a Hugging Face GPT-2 folder
    holds: ``tokenizer.json``, or ``vocab.json`` with ``merges.txt``. ``<|endoftext|>`` is EOS
    (and the padding: padded positions are masked)."""

    def __init__(self, tokenizer: Tokenizer):
        eos = tokenizer.token_to_id(GPT2_EOS)
        if eos is None:
            raise ValueError(f"the GPT-2 vocabulary has no {GPT2_EOS} token")
        self.eos_id = self.pad_id = eos
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: str | Path) -> Gpt2Tokenizer:
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
        vocab, merges = (folder / name for name in GPT2_FILES)
        if not (vocab.is_file() and merges.is_file()):
            raise FileNotFoundError(
                f"no GPT-2 tokenizer in {folder}: it needs tokenizer.json, or vocab.json and "
                "merges.txt (a Hugging Face GPT-2 folder has them)"
            )
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([GPT2_EOS])
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, folder: str | Path) -> None:
        """Writes ``folder/tokenizer.json`` (HF ``tokenizers`` JSON), which
        :meth:`from_folder` reads."""
        self._tokenizer.save(str(Path(folder) / "tokenizer.json"))

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first EOS."""
        ids = list(ids)
        return self._tokenizer.decode(ids[: ids.index(self.eos_id)] if self.eos_id in ids else ids)
