"""Issue #18: wrong data inputs that used to get through (data, `prepare`, the loader)."""

from __future__ import annotations

import json

import pytest

from diva_lightning.data.prepare import prepare
from tests.data_helpers import encode, rgb


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(encode(rgb()))
    return images


@pytest.mark.parametrize("bad", [7, 3.5, ["a", "list"], {"an": "object"}, True])
def test_jsonl_fields_that_are_not_strings_are_counted_skips_naming_the_line(folder, tmp_path, bad):
    lines = [
        {"image": "a.png", "caption": "a red square."},
        {"image": "b.png", "caption": bad},
        {"image": bad, "caption": "a blue circle."},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "shards"
    summary = prepare(out=str(out), images=str(folder), captions=str(pairs), quiet=True)
    assert summary["written"] == 1 and summary["skipped_total"] == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    examples = [e for records in summary["skipped_examples"].values() for e in records]
    assert {e["item"] for e in examples} == {"pairs.jsonl:2", "pairs.jsonl:3"}
    causes = " ".join(e["cause"] for e in examples)
    assert "caption" in causes and "image path" in causes and type(bad).__name__ in causes


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_byte_order_mark_does_not_lose_the_first_line(folder, tmp_path, kind):
    if kind == "jsonl":
        text = "\n".join(json.dumps({"image": f"{n}.png", "caption": f"a {n} square."})
                         for n in "ab")  # fmt: skip
    else:
        text = "image,caption\na.png,a a square.\nb.png,a b square.\n"
    captions = tmp_path / f"pairs.{kind}"
    captions.write_bytes(b"\xef\xbb\xbf" + text.encode())
    summary = prepare(out=str(tmp_path / "s"), images=str(folder), captions=str(captions),
                      quiet=True)  # fmt: skip
    assert summary["written"] == 2 and summary["skipped_total"] == 0


def test_an_interrupted_prepare_leaves_no_shard_that_looks_complete(tmp_path, monkeypatch):
    """Shards are written under a temporary name and renamed only when complete (item 1)."""
    import tarfile

    import diva_lightning.data.prepare as module

    real, calls = module._encode, []

    def failing(item, *args):
        calls.append(item.name)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the third shard
        return real(item, *args)

    monkeypatch.setattr(module, "_encode", failing)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        prepare(out=str(out), synthetic=12, max_count=2, quiet=True)
    complete = sorted(p.name for p in out.iterdir())
    assert complete == ["shard-000000.tar", "shard-000001.tar"]  # nothing of the third
    for name in complete:
        with tarfile.open(out / name) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == 2
    # a re-run over the interrupted one is refused (two complete shards), then replaces all
    with pytest.raises(FileExistsError):
        prepare(out=str(out), synthetic=4, max_count=2, quiet=True)
    summary = prepare(out=str(out), synthetic=4, max_count=2, quiet=True, overwrite=True)
    assert [s["name"] for s in summary["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == [*complete, "summary.json"]


def _shards_with_empty_captions(root, shards=4, per_shard=400, bad_every=14):
    from tests.data_helpers import write_tar

    image, urls = encode(rgb(8)), []
    for s in range(shards):
        samples = [
            {"__key__": f"s{s}-{i:04d}", "png": image,
             "txt": "" if i % bad_every == 0 else "a red square."}
            for i in range(per_shard)
        ]  # fmt: skip
        urls.append(str(write_tar(root / f"shard-{s}.tar", samples)))
    return urls  # 29 of 400 per shard empty: 7.25%


@pytest.mark.parametrize(("buffer", "workers"), [(0, 0), (256, 0), (256, 2), (1000, 2)])
def test_the_skipped_fraction_is_lost_over_read_whatever_the_shuffle_buffer(
    tmp_path, buffer, workers
):  # fmt: skip
    """Item 2: samples waiting in the shuffle buffers are read, not lost: 7.25% bad samples
    never trip a 10% ceiling, and the fraction is the same for any buffer and worker count."""
    from diva_lightning.data import DualFlowDataModule

    urls = _shards_with_empty_captions(tmp_path)
    dm = DualFlowDataModule(
        urls, None, image_size=8, image_grid=(2, 2), batch_size=16, num_workers=workers,
        shuffle_buffer=buffer, batches_per_epoch=40, max_skip_fraction=0.1, skip_check_after=100,
        persistent_workers=False,
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.make_loader("train", 0, 1))
    assert len(batches) == 40
    counter = dm.skips["train"]
    assert counter.lost == counter.counts["empty_caption"] and counter.events == 0
    assert 0.05 < counter.fraction < 0.095  # lost / (lost + read), read >= what was served
    assert counter.read >= counter.kept == 16 * len(batches)


def test_shard_events_are_reported_apart_from_lost_samples():
    from diva_lightning.data.skips import SkipCounter

    counter = SkipCounter()
    for _ in range(3):
        counter.add_kept()
    counter.add("duplicate_member", None, "a.tar", "duplicate file name")
    counter.add("bad_tar", None, "b.tar", "unexpected end of data")
    counter.add("empty_caption", "k1", "a.tar", "")
    counter.merge(counter.drain())
    assert (counter.read, counter.lost, counter.events) == (3, 1, 2)
    assert counter.fraction == pytest.approx(1 / 4)
    summary = counter.summary()
    assert "lost 1 sample" in summary and "2 shard event" in summary


def test_member_names_with_dots_are_skipped_naming_the_real_cause(tmp_path):
    """Item 4: WebDataset splits a member name at its first dot, so 'a.b.c.jpg' is key 'a'
    with extension 'b.c.jpg'; the skip says so and quotes the whole name."""
    from diva_lightning.data import DualFlowDataModule
    from tests.data_helpers import write_tar

    image = encode(rgb(8))
    samples = [
        {"__key__": "photo", "v2.final.jpg": image, "v2.final.txt": "a red square."},
        {"__key__": "plain", "jpg": image, "txt": "a red square."},
    ]
    shard = write_tar(tmp_path / "dots.tar", samples)
    dm = DualFlowDataModule(str(shard), str(shard), image_size=8, image_grid=(2, 2), batch_size=4,
                            max_skip_fraction=1.0)  # fmt: skip
    dm.setup("fit")
    keys = [k for batch in dm.make_loader("val", 0, 1) for k in batch.keys]
    assert keys == ["plain"]
    counter = dm.skips["val"]
    assert counter.as_dict() == {"dotted_name": 1}
    cause = counter.examples["dotted_name"][0].cause
    assert "photo.v2.final.jpg" in cause and "first dot" in cause


def test_a_folder_of_shards_reads_every_tar_format_and_names_what_it_ignores(tmp_path, caplog):
    """Item 5: compressed tars are shards too; anything else in the folder is listed."""
    import gzip
    import lzma
    import shutil

    from diva_lightning.data import DualFlowDataModule
    from diva_lightning.data.shards import resolve_shards
    from tests.data_helpers import write_tar

    image, folder = encode(rgb(8)), tmp_path / "shards"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        samples = [
            {"__key__": f"{name}{i}", "png": image, "txt": "a red square."} for i in range(3)
        ]
        write_tar(tmp_path / f"{name}.tar", samples)
    shutil.move(tmp_path / "a.tar", folder / "a.tar")
    (folder / "b.tar.gz").write_bytes(gzip.compress((tmp_path / "b.tar").read_bytes()))
    (folder / "c.tgz").write_bytes(gzip.compress((tmp_path / "c.tar").read_bytes()))
    (folder / "d.tar.xz").write_bytes(lzma.compress((tmp_path / "d.tar").read_bytes()))
    (folder / "e.tar.zst").write_bytes(b"zstd is not read by tarfile")
    (folder / "notes.md").write_text("hello")
    with caplog.at_level("WARNING"):
        shards = resolve_shards(str(folder), "train_shards")
    assert [p.rsplit("/", 1)[1] for p in shards] == ["a.tar", "b.tar.gz", "c.tgz", "d.tar.xz"]
    assert "e.tar.zst" in caplog.text and "notes.md" in caplog.text
    dm = DualFlowDataModule(str(folder), str(folder), image_size=8, image_grid=(2, 2),
                            batch_size=4, max_skip_fraction=0.0)  # fmt: skip
    dm.setup("fit")
    keys = sorted(k for batch in dm.make_loader("val", 0, 1) for k in batch.keys)
    assert keys == sorted(f"{n}{i}" for n in "abcd" for i in range(3))


def test_messages_name_the_file_and_line_and_the_source_of_an_encoding_error(folder, tmp_path):
    """Item 7: file:line for every JSONL/CSV skip (the image's too), encoding errors worded
    for their source, and no stray "? /" prefix."""
    (folder / "c.png").write_bytes(b"not an image at all")
    lines = [
        b'{"image": "a.png", "caption": "a red square."}',
        b'{"image": "c.png", "caption": "a broken image."}',
        b'{"image": "b.png", "caption": "caf\xe9 latin-1"}',
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b"\n".join(lines) + b"\n")
    summary = prepare(out=str(tmp_path / "s"), images=str(folder), captions=str(pairs), quiet=True)
    examples = {r: e[0] for r, e in summary["skipped_examples"].items()}
    assert examples["not_an_image"]["item"].startswith("pairs.jsonl:2")
    assert examples["bad_caption_encoding"]["item"] == "pairs.jsonl:3"
    assert "'txt'" not in examples["bad_caption_encoding"]["cause"]
    assert "caption" in examples["bad_caption_encoding"]["cause"]
    from diva_lightning.data.skips import SkipRecord

    assert str(SkipRecord("empty_caption", "pairs.jsonl:4", None, "empty")) == (
        "pairs.jsonl:4: empty"
    )


def test_too_large_honours_and_quotes_max_image_pixels():
    """Item 7: Pillow's own bomb guard (179 MP) must not overrule the project's limit."""
    from diva_lightning.data.decode import SkipSample, open_image
    from tests.data_helpers import bomb_png

    header = bomb_png(20_000, 20_000)  # 400 megapixels (a header only)
    assert open_image(header, max_pixels=int(5e8), min_side=8).size == (20_000, 20_000)
    with pytest.raises(SkipSample) as skip:
        open_image(header, max_pixels=int(3e8), min_side=8)
    assert skip.value.reason == "too_large" and "max_image_pixels=300000000" in skip.value.cause


def test_broken_links_and_folders_named_like_images_are_counted(folder, tmp_path):
    (folder / "a.txt").write_text("a red square.")
    (folder / "b.txt").write_text("a red square.")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "album.jpg").mkdir()
    summary = prepare(out=str(tmp_path / "s"), images=str(folder), quiet=True)
    assert summary["written"] == 2 and summary["skipped_total"] == 2
    causes = " ".join(e["cause"] for e in summary["skipped_examples"]["missing_image"])
    assert "broken symbolic link" in causes and "folder" in causes


def _two_shards(root, first: list[str]):
    from tests.data_helpers import write_tar

    image = encode(rgb(8))
    a = [{"__key__": f"a{i}", "png": image, "txt": t} for i, t in enumerate(first)]
    b = [{"__key__": f"b{i:02d}", "png": image, "txt": "a blue circle."} for i in range(99)]
    return [str(write_tar(root / "a.tar", a)), str(write_tar(root / "b.tar", b))]


def _train_keys(urls, batches=50):
    from diva_lightning.data import DualFlowDataModule

    dm = DualFlowDataModule(
        urls, None, image_size=8, image_grid=(2, 2), batch_size=4, num_workers=2,
        shuffle_buffer=0, batches_per_epoch=batches, max_skip_fraction=1.0,
        persistent_workers=False,
    )  # fmt: skip
    dm.setup("fit")
    return [k for batch in dm.make_loader("train", 0, 1) for k in batch.keys]


def test_a_worker_whose_shards_hold_no_valid_sample_does_not_kill_training(tmp_path):
    """Item 8: every worker reads every shard in turn, so a worker's bad share costs nothing."""
    keys = _train_keys(_two_shards(tmp_path, ["", " ", ""]))
    assert len(keys) == 200 and all(k.startswith("b") for k in keys)


def test_a_worker_with_a_single_good_sample_does_not_repeat_it(tmp_path):
    keys = _train_keys(_two_shards(tmp_path, ["a red square."]))
    assert keys.count("a0") / len(keys) < 0.05  # one sample of 100: about 1%, never half


def test_codes_of_another_tokenizer_are_refused_even_with_the_same_codebook_size(tmp_path):
    """Item 12: the shards record the tokenizer's class and a hash of its weights."""
    import torch

    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.data import DualFlowDataModule

    torch.manual_seed(0)
    writer = Emu3Adapter.tiny()
    torch.manual_seed(1)
    other = Emu3Adapter.tiny()  # the same class and codebook size, other VQ weights
    out = tmp_path / "coded"
    summary = prepare(out=str(out), synthetic=8, backbone=writer, max_count=4, quiet=True)
    assert summary["codes"]["tokenizer"]["class"].endswith("Emu3VQVAE")

    def bind(adapter, **kwargs):
        dm = DualFlowDataModule(str(out), str(out), num_workers=0, batch_size=4, **kwargs)
        dm.bind_backbone(adapter)
        dm.setup("fit")
        return dm

    bind(writer)  # its own codes: accepted
    with pytest.raises(ValueError, match=r"(?s)summary\.json.*tokenizer.*check_tokenizer"):
        bind(other)
    bind(other, check_tokenizer=False)  # a deliberate choice (e.g. DIVA-mini's patch tokenizer)
