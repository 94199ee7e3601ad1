"""CLIP embeddings as clip-retrieval writes them (``clip-retrieval inference --output_folder
DIR``), as random-access sources: the unCLIP prior's data, and the decoder's images joined to
their image embeddings by key.

The folder holds, per shard ``i`` (numbered as clip-retrieval numbers them, zero-padded or not):
``img_emb/img_emb_{i}.npy`` (float16 [n, d], unit norm), ``text_emb/text_emb_{i}.npy`` (the
captions', the same shape) and ``metadata/metadata_{i}.parquet`` (``caption`` and
``image_path``, which for a WebDataset input is the sample's key, and ``key`` with
``--enable_metadata``); row j of the three files is one sample. Paths are local or any
``etils.epath`` URL (``gs://...``).

Embeddings are read row by row: an ``.npy`` file's header gives its shape and dtype, and a row is
the bytes at its offset, so no process loads a whole file. The metadata's caption and key columns
are held in memory as Arrow arrays (about the captions' bytes: ~6 GB per 100M samples), since a
parquet file reads no faster one row than one row group. A row without a caption is left out at
indexing and counted (``skipped_at_index``); a missing, unreadable or truncated file, or shards
whose row counts or widths disagree, is an error naming the shard.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from etils import epath

from jaxaigc.data.shards import WebDataset

FOLDERS = (("img_emb", "img_emb_", ".npy"), ("text_emb", "text_emb_", ".npy"),
           ("metadata", "metadata_", ".parquet"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NpyRows:
    """Where the rows of a 2-D C-order ``.npy`` file are: ``offset`` bytes of header, then
    ``rows`` rows of ``width`` values of ``dtype``."""

    path: epath.Path
    offset: int
    rows: int
    width: int
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize


def npy_rows(path: epath.Path) -> NpyRows:
    """The layout of the ``.npy`` file ``path`` from its header; a file that is not a 2-D
    C-order float array, or is shorter than its header says, is an error naming it."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}  # fmt: skip
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
            shape, fortran_order, dtype = readers[version](f)
            offset = f.tell()
            size = f.seek(0, io.SEEK_END)
    except (OSError, ValueError) as error:
        raise OSError(f"{path} cannot be read as a .npy file: {error}") from error
    if len(shape) != 2 or fortran_order or dtype.kind != "f":
        raise ValueError(
            f"{path} holds a {dtype} array of shape {shape}"
            f"{' in Fortran order' if fortran_order else ''}: embeddings are float [n, width], "
            "C order, as clip-retrieval writes them"
        )
    layout = NpyRows(path, offset, shape[0], shape[1], dtype)
    if size < offset + layout.rows * layout.row_bytes:
        raise OSError(
            f"{path} is truncated: {size} bytes, its header says {layout.rows} rows of "
            f"{layout.row_bytes} bytes after {offset}"
        )
    return layout


def _shard_names(folder: epath.Path) -> list[str]:
    """The shard numbers of ``folder``'s ``img_emb`` files, as written, in numeric order."""
    directory, prefix, suffix = FOLDERS[0]
    found = list((folder / directory).glob(f"{prefix}*{suffix}"))
    names = [p.name[len(prefix) : -len(suffix)] for p in found]
    names = [n for n in names if n.isdigit()]
    if not names:
        raise FileNotFoundError(
            f"{folder / directory} holds no {prefix}N{suffix}: give the output folder of "
            "`clip-retrieval inference` (img_emb/, text_emb/, metadata/)"
        )
    return sorted(names, key=int)


def _metadata(path: epath.Path) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The ``caption`` and key column (``key``, else ``image_path``) of a metadata file."""
    try:
        with path.open("rb") as f:
            columns = pq.read_schema(f).names
            key = next((c for c in ("key", "image_path") if c in columns), None)
            if "caption" not in columns or key is None:
                raise ValueError(
                    f"{path} has columns {columns}; it needs caption and key or image_path "
                    "(run clip-retrieval with --enable_text, the default)"
                )
            f.seek(0)
            table = pq.read_table(f, columns=["caption", key])
    except (OSError, pa.ArrowException) as error:
        raise OSError(f"{path} cannot be read as a parquet file: {error}") from error
    return table.column("caption").cast(pa.string()), table.column(key).cast(pa.string())


class ClipEmbeddings:
    """The samples of clip-retrieval output folders (one, or several comma-separated), in shard
    then row order: ``{"image_embedding": float32 [d], "text_embedding": float32 [d], "caption":
    str, "key": str}``."""

    def __init__(self, folders: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(folders, str):
            folders = [f for f in folders.split(",") if f]
        elif isinstance(folders, os.PathLike):
            folders = [folders]
        self.folders = [epath.Path(f) for f in folders]
        if not self.folders:
            raise ValueError("no embeddings folder given")
        self.shards: list[tuple[NpyRows, NpyRows]] = []
        self._captions: list[pa.ChunkedArray] = []
        self._keys: list[pa.ChunkedArray] = []
        self._rows: list[np.ndarray] = []  # per shard, the rows with a caption
        self.skipped_at_index = 0  # rows without a caption
        for folder in self.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"no such embeddings folder: {folder}")
            for name in _shard_names(folder):
                paths = [folder / d / f"{prefix}{name}{suffix}" for d, prefix, suffix in FOLDERS]
                for path in paths:
                    if not path.exists():
                        raise FileNotFoundError(f"shard {name} of {folder}: no {path}")
                image, text = npy_rows(paths[0]), npy_rows(paths[1])
                captions, keys = _metadata(paths[2])
                counts = {image.rows, text.rows, len(captions)}
                if len(counts) != 1:
                    raise ValueError(
                        f"shard {name} of {folder}: {image.rows} image embeddings, {text.rows} "
                        f"text embeddings and {len(captions)} metadata rows; they must align"
                    )
                width = self.shards[0][0].width if self.shards else image.width
                if image.width != width or text.width != width:
                    raise ValueError(
                        f"shard {name} of {folder}: image embeddings {image.width} wide, text "
                        f"{text.width}; the first shard's are {width}"
                    )
                lengths = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0)
                rows = np.flatnonzero(lengths.to_numpy() > 0)
                self.skipped_at_index += image.rows - len(rows)
                self.shards.append((image, text))
                self._captions.append(captions)
                self._keys.append(keys)
                self._rows.append(rows)
        self._shard = np.concatenate(
            [np.full(len(rows), shard, np.int32) for shard, rows in enumerate(self._rows)]
        )
        self._row = np.concatenate(self._rows)
        if not len(self._row):
            raise ValueError(
                f"{', '.join(map(str, self.folders))}: no sample has a caption "
                f"({self.skipped_at_index} rows without one)"
            )
        self._handles: dict[str, Any] = {}

    @property
    def width(self) -> int:
        """The embeddings' width, d."""
        return self.shards[0][0].width

    def __len__(self) -> int:
        return len(self._row)

    def keys(self) -> np.ndarray:
        """Every sample's key, str [n], in record order."""
        return np.concatenate(
            [keys.to_numpy()[rows] for keys, rows in zip(self._keys, self._rows, strict=True)]
        ).astype(str)

    def _read(self, layout: NpyRows, row: int) -> np.ndarray:
        key = str(layout.path)
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = layout.path.open("rb")
        handle.seek(layout.offset + row * layout.row_bytes)
        return np.frombuffer(handle.read(layout.row_bytes), layout.dtype).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = int(self._shard[index]), int(self._row[index])
        image, text = self.shards[shard]
        return {
            "image_embedding": self._read(image, row),
            "text_embedding": self._read(text, row),
            "caption": self._captions[shard][row].as_py().strip(),
            "key": self._keys[shard][row].as_py(),
        }

    # The open files stay with the process that opened them (grain workers fork).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __repr__(self) -> str:
        return (
            f"ClipEmbeddings({len(self.shards)} shards, {len(self)} samples, width "
            f"{self.width}, first {self.shards[0][0].path})"
        )


class EmbeddedImages:
    """The images of WebDataset shards joined by key to their CLIP image embeddings, in the
    shards' order: ``{"image": uint8 [h, w, 3], "caption": str, "image_embedding": float32
    [d]}``. An image whose key has no embedding is left out at indexing and counted
    (``skipped_at_index``); a key with two embeddings is an error."""

    def __init__(self, images: WebDataset, embeddings: ClipEmbeddings):
        self.images, self.embeddings = images, embeddings
        keys = embeddings.keys()
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            raise ValueError(
                f"key {str(repeated[0])!r} has several embeddings in {embeddings!r}: the join "
                "by key needs unique keys"
            )
        image_keys = np.asarray([entry[1] for entry in images.index], dtype=str)
        at = np.minimum(np.searchsorted(ordered, image_keys), len(ordered) - 1)
        found = ordered[at] == image_keys
        self._image = np.flatnonzero(found)
        self._embedding = order[at[found]]
        self.skipped_at_index = int((~found).sum())  # images without an embedding

    def __len__(self) -> int:
        return len(self._image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[int(self._image[index])]
        embedding = self.embeddings[int(self._embedding[index])]
        return {
            "image": record["image"],
            "caption": record["caption"],
            "image_embedding": embedding["image_embedding"],
        }

    def __repr__(self) -> str:
        return f"EmbeddedImages({self.images!r}, {self.embeddings!r}, {len(self)} joined)"
