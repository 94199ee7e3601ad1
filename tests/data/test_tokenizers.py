import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxaigc.data import shapes, tokenizers
from jaxaigc.data.tokenizers import BPETokenizer, ClipTokenizer, train_bpe


def _reference_tokenizer():
    """OpenAI's ``clip/simple_tokenizer.py`` loaded by path: ``import clip`` needs torchvision."""
    spec = importlib.util.find_spec("clip")
    locations = (spec and spec.submodule_search_locations) or []
    paths = [Path(p) / "simple_tokenizer.py" for p in locations]
    if not any(p.is_file() for p in paths):
        pytest.skip("openai-clip is not installed: pip install --no-deps openai-clip==1.0.1")
    path = next(p for p in paths if p.is_file())
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def _corpus() -> list[str]:
    _, captions, _ = shapes.generate(60, 32, seed=0)
    rng = np.random.default_rng(0)
    # Random code points from ASCII, Latin/Greek/Cyrillic/CJK/symbols and emoji blocks.
    blocks = [(32, 127), (0xA0, 0x3000), (0x1F300, 0x1FAFF)]
    noise = [
        "".join(chr(rng.integers(*blocks[rng.integers(3)])) for _ in range(rng.integers(1, 30)))
        for _ in range(300)
    ]
    handwritten = [
        "",
        "   ",
        "Hello, World!! It's a DOG's life; we'll see, they've gone, I'm here, you'd know.",
        "naïve café résumé — “quotes” … ½ ² Ⅻ ⓐ",
        "😀🎉👍🏽 👨‍👩‍👧 🇫🇷 flags and emoji",
        "İstanbul ǅungla Straße ﬁne ΣΊΣΥΦΟΣ",
        "日本語のテキスト、中文，한국어",
        "a&amp;amp;b &lt;3 &quot;html&quot; &#39;entities&#39; &nbsp;x",
        "3.14159 1,000,000 2024-11-27 10:30pm $5 #1 @user 50%",
        "tabs\tand\nnewlines\r\n  and   runs   of spaces",
        "<|startoftext|>special<|endoftext|> tokens !<|endoftext|>",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
        "!$%^&*()_+-=[]{}|;':,./<>?`~ ... --- !!! ???",
        "The quick brown fox jumps over the lazy dog. " * 20,
    ]
    return captions + handwritten + noise


@pytest.fixture(scope="module")
def clip_tokenizer():
    try:
        return ClipTokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_clip_ids_match_openai(clip_tokenizer):
    reference = _reference_tokenizer()
    corpus = _corpus()
    assert (clip_tokenizer.vocab_size, clip_tokenizer.sot_token, clip_tokenizer.eot_token) == (
        49408,
        49406,
        49407,
    )
    expected = [reference.encode(text) for text in corpus]
    assert [clip_tokenizer.tokenize(text) for text in corpus] == expected
    clip_tokenizer.tokenize(corpus[0]).append(0)  # the caption cache hands out copies
    assert [clip_tokenizer.tokenize(text) for text in corpus] == expected
    batch = clip_tokenizer.encode(corpus, truncate=True)
    assert batch.shape == (len(corpus), 77) and batch.dtype == np.int32
    for row, ids in zip(batch, expected, strict=True):
        full = [49406, *ids, 49407]
        n = min(len(full), 77)
        assert row[: n - 1].tolist() == full[: n - 1] and row[n - 1] == 49407
        assert not row[n:].any()


def test_clip_decode_matches_openai_and_round_trips(clip_tokenizer):
    reference = _reference_tokenizer()
    # Rows are read up to their first EOT, so text that spells out SOT or EOT is left out.
    corpus = [t for t in _corpus() if "<|" not in t]
    decoded = clip_tokenizer.decode(clip_tokenizer.encode(corpus, context_length=400))
    assert decoded == [reference.decode(reference.encode(t)).strip() for t in corpus]
    # Decoded text is normalised (clean, lowercase, spaced words) and re-encodes to the same ids.
    assert [clip_tokenizer.tokenize(t) for t in decoded] == [
        clip_tokenizer.tokenize(t) for t in corpus
    ]
    row = clip_tokenizer.encode("Hello,   World!", context_length=12)[0]
    assert row[-1] == 0 and clip_tokenizer.decode(row) == ["hello , world !"]
    unpickled = pickle.loads(pickle.dumps(clip_tokenizer))
    np.testing.assert_array_equal(unpickled.encode(corpus[:20]), clip_tokenizer.encode(corpus[:20]))


def test_clip_too_long_text_raises_or_truncates(clip_tokenizer):
    text = "a photo of a cat " * 20  # 100 words, 102 ids with SOT and EOT
    with pytest.raises(ValueError, match=r"102 tokens .* context_length 77"):
        clip_tokenizer.encode(["short", text])
    row = clip_tokenizer.encode(text, truncate=True)[0]
    assert row[-1] == 49407 and row[0] == 49406
    assert row[1:-1].tolist() == clip_tokenizer.tokenize(text)[:75]
    assert clip_tokenizer.encode(text, context_length=102).shape == (1, 102)


def test_clip_vocab_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(tokenizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps openai-clip"):
        ClipTokenizer()


def _texts() -> list[str]:
    _, captions, _ = shapes.generate(400, 32, seed=1)
    return captions + [f"{a} plus {b} is {a + b}." for a in range(40) for b in range(9)]


@pytest.fixture(scope="module")
def bpe():
    texts = _texts()
    return train_bpe(texts, vocab_size=400), texts


def test_bpe_round_trips_any_text_exactly(bpe):
    tokenizer, texts = bpe
    unseen = [
        "",
        "  leading and trailing spaces  ",
        "New\nlines\tand\r\ntabs",
        "UPPER lower MiXeD 12345",
        "naïve café 😀🎉 日本語 ΣΊΣΥΦΟΣ",
        "literal <pad> <bos> <eos> in text",
        "\x00\x01 control bytes \x7f",
    ]
    samples = texts[:50] + unseen
    ids = tokenizer.encode(samples, length=128)
    assert ids.shape == (len(samples), 128) and ids.dtype == np.int32
    assert tokenizer.decode(ids) == samples
    # Specials: BOS first, EOS after the text, pads after it.
    n = len(tokenizer.tokenize(["a small red circle"])[0])
    row = tokenizer.encode("a small red circle", length=n + 4, bos=True, eos=True)[0]
    assert row[0] == tokenizer.bos_id and row[n + 1] == tokenizer.eos_id
    assert (row[n + 2 :] == tokenizer.pad_id).all()
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.decode(row) == ["a small red circle"]
    assert tokenizer.decode(tokenizer.tokenize(samples)) == samples  # ragged rows
    # Training merged frequent words: a caption takes far fewer tokens than bytes.
    assert n < len("a small red circle") / 2


def test_bpe_too_long_text_raises_or_truncates(bpe):
    tokenizer, _ = bpe
    text = "a large blue square above a small green cross " * 10
    n = len(tokenizer.tokenize([text])[0])
    with pytest.raises(ValueError, match=rf"{n + 1} tokens, longer than length 16"):
        tokenizer.encode(text, length=16, bos=True)
    row = tokenizer.encode(text, length=16, eos=True, truncate=True)[0]
    assert row[:15].tolist() == tokenizer.tokenize([text])[0][:15]
    assert row[15] == tokenizer.eos_id
    row = tokenizer.encode(text, length=16, truncate=True)[0]
    assert row.tolist() == tokenizer.tokenize([text])[0][:16]


def test_bpe_vocab_size_and_save_load(bpe, tmp_path):
    tokenizer, texts = bpe
    assert tokenizer.vocab_size == 400
    assert train_bpe(texts, vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="below 256"):
        train_bpe(texts, vocab_size=200)
    path = tmp_path / "bpe.json"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    ids = tokenizer.encode(texts[:100] + ["literal <eos>"], length=64, bos=True, eos=True)
    np.testing.assert_array_equal(
        loaded.encode(texts[:100] + ["literal <eos>"], length=64, bos=True, eos=True), ids
    )
    assert loaded.decode(ids) == tokenizer.decode(ids)
    # Data workers receive tokenizers by pickle.
    unpickled = pickle.loads(pickle.dumps(tokenizer))
    assert unpickled.decode(unpickled.encode("literal <pad>", length=16)) == ["literal <pad>"]


def test_bpe_training_is_deterministic(bpe, tmp_path):
    tokenizer, texts = bpe
    tokenizer.save(tmp_path / "here.json")
    train_bpe(texts, vocab_size=400).save(tmp_path / "again.json")
    # A fresh process has other hash seeds (Python's and the Rust trainer's).
    code = (
        "from tests.data.test_tokenizers import _texts, train_bpe\n"
        f"train_bpe(_texts(), vocab_size=400).save({str(tmp_path / 'child.json')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    here = (tmp_path / "here.json").read_text()
    assert (tmp_path / "again.json").read_text() == here
    assert (tmp_path / "child.json").read_text() == here
