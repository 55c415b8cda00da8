"""Inputs of ``diva-cli prepare``: image folders with captions, or the synthetic shapes world.

Caption sources for a folder of images:

* sidecar text files: ``cat.jpg`` + ``cat.txt`` next to it (every image file under the folder,
  recursively, sorted by path);
* a JSONL file, one object per line with the image path (``image`` / ``path`` / ``file_name`` /
  ``filename`` / ``file``) and the caption (``caption`` / ``text`` / ``txt``);
* a CSV file with a header naming the same columns (else: first column path, second caption).

Relative paths in JSONL/CSV are relative to the image folder (default: the file's folder).
Problems are not raised: an item carries ``skip = (reason, cause)`` and ``prepare`` counts it;
a JSONL/CSV row is named by its ``file:line`` (and image path) in every skip and in the
shards' ``json`` metadata; a broken link or a folder named like an image is a counted skip. A field that is not a string (a number, list or
object in JSON) is a ``bad_field`` skip. A UTF-8 byte-order mark at the start of a file is
dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from diva_lightning.data.decode import IMAGE_KEYS, SkipSample, decode_caption
from diva_lightning.data.shapes import ShapesWorld

PATH_FIELDS = ("image", "path", "file_name", "filename", "file")
CAPTION_FIELDS = ("caption", "text", "txt")


@dataclass
class SourceItem:
    """One input pair. ``image`` holds bytes (synthetic) or is read from ``path`` later."""

    name: str  # shown in the summary (relative path or "synthetic/<index>")
    caption: str | None = None
    path: Path | None = None
    image: bytes | None = None
    meta: dict = field(default_factory=dict)
    skip: tuple[str, str] | None = None  # (reason, cause)


def _caption(text: str | None, source: str) -> tuple[str | None, tuple[str, str] | None]:
    """Normalise a caption read as text with ``surrogateescape`` (bad bytes -> surrogates)."""
    if text is None:
        return None, ("missing_caption", "no caption given")
    try:
        raw = text.encode("utf-8", errors="surrogateescape")
        return decode_caption({"txt": raw}, source=source), None
    except SkipSample as skip:
        return None, (skip.reason, skip.cause)


def sidecar_items(folder: Path) -> Iterator[SourceItem]:
    """Every image file under ``folder`` with its ``.txt`` sidecar."""
    suffixes = {f".{ext}" for ext in IMAGE_KEYS}
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    for path in paths:
        name, sidecar = str(path.relative_to(folder)), path.with_suffix(".txt")
        if not path.is_file():  # a broken link or a folder named like an image: counted
            what = (
                "a folder"
                if path.is_dir()
                else "a broken symbolic link"
                if path.is_symlink()
                else "not a file"
            )
            yield SourceItem(name, path=path, skip=("missing_image", f"{name} is {what}"))
            continue
        if not sidecar.is_file():
            yield SourceItem(name, path=path, skip=("missing_caption", f"no {sidecar.name}"))
            continue
        try:
            caption = decode_caption({"txt": sidecar.read_bytes()}, source=f"{sidecar.name}")
        except SkipSample as skip:
            yield SourceItem(name, path=path, skip=(skip.reason, skip.cause))
            continue
        yield SourceItem(name, caption, path=path)


def _pick(row: dict, names: tuple[str, ...]) -> str | None:
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def _not_text(what: str, value) -> tuple[str, str] | None:
    """A skip for a JSON field that is not a string (a number, list, object, bool)."""
    if value is None or isinstance(value, str):
        return None
    return ("bad_field", f"the {what} is a {type(value).__name__} ({str(value)[:40]!r}), not text")


def _table_item(folder: Path, where: str, path, text) -> SourceItem:
    """One JSONL/CSV row; ``where`` (``file:line``) names it in every skip about the row."""
    wrong = _not_text("image path", path) or _not_text("caption", text)
    if wrong:
        return SourceItem(where, skip=wrong)
    if not path:
        return SourceItem(where, skip=("missing_image", "no image path"))
    caption, skip = _caption(text, f"the caption at {where}")
    return SourceItem(
        where if skip else f"{where} ({path})", caption, path=folder / path, skip=skip
    )


def jsonl_items(file: Path, folder: Path) -> Iterator[SourceItem]:
    """One item per non-empty line of a JSONL file."""
    # utf-8-sig: a byte-order mark is not part of the first line
    with open(file, encoding="utf-8-sig", errors="surrogateescape") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{file.name}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exn:
                yield SourceItem(where, skip=("bad_json", str(exn)))
                continue
            row = row if isinstance(row, dict) else {}
            yield _table_item(folder, where, _pick(row, PATH_FIELDS), _pick(row, CAPTION_FIELDS))


def csv_items(file: Path, folder: Path) -> Iterator[SourceItem]:
    """One item per data row of a CSV file (header optional, see the module docstring)."""
    text = file.read_text(encoding="utf-8-sig", errors="surrogateescape")
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    named = any(h in PATH_FIELDS for h in header)
    path_col = next((header.index(h) for h in PATH_FIELDS if h in header), 0)
    caption_col = next((header.index(h) for h in CAPTION_FIELDS if h in header), 1)
    for number, row in enumerate(rows[1:] if named else rows, 2 if named else 1):
        if not any(cell.strip() for cell in row):
            continue
        cell = lambda i, r=row: r[i] if i < len(r) else None  # noqa: E731
        yield _table_item(folder, f"{file.name}:{number}", cell(path_col), cell(caption_col))


def folder_items(images: str | Path, captions: str | Path | None) -> Iterator[SourceItem]:
    """Dispatch on the caption source (None: sidecar ``.txt``; ``.jsonl``; ``.csv``)."""
    folder = Path(images) if images is not None else None
    if captions is None:
        if folder is None or not folder.is_dir():
            raise FileNotFoundError(f"prepare: image folder '{images}' does not exist")
        return sidecar_items(folder)
    file = Path(captions)
    if not file.is_file():
        raise FileNotFoundError(f"prepare: caption file '{captions}' does not exist")
    folder = folder or file.parent
    if file.suffix.lower() == ".jsonl":
        return jsonl_items(file, folder)
    if file.suffix.lower() == ".csv":
        return csv_items(file, folder)
    raise ValueError(f"prepare: captions must be a .jsonl or .csv file, got '{captions}'")


def synthetic_items(
    count: int, world: ShapesWorld, image_format: str, indices: list[int] | None = None
) -> Iterator[SourceItem]:
    """``count`` shapes-world samples (or those of ``indices``), encoded as PNG (exact pixels)
    or JPEG."""
    for index in range(count) if indices is None else indices:
        image, caption, meta = world.sample(index)
        buffer = io.BytesIO()
        if image_format == "jpg":
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG")
        yield SourceItem(f"synthetic/{index}", caption, image=buffer.getvalue(), meta=meta)
