"""Bad data: every kind of bad sample skipped and counted by reason; odd-but-valid images kept and
converted correctly; broken shards; the skipped-fraction ceiling; counts across workers."""

from __future__ import annotations

import shutil
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diva_lightning.data import DataQualityError, DualFlowDataModule
from diva_lightning.data.decode import load_pixels
from tests.data_helpers import bad_shard_samples, encode, write_tar

LIMITS = {"max_image_pixels": 2500, "min_image_side": 4}


def module(train=None, val=None, **kwargs) -> DualFlowDataModule:
    args = {"image_size": 32, "image_grid": (4, 4), "num_workers": 0, "batch_size": 4}
    return DualFlowDataModule(train, val, **{**args, **LIMITS, "max_skip_fraction": 1.0, **kwargs})


def read_val(dm: DualFlowDataModule, rank: int = 0, world_size: int = 1):
    batches = list(dm.make_loader("val", rank, world_size))
    return batches, [key for b in batches for key in b.keys]


def test_every_bad_sample_is_skipped_and_counted(tmp_path):
    samples, kept, skips = bad_shard_samples()
    shard = write_tar(tmp_path / "bad.tar", samples)
    dm = module(val=str(shard))
    batches, keys = read_val(dm)
    assert keys == kept
    assert dm.skips["val"].as_dict() == skips
    assert dm.skips["val"].kept == len(kept)
    assert sum(sum(b.skips.values()) for b in batches) == sum(skips.values())  # shipped
    summary = dm.skips["val"].summary()
    assert "latin1_caption" in summary and "bad.tar" in summary  # culprits are named


def test_unusual_images_convert_to_correct_rgb(tmp_path):
    """Grayscale, RGBA, CMYK, 16-bit and palette images are kept with the right colours."""
    samples, _, _ = bad_shard_samples()
    shard = write_tar(tmp_path / "bad.tar", samples)
    batches, _ = read_val(module(val=str(shard), batch_size=16))
    pixels = {k: p for b in batches for k, p in zip(b.keys, b.pixels, strict=True)}
    centre = {k: (p[:, 16, 16] * 255).round().tolist() for k, p in pixels.items()}
    assert centre["good_gray"] == [100, 100, 100]
    assert centre["good_rgba"] == [255, 255, 255]  # transparent -> white background
    assert centre["good_gray16"] == [128, 128, 128]  # 32768 / 65535, not clipped to white
    assert centre["good_rgb16"] == [255, 0, 0]
    assert centre["good_palette"] == [255, 255, 255]  # palette index 0 is transparent
    cmyk = np.array(centre["good_cmyk"])
    assert cmyk[0] > 200 and cmyk[1:].max() < 60  # CMYK (0, 255, 255, 0) is red
    assert all(p.shape == (3, 32, 32) and p.min() >= 0 and p.max() <= 1 for p in pixels.values())


def test_resize_and_centre_crop():
    """A 96x64 image, blue centre square, red side strips: shorter side -> 32, centre kept."""
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :16], image[:, 80:] = (255, 0, 0), (255, 0, 0)
    image[:, 16:80] = (0, 0, 255)  # the centre 64x64 square
    pixels = load_pixels(encode(Image.fromarray(image)), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    assert (pixels[2, :, 1:31] == 255).all() and (pixels[0, :, 1:31] == 0).all()
    big = load_pixels(encode(Image.fromarray(image), "JPEG"), 16)  # JPEG draft path
    assert big.shape == (3, 16, 16) and big[2, 8, 8] > 200


def test_truncated_and_missing_shards_are_counted(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    good = [
        {"__key__": f"s{i}", "png": encode(Image.fromarray(noise[i])), "txt": "a red square."}
        for i in range(5)
    ]
    full = write_tar(tmp_path / "full.tar", good)
    data = full.read_bytes()
    with tarfile.open(full) as archive:
        member = archive.getmember("s3.png")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: member.offset_data + 100])  # cut inside s3's image
    vanished = shutil.copy(full, tmp_path / "vanished.tar")
    dm = module(val=[str(truncated), str(vanished), str(full)])
    dm.setup("validate")  # the path exists now ...
    (tmp_path / "vanished.tar").unlink()  # ... and disappears before reading
    _, keys = read_val(dm)
    assert keys == ["s0", "s1", "s2"] + [f"s{i}" for i in range(5)]
    assert dm.skips["val"].as_dict() == {"bad_tar": 1, "missing_shard": 1}


def test_skip_counts_are_exact_across_workers(tmp_path):
    samples, kept, skips = bad_shard_samples()
    shards = [str(write_tar(tmp_path / f"bad{i}.tar", samples)) for i in range(4)]
    dm = module(val=shards, num_workers=2)
    batches, keys = read_val(dm)
    assert sorted(keys) == sorted(kept * 4)
    assert {b.origin for b in batches} == {(0, 0), (0, 1)}
    assert dm.skips["val"].as_dict() == {reason: 4 * n for reason, n in skips.items()}


def test_skip_ceiling_aborts_with_a_summary(tmp_path):
    samples, _, _ = bad_shard_samples()  # 10 of 17 are bad
    shard = write_tar(tmp_path / "bad.tar", samples)
    dm = module(val=str(shard), max_skip_fraction=0.3, skip_check_after=8)
    with pytest.raises(DataQualityError, match=r"(?s)exceeds the ceiling.*too_large: 2"):
        read_val(dm)


def test_training_worker_with_only_bad_data_raises_instead_of_spinning(tmp_path):
    samples, _, _ = bad_shard_samples()
    bad = [s for s in samples if not s["__key__"].startswith("good")]
    shard = write_tar(tmp_path / "allbad.tar", bad)
    dm = module(train=str(shard), samples_per_epoch=8)
    with pytest.raises(RuntimeError, match="gave no valid sample"):
        next(iter(dm.make_loader("train")))


def _good_shards(tmp_path, n=2):
    noise = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    good = [
        {"__key__": f"s{i}", "png": encode(Image.fromarray(noise[i])), "txt": "a red square."}
        for i in range(3)
    ]
    return [write_tar(tmp_path / f"full{k}.tar", good) for k in range(n)]


def test_a_failing_stream_is_counted_as_a_stream_error_and_reading_goes_on(tmp_path):
    first, second = _good_shards(tmp_path)
    broken = f"pipe:cat {tmp_path}/gone.tar"  # the command exits 1
    dm = module(val=[f"pipe:cat {first}", broken, f"pipe:cat {second}"])
    _, keys = read_val(dm)
    assert keys == ["s0", "s1", "s2"] * 2
    assert dm.skips["val"].as_dict() == {"stream_error": 1}
    assert "gone.tar" in dm.skips["val"].summary()


def test_a_stalled_stream_times_out_instead_of_hanging_the_rank(tmp_path):
    (good,) = _good_shards(tmp_path, 1)
    dm = module(val=["pipe:sleep 600", f"pipe:cat {good}"], stream_timeout=2)
    started = time.monotonic()
    _, keys = read_val(dm)
    assert time.monotonic() - started < 60
    assert keys == ["s0", "s1", "s2"]
    assert dm.skips["val"].as_dict() == {"stream_error": 1}


def test_streams_are_bounded_and_local_paths_left_alone():
    from diva_lightning.data.shards import bounded_stream

    assert bounded_stream("data/shard-000000.tar", 5) == "data/shard-000000.tar"
    web = bounded_stream("https://host/shard 1.tar", 5)
    assert (
        web.startswith("pipe:curl ")
        and "--max-time 5" in web
        and "'https://host/shard 1.tar'" in web
    )
    assert bounded_stream("pipe:aws s3 cp s3://b/s.tar -", 5) == (
        "pipe:timeout -k 10 5 sh -c 'aws s3 cp s3://b/s.tar -'"
    )


def test_a_stream_that_ends_before_its_first_byte_is_a_stream_error():
    """A timed-out (or failed) stream may surface as tarfile's "empty file" before WebDataset
    reads the command's exit status: it is a stream error, not a corrupt tar (the stalled-stream
    test above counted it as bad_tar once in CI). A local empty file stays a bad tar."""
    import tarfile

    from diva_lightning.data.skips import classify_tar_error

    empty = tarfile.ReadError("empty file")
    assert classify_tar_error(empty, "pipe:sleep 600") == "stream_error"
    assert classify_tar_error(empty, "https://host/shard.tar") == "stream_error"
    assert classify_tar_error(empty, "/data/shard-000.tar") == "bad_tar"
    assert classify_tar_error(tarfile.ReadError("invalid header"), "pipe:cat x.tar") == "bad_tar"
