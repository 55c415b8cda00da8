"""Issue #18 item 9: property-based tests. Random bytes as images, random JSON lines for
``prepare``, random tar member names and orders for the loader: nothing crashes, and every
sample either comes out or is counted.

The default suite runs ``DEFAULT_CASES`` cases per property; ``make test-slow`` runs
``SLOW_CASES`` (the ``slow`` marker)."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diva_lightning.data import DualFlowDataModule
from diva_lightning.data.decode import SampleDecoder, SkipSample
from diva_lightning.data.prepare import prepare
from tests.data_helpers import encode, rgb

DEFAULT_CASES, SLOW_CASES = 100, 4000
PNG = encode(rgb(12))


def fuzz(cases: int):
    return settings(max_examples=cases, deadline=None, derandomize=cases == DEFAULT_CASES,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


# ---- random bytes as images --------------------------------------------------------------------
@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a real PNG with a few bytes changed, cut or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(PNG)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=20))


def check_image_bytes(data: bytes) -> None:
    decoder = SampleDecoder(image_size=8, grid=(2, 2), min_image_side=1)
    try:
        out = decoder({"__key__": "k", "png": data, "txt": b"a caption."})
    except SkipSample:
        return
    assert tuple(out["pixels"].shape) == (3, 8, 8)


@fuzz(DEFAULT_CASES)
@given(image_bytes())
def test_random_image_bytes_decode_or_are_skipped(data):
    check_image_bytes(data)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@fuzz(SLOW_CASES)
@given(image_bytes())
def test_random_image_bytes_decode_or_are_skipped_many(data):
    check_image_bytes(data)


# ---- random JSON lines for prepare -------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
LINE_TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
                    max_size=40)  # fmt: skip


@st.composite
def jsonl_line(draw) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a well-formed pair, maybe of a missing or broken image
        image = draw(st.sampled_from(["a.png", "broken.png", "missing.png", "", "sub"]))
        return json.dumps({"image": image, "caption": draw(LINE_TEXT)})
    if kind == 1:  # the right keys, any values
        return json.dumps({"image": draw(JSON), "caption": draw(JSON)})
    if kind == 2:
        return json.dumps(draw(JSON))
    return draw(LINE_TEXT)  # not JSON at all, most of the time


def check_jsonl(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "a.png").write_bytes(PNG)
        (root / "broken.png").write_bytes(PNG[:40])
        (root / "sub").mkdir()
        (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            summary = prepare(out=str(root / "out"), captions=str(root / "pairs.jsonl"), quiet=True)
        except ValueError as error:  # nothing usable: an error, with the summary saying why
            assert "no sample written" in str(error)
            summary = json.loads((root / "out" / "summary.json").read_text())
            assert summary["written"] == 0
        rows = sum(1 for line in lines if line.strip())
        assert summary["written"] + summary["skipped_total"] == rows
        assert sum(s["count"] for s in summary["shards"]) == summary["written"]


@fuzz(DEFAULT_CASES)
@given(st.lists(jsonl_line(), min_size=1, max_size=6))
def test_random_json_lines_are_written_or_counted(lines):
    check_jsonl(lines)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@fuzz(SLOW_CASES)
@given(st.lists(jsonl_line(), min_size=1, max_size=6))
def test_random_json_lines_are_written_or_counted_many(lines):
    check_jsonl(lines)


# ---- random tar member names and orders for the loader -----------------------------------------
MEMBER = st.tuples(
    st.sampled_from(["s0", "s1", "s2", "x.y", "dir/s0", ""]),  # the key part
    st.sampled_from(["png", "txt", "json", "jpg", "b.png", "codes.npy", "", "TXT"]),
    st.sampled_from([PNG, b"a red square.", b"", b"\xff\xfe", b'{"caption": 3}', PNG[:30]]),
)


def write_members(path: Path, members) -> list[str]:
    """A tar of the members in this order -> the sample keys WebDataset groups them into."""
    groups, previous = [], None
    with tarfile.open(path, "w") as tar:
        for stem, ext, data in members:
            name = f"{stem}.{ext}" if ext else stem
            info = tarfile.TarInfo(name or "noname")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            key = name.split(".")[0] if "." in name and not name.startswith(".") else None
            if key is not None and key != previous:  # an unnamed member is an event
                groups.append(key)
            previous = key if key is not None else previous
    return groups


def check_tar(members) -> None:
    with tempfile.TemporaryDirectory() as root:
        shard = Path(root) / "fuzz.tar"
        groups = write_members(shard, members)
        dm = DualFlowDataModule(str(shard), str(shard), image_size=8, image_grid=(2, 2),
                                batch_size=2, max_skip_fraction=1.0, min_image_side=1,
                                num_workers=0)  # fmt: skip
        dm.setup("fit")
        keys = [k for batch in dm.make_loader("val", 0, 1) for k in batch.keys]
        counter = dm.skips["val"]
        assert counter.read == len(keys) and set(keys) <= set(groups)
        if counter.events == 0:  # every group of members came out or was counted lost
            assert len(keys) + counter.lost == len(groups)


@fuzz(DEFAULT_CASES)
@given(st.lists(MEMBER, max_size=8))
def test_random_tar_members_come_out_or_are_counted(members):
    check_tar(members)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@fuzz(SLOW_CASES)
@given(st.lists(MEMBER, max_size=8))
def test_random_tar_members_come_out_or_are_counted_many(members):
    check_tar(members)
