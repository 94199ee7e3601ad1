"""Your own image-caption data as random-access sources: WebDataset tar shards as img2dataset
writes them, a folder of images with a captions CSV or JSONL, and any prepared TFDS dataset by
name (``coco_captions``) with its image and caption keys.

Records are ``{"image": uint8 [h, w, 3], "caption": str}`` (a WebDataset's also ``"json"``,
the text of its ``{key}.json``, "" where there is none: one structure batches), like the
embedded sources, so the recipes' transforms and :class:`jaxaigc.data.pipeline.BatchIterator`'s
global order, process sharding and resumption apply unchanged. Paths are local or any
``etils.epath`` URL (``gs://...`` on a pod); a pattern may use a glob (``*``) or img2dataset's
brace range (``{00000..00099}.tar``).

A shard is indexed once (its tar headers: each member's offset and size) and a record reads its
bytes at those offsets, so a process reads only the records its rows need. A key without a
caption is left out at indexing and counted (``skipped_at_index``); an image that does not
decode raises :class:`CorruptRecord`, which the batch iterator skips and counts. A missing or
unreadable shard is an error naming it.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from jaxaigc.data.pipeline import CorruptRecord

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand(patterns: str | Sequence[str]) -> list[epath.Path]:
    """Paths of ``patterns`` (comma-separated in a string): brace ranges ``{000..009}`` and
    globs expanded, sorted within each pattern. No match is an error naming the pattern."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    paths = []
    for pattern in patterns:
        found = []
        for name in _braces(pattern):
            path = epath.Path(name)
            if any(c in path.name for c in "*?["):
                found.extend(sorted(path.parent.glob(path.name)))
            elif path.exists():
                found.append(path)
            else:
                raise FileNotFoundError(f"no such shard or file: {path}")
        if not found:
            raise FileNotFoundError(f"{pattern!r} matches no file")
        paths.extend(found)
    return paths


def _braces(pattern: str) -> list[str]:
    """img2dataset's ``{00000..00012}`` range, zero-padded as written; other text unchanged."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.groups()
    width = len(first)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        name
        for i in range(int(first), int(last) + 1)
        for name in _braces(f"{head}{i:0{width}d}{tail}")
    ]


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Image file bytes -> uint8 [h, w, 3] (RGB); undecodable bytes raise :class:`CorruptRecord`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise CorruptRecord(f"{where}: the image does not decode ({error})") from error


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise CorruptRecord(f"{where}: the caption is not UTF-8 ({error})") from error


class WebDataset:
    """The (image, caption) samples of WebDataset tar shards: ``{key}.jpg|jpeg|png|webp`` with
    ``{key}.txt`` and an optional ``{key}.json``, in shard then member order."""

    def __init__(self, patterns: str | Sequence[str]):
        self.paths = expand(patterns)
        self.index: list[tuple[int, str, tuple[int, int], tuple[int, int], tuple | None]] = []
        self.skipped_at_index = 0  # keys without a caption or an image
        for shard, path in enumerate(self.paths):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        name = info.name.rsplit("/", 1)[-1]
                        directory = info.name[: len(info.name) - len(name)]
                        key, _, extension = name.partition(".")
                        members.setdefault(directory + key, {})[extension.lower()] = (
                            info.offset_data,
                            info.size,
                        )
            except (OSError, tarfile.TarError) as error:
                raise OSError(f"shard {path} cannot be read as a tar file: {error}") from error
            for key, files in members.items():
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                if image is None or "txt" not in files:
                    self.skipped_at_index += 1
                    continue
                self.index.append((shard, key, image, files["txt"], files.get("json")))
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, shard: int, span: tuple[int, int]) -> bytes:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = self.paths[shard].open("rb")
        handle.seek(span[0])
        return handle.read(span[1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, key, image, text, meta = self.index[index]
        where = f"{self.paths[shard]}:{key}"
        return {
            "image": decode_image(self._read(shard, image), where),
            "caption": decode_text(self._read(shard, text), where),
            "json": "" if meta is None else decode_text(self._read(shard, meta), where),
        }

    # The open files stay with the process that opened them (grain workers fork).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __repr__(self) -> str:
        return f"WebDataset({len(self.paths)} shards, {len(self)} samples, first {self.paths[0]})"


class CaptionedFolder:
    """Images with their captions listed in a CSV (columns ``image``/``file_name`` and
    ``caption``/``text``) or JSONL file; image paths are relative to the list's folder."""

    IMAGE_COLUMNS, CAPTION_COLUMNS = ("image", "file_name", "filepath", "path"), ("caption", "text")

    def __init__(self, captions_file: str):
        self.path = epath.Path(captions_file)
        if not self.path.exists():
            raise FileNotFoundError(f"no such captions file: {self.path}")
        rows = self._rows()
        if not rows:
            raise ValueError(f"{self.path} lists no image")
        columns = set(rows[0])
        image = next((c for c in self.IMAGE_COLUMNS if c in columns), None)
        caption = next((c for c in self.CAPTION_COLUMNS if c in columns), None)
        if image is None or caption is None:
            raise ValueError(
                f"{self.path} needs an image column ({', '.join(self.IMAGE_COLUMNS)}) and a "
                f"caption column ({', '.join(self.CAPTION_COLUMNS)}); it has {sorted(columns)}"
            )
        self.items = []
        self.skipped_at_index = 0  # rows without an image path or a caption
        for row in rows:
            if row.get(image) and row.get(caption):
                self.items.append((str(row[image]), str(row[caption]).strip()))
            else:
                self.skipped_at_index += 1

    def _rows(self) -> list[dict]:
        text = self.path.read_text()
        if self.path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{self.path}:{number} is not JSON: {error}") from error
            return rows
        return list(csv.DictReader(io.StringIO(text)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, caption = self.items[index]
        path = self.path.parent / name
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CorruptRecord(f"{path}: cannot be read ({error})") from error
        return {"image": decode_image(data, str(path)), "caption": caption}

    def __repr__(self) -> str:
        return f"CaptionedFolder({self.path}, {len(self)} images)"


class TfdsCaptions:
    """A split of a TFDS dataset prepared in the ``array_record`` format, read by name:
    ``image_key`` and ``caption_key`` name its features, nested ones with ``/``
    (``captions/text``); of a list of captions the first is taken. Nothing is downloaded: a
    dataset not yet prepared in ``data_dir`` is an error saying how to prepare it."""

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        image_key: str = "image",
        caption_key: str = "caption",
        data_dir: str | None = None,
    ):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            self._records = builder.as_data_source(split)
        except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
                f"{data_dir or 'the default data_dir'}: prepare it once with `tfds build {name} "
                f"--file_format=array_record --data_dir=DIR` and pass that data_dir "
                f"({str(e).splitlines()[0]})"
            ) from e
        features = builder.info.features
        for key in (image_key, caption_key):
            try:
                _lookup(features, key)
            except KeyError as error:
                raise ValueError(
                    f"TFDS dataset {name!r} has no feature {key!r}; its features: "
                    f"{sorted(features.keys())}"
                ) from error
        self.name, self.split = builder.info.full_name, split
        self.image_key, self.caption_key = image_key, caption_key

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        where = f"{self.name}:{self.split}[{index}]"
        image = np.asarray(_lookup(record, self.image_key))
        if image.ndim == 2 or image.shape[-1] == 1:  # greyscale
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
        caption = _lookup(record, self.caption_key)
        if isinstance(caption, np.ndarray | list | tuple):
            if len(caption) == 0:
                raise CorruptRecord(f"{where}: no caption")
            caption = caption[0]
        caption = decode_text(caption, where) if isinstance(caption, bytes) else str(caption)
        if not caption:
            raise CorruptRecord(f"{where}: an empty caption")
        return {"image": image.astype(np.uint8), "caption": caption}

    def __repr__(self) -> str:
        return (
            f"TfdsCaptions({self.name}:{self.split}, {self.image_key}, {self.caption_key}, "
            f"n={len(self)})"
        )


def _lookup(tree: Any, key: str) -> Any:
    """``tree["a"]["b"]`` for ``key`` "a/b"."""
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _tfds(where: str) -> TfdsCaptions:
    """``NAME[/CONFIG][:SPLIT][?image=KEY&caption=KEY&data_dir=DIR]``."""
    location, _, query = where.partition("?")
    name, _, split = location.partition(":")
    options = dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))
    unknown = set(options) - {"image", "caption", "data_dir"}
    if unknown:
        known = "image, caption, data_dir"
        raise ValueError(f"tfds:{where}: unknown option(s) {sorted(unknown)}; known: {known}")
    return TfdsCaptions(
        name,
        split=split or "train",
        image_key=options.get("image", "image"),
        caption_key=options.get("caption", "caption"),
        data_dir=options.get("data_dir"),
    )


def head(source: Any, n: int, operations: Sequence[Any] = ()) -> tuple[list[dict], int]:
    """The first ``n`` readable records of ``source`` in key order, each through ``operations``
    (deterministic grain Maps), and how many corrupt ones were passed over: held-out pairs
    for an evaluation."""
    records, skipped = [], 0
    for key in range(len(source)):
        if len(records) == n:
            break
        try:
            record = source[key]
        except CorruptRecord:
            skipped += 1
            continue
        for op in operations:
            record = op.map(record)
        records.append(record)
    return records, skipped


def image_text_source(spec: str):
    """A source from a spec: ``webdataset:PATTERNS``, ``folder:CAPTIONS.csv|jsonl`` or
    ``tfds:NAME[/CONFIG][:SPLIT][?image=KEY&caption=KEY&data_dir=DIR]``."""
    kind, _, where = spec.partition(":")
    if kind == "webdataset" and where:
        return WebDataset(where)
    if kind == "folder" and where:
        return CaptionedFolder(where)
    if kind == "tfds" and where:
        return _tfds(where)
    raise ValueError(
        f"unknown data source {spec!r}: use webdataset:PATTERN (e.g. "
        "webdataset:/data/{00000..00099}.tar), folder:CAPTIONS.csv (or .jsonl) or "
        "tfds:NAME:SPLIT?caption=KEY (e.g. tfds:coco_captions/2017:train?caption=captions/text)"
    )
