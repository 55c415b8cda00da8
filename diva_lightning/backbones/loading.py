"""Loading real checkpoints: local folders only, and the dtypes an adapter accepts."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_checkpoint(path: str | Path, key: str = "pretrained_path") -> Path:
    """``path`` as an existing local folder, else a ``FileNotFoundError`` naming ``key``.

    Checked before ``transformers`` sees the value: it would read a missing folder as a hub id,
    retry the network, and fail with an error that names neither the key nor the folder.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}: '{path}' is not a local folder. Weights are read from a local checkpoint "
            "folder only (nothing is downloaded): download it first, then give its path."
        )
    return folder
