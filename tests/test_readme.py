"""#18 acceptance: the README's first-run commands, run verbatim on the tiny backbone in a fresh
folder (your own images -> shards -> stage 1 -> stage 2 -> export -> loaded back)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from diva_lightning.cli import main
from tests.data_helpers import encode, rgb

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-test: begin -->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(600)
def test_the_readme_first_run_works_verbatim(tmp_path, monkeypatch):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for folder, count in (("my_photos", 24), ("my_photos_val", 8)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            colour = colours[i % 4]
            (tmp_path / folder / f"p{i}.png").write_bytes(encode(rgb(48, colour)))
            (tmp_path / folder / f"p{i}.txt").write_text(f"a square of colour {colour}.")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c.split()[:2] for c in commands[:5]] == [["diva-cli", "prepare"]] * 2 + [
        ["diva-cli", "fit"]] * 2 + [["diva-cli", "export"]]  # fmt: skip
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "diva-cli":
            main(argv[1:])  # what the diva-cli script runs, in this process
        else:
            done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "Emu3ForConditionalGeneration"
    assert (tmp_path / "runs/tiny/stage1/factor_encoders/factors.json").is_file()
