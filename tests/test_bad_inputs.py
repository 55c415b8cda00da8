"""Issue #18: wrong inputs that used to get through (data, prepare, configs and the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

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


ADAPTERS = [
    "diva_lightning.backbones.emu3.Emu3Adapter",
    "diva_lightning.backbones.janus.JanusAdapter",
    "diva_lightning.backbones.chameleon.ChameleonAdapter",
    "diva_lightning.backbones.showo.ShowoAdapter",
]


@pytest.mark.parametrize("class_path", ADAPTERS)
@pytest.mark.parametrize("where", ["missing/local/folder", "some-org/some-model"])
def test_pretrained_path_that_is_not_a_local_folder_names_the_key_and_never_downloads(
    class_path, where, monkeypatch
):
    """Item 16: a missing folder, or a hub id, fails at once naming the key and the path."""
    import importlib
    import time

    module, name = class_path.rsplit(".", 1)
    adapter = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even when the hub is allowed, nothing is fetched
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        adapter(pretrained_path=where)
    message = str(error.value)
    assert "pretrained_path" in message and where in message and "local" in message
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("mismatch", ["middle_layers", "backbone", "num_layers"])
def test_stage1_encoders_from_another_backbone_or_range_are_refused(tmp_path, mismatch):
    """Item 11: factors.json records the backbone class, layer count and middle range; stage 2
    checks all of them (not only the hidden size), unless the transfer is asked for."""
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
    from diva_lightning.objectives.encoders import FactorEncoders
    from diva_lightning.stages import Stage2

    backbone = Emu3Adapter.tiny()
    recorded = {"middle_layers": [3, 4, 5, 6], "backbone": "Emu3Adapter",
                "num_layers": backbone.num_layers}  # fmt: skip
    recorded[mismatch] = {"middle_layers": [2, 3, 4], "backbone": "JanusAdapter",
                          "num_layers": backbone.num_layers + 2}[mismatch]  # fmt: skip
    enc = FactorEncoders(backbone.hidden_size, shared_dim=16)
    config = factor_config(enc, recorded.pop("middle_layers"), **recorded)
    path = save_factor_encoders(tmp_path / "enc", enc, config)
    options = dict(middle_layers=(3, 6), targets="online", critic_hidden=16)
    with pytest.raises(ValueError, match="allow_encoder_transfer") as error:
        Stage2(backbone, stage1_encoders=str(path), **options)
    assert str(path) in str(error.value)
    Stage2(backbone, stage1_encoders=str(path), allow_encoder_transfer=True, **options)


def test_stage1_records_what_stage2_checks(tmp_path):
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.stages import Stage1

    backbone = Emu3Adapter.tiny()
    config = Stage1(backbone, middle_layers=(3, 6), shared_dim=16).factor_config()
    assert config["backbone"] == "Emu3Adapter" and config["num_layers"] == backbone.num_layers
    assert config["middle_layers"] == [3, 4, 5, 6]


def test_resuming_from_a_checkpoint_of_another_stage_is_refused_before_anything_is_built(tmp_path):
    """Item 10: LightningCLI takes the model class from the checkpoint's hyperparameters, so a
    stage-2 config resumed from a stage-1 checkpoint used to train stage 1 as if it were stage 2."""
    import torch

    from diva_lightning.lightning_cli import build_cli

    ckpt = tmp_path / "stage1.ckpt"
    hparams = {"_class_path": "diva_lightning.stages.stage1.Stage1", "middle_layers": [3, 6]}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, ckpt)
    args = ["fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/stage2.yaml", "--ckpt_path", str(ckpt),
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ValueError, match=r"Stage1.*Stage2|Stage2.*Stage1") as error:
        build_cli(args)
    assert str(ckpt) in str(error.value)


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


def test_a_prepare_that_writes_nothing_leaves_no_empty_shard(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not an image")
    (images / "broken.txt").write_text("a caption.")
    out = tmp_path / "shards"
    summary = prepare(out=str(out), images=str(images), quiet=True)
    assert summary["written"] == 0 and summary["shards"] == []
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


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


def _adapter(class_path: str, **kwargs):
    import importlib

    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


@pytest.mark.parametrize("class_path", ADAPTERS)
def test_an_enormous_caption_is_truncated_and_counted_within_the_positions(class_path):
    """Item 3: captions are capped by tokens per backbone; a capped caption is counted, and
    no flow grows past the backbone's position embeddings."""
    import torch

    adapter = _adapter(class_path)
    huge, short = "a red square. " * 20_000, "a red square."
    codes = torch.zeros(2, adapter.tokens_per_image, dtype=torch.long)
    mask = torch.ones_like(codes, dtype=torch.bool)
    pixels = torch.rand(2, 3, adapter.image_size, adapter.image_size)
    flow_u = adapter.build_understanding(["describe"] * 2, [huge, short], codes=codes,
                                         pixels=pixels)  # fmt: skip
    flow_g = adapter.build_generation([huge, short], codes, mask)
    for flow in (flow_u, flow_g):
        assert flow.labels.shape[1] <= adapter.max_positions
    assert adapter.pop_truncated_captions() == 2 and adapter.pop_truncated_captions() == 0
    small = _adapter(class_path, max_caption_tokens=3)
    flow = small.build_generation([short, short], codes, mask)
    assert small.pop_truncated_captions() == 2
    assert flow.attention_mask.sum(1).max() < flow_g.attention_mask.sum(1).min()


@pytest.mark.parametrize("class_path", ADAPTERS)
def test_a_flow_longer_than_the_position_embeddings_is_an_error_naming_the_cap(class_path):
    import torch

    adapter = _adapter(class_path, max_caption_tokens=100_000)
    if adapter.max_positions is None or adapter.caption_token_limit < 100_000:
        pytest.skip("this backbone's text slots are fixed: captions never pass its positions")
    codes = torch.zeros(1, adapter.tokens_per_image, dtype=torch.long)
    mask = torch.ones_like(codes, dtype=torch.bool)
    flow = adapter.build_generation(["a red square. " * 2000], codes, mask)
    with pytest.raises(ValueError, match=r"(?s)position embeddings.*max_caption_tokens"):
        adapter.forward_flow(flow, "G")


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


def test_a_fit_through_the_cli_saves_its_final_weights_as_last_ckpt(tmp_path):
    """Item 13: the run's last step is saved (the tiny configs used to keep only step 4)."""
    import torch

    from diva_lightning.cli import main

    prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
    prepare(str(tmp_path / "val"), synthetic=8, max_count=8, seed=1, quiet=True)
    out = tmp_path / "run"
    main([
        "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
        "--config", "configs/tiny/sft.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--trainer.max_steps=5", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (last,) = out.rglob("last.ckpt")
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 5


def test_export_of_a_directory_that_is_no_deepspeed_checkpoint_says_what_to_do(tmp_path):
    from diva_lightning.export import export

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"(?s)last\.ckpt.*DeepSpeed"):
        export(run_config=tmp_path / "config.yaml", checkpoint=folder, out=tmp_path / "out")


TINY_FIT = ["fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/stage1.yaml"]  # fmt: skip


def test_a_constructor_error_is_the_last_thing_printed_in_one_block(capsys, monkeypatch):
    """Item 18: not line 25 of a double traceback ending in jsonargparse's union message."""
    from diva_lightning.cli import main

    monkeypatch.delenv("DIVA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([*TINY_FIT, "--model.init_args.middle_layers=[3, 20]"])
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "middle_layers 3..20 is outside the backbone's blocks 1..8" in lines[-1]
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("ask", [["--trainer.accelerator=gpu"], ["--trainer.devices=64"]])
def test_devices_that_do_not_exist_are_refused_before_the_backbone_is_built(ask, monkeypatch):
    """Item 17: say what exists, before any model is built or process started."""
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.cli import build_cli

    built = []
    monkeypatch.setattr(Emu3Adapter, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(ValueError, match=r"(?s)trainer\.(accelerator|devices).*(CUDA|core)"):
        build_cli([*TINY_FIT[1:], *ask], run=False)
    assert not built


def test_the_help_lists_the_tools_and_offers_only_working_subcommands(capsys):
    """Item 19: prepare, analyze and export are discoverable; `test` is not offered."""
    from diva_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"diva-cli {tool}" in out for tool in ("prepare", "analyze", "export"))
    assert "{fit,validate}" in out
    with pytest.raises(SystemExit):
        main(["test"])
    assert "invalid choice: 'test'" in capsys.readouterr().err


USER_CLASSES = [
    "diva_lightning.stages.Stage1", "diva_lightning.stages.Stage2",
    "diva_lightning.stages.sft.SFT", "diva_lightning.data.DualFlowDataModule",
    "diva_lightning.stages.ema.EMA", "diva_lightning.stages.balance.GradientBalance", *ADAPTERS,
]  # fmt: skip


@pytest.mark.parametrize("class_path", USER_CLASSES)
def test_every_argument_has_its_own_description(class_path):
    """Item 19: `--help` shows a description per argument, none merged into another's."""
    import importlib
    import inspect

    import docstring_parser

    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    docs = {}
    for klass in cls.__mro__:
        for text in (klass.__doc__, getattr(klass.__init__, "__doc__", None)):
            for param in docstring_parser.parse(text or "").params:
                docs.setdefault(param.arg_name, param.description)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    assert [n for n in names if not docs.get(n)] == []
    merged = [n for n, text in docs.items() if any(f" {m}:" in f" {text}" for m in names if m != n)]
    assert merged == []


def _tiny_fit(tmp_path, out, stage="sft", *extra):
    from diva_lightning.cli import main

    if not (tmp_path / "train").exists():
        prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
        prepare(str(tmp_path / "val"), synthetic=8, max_count=8, seed=1, quiet=True)
    main([
        "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
        "--config", f"configs/tiny/{stage}.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'val'}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={out}", *extra,
    ])  # fmt: skip


def test_a_rerun_gets_a_new_version_folder_and_relative_outputs_stay_inside_it(
    tmp_path, monkeypatch
):  # fmt: skip
    """Items 14 and 20: nothing of the first run is overlaid; a relative export_dir lands in
    the run's own log dir, never in the working directory."""
    out = tmp_path / "runs"
    _tiny_fit(tmp_path, out)
    first = sorted(p.name for p in (out / "tiny" / "sft").iterdir())
    _tiny_fit(tmp_path, out)
    assert sorted(p.name for p in (out / "tiny" / "sft").iterdir()) == first
    assert (out / "tiny" / "sft-1" / "config.yaml").is_file()
    monkeypatch.chdir(tmp_path)  # configs by absolute path: the working directory is elsewhere
    repo = Path(__file__).resolve().parents[1]
    for name in ("trainer", "data", "stage1"):
        (tmp_path / "configs" / "tiny").mkdir(parents=True, exist_ok=True)
        target = tmp_path / "configs" / "tiny" / f"{name}.yaml"
        target.write_text((repo / "configs" / "tiny" / f"{name}.yaml").read_text())
    _tiny_fit(tmp_path, out, "stage1", "--model.init_args.export_dir=encoders",
              "--model.init_args.shared_only_steps=1")  # fmt: skip
    assert (out / "tiny" / "stage1" / "encoders" / "factors.json").is_file()
    assert not (tmp_path / "encoders").exists()


def test_the_progress_bar_shows_the_loss_and_no_product_tips(tmp_path, caplog):
    """Item 20: no "Epoch 0/-2 ... v_num: age1", the loss instead; no third-party tips."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from diva_lightning.cli import build_cli
    from diva_lightning.stages.progress import StepRichProgressBar, StepTQDMProgressBar

    with caplog.at_level("INFO"):
        rank_zero_info("💡 Tip: For seamless cloud uploads, try installing something")
        rank_zero_info("a message of the run")
    assert "Tip" not in caplog.text and "a message of the run" in caplog.text
    prepare(str(tmp_path / "train"), synthetic=32, max_count=16, quiet=True)
    cli = build_cli([
        *TINY_FIT[1:5], "--config", "configs/tiny/sft.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        f"--data.init_args.val_shards={tmp_path / 'train'}", "--data.init_args.num_workers=0",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ], run=False)  # fmt: skip
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepRichProgressBar | StepTQDMProgressBar)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = bar.get_metrics(cli.trainer, cli.model)
    assert "v_num" not in metrics and "train/loss" in metrics
    if isinstance(bar, StepRichProgressBar):
        assert bar._get_train_description(0) == "Epoch 0"
