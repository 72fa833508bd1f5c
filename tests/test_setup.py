"""``scripts/setup.sh`` on a checkout that is already set up runs no pip: an install whose
inputs (build files, C++ sources, torch, Python) did not change is not redone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / ".venv" / ".linft-setup"


def _setup(tmp_path: Path, fake_pip: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if fake_pip:  # ``python -m pip`` finds this one first: it leaves a mark and fails
        pip = tmp_path / "fake" / "pip"
        pip.mkdir(parents=True, exist_ok=True)
        (pip / "__init__.py").write_text("")
        (pip / "__main__.py").write_text(
            f"open({str(tmp_path / 'pip-ran')!r}, 'w').close()\nraise SystemExit(1)\n"
        )
        env["PYTHONPATH"] = str(tmp_path / "fake")
    return subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_a_set_up_checkout_is_not_reinstalled(tmp_path):
    first = _setup(tmp_path, fake_pip=False)  # brings the stamp up to date if it is not
    assert first.returncode == 0, first.stderr[-2000:]
    saved = STAMP.read_text()
    again = _setup(tmp_path, fake_pip=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (tmp_path / "pip-ran").exists(), "pip ran although nothing changed"
    assert "linft is set up" in again.stdout
    try:
        STAMP.write_text("stale\n")  # as after a change to setup.py or csrc/
        stale = _setup(tmp_path, fake_pip=True)
        assert stale.returncode != 0 and (tmp_path / "pip-ran").exists(), "pip did not run"
    finally:
        STAMP.write_text(saved)
