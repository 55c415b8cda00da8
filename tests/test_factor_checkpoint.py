"""Stage-1 encoders save/load without Lightning."""

import pytest
import torch

from diva_lightning.objectives import FactorEncoders, LogitInjection
from diva_lightning.objectives.checkpoint import (
    factor_config,
    load_factor_encoders,
    save_factor_encoders,
)


def test_round_trip_reproduces_factors_and_checks_hidden_size(tmp_path):
    torch.manual_seed(0)
    enc = FactorEncoders(32, shared_dim=8, unique_dim=4, arch="transformer")
    inj = LogitInjection(20, 10, 8, 4, rank=3)
    target = save_factor_encoders(tmp_path / "enc", enc, factor_config(enc, [2, 3]), inj)
    loaded, config = load_factor_encoders(target, hidden_size=32)
    assert config["middle_layers"] == [2, 3] and config["arch"] == "transformer"
    h = torch.randn(3, 2, 32)
    for a, b in zip(vars(enc(h, h)).values(), vars(loaded(h, h)).values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="hidden size 32.*backbone has 64"):
        load_factor_encoders(target, hidden_size=64)
    # overwriting is atomic: no staging directories are left behind
    save_factor_encoders(target, enc, factor_config(enc, [2, 3]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_missing_or_wrong_paths_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_factor_encoders(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="factors.json"):
        load_factor_encoders(tmp_path / "empty")
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a stage-1 checkpoint"):
        load_factor_encoders(tmp_path / "x.ckpt")
