"""The recipes in integrations/ run as documented (small settings, CPU, offline)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(REPO / "integrations" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_hf_trainer_recipe(tmp_path):
    pytest.importorskip("transformers")
    out = run("hf_trainer.py", "--out", str(tmp_path / "hf"), "--steps", "10", cwd=tmp_path)
    assert "found by export" in out
    assert "identical logits True; plain from_pretrained: same logits True" in out
    assert (tmp_path / "hf" / "checkpoint-10" / "subnetwork.safetensors").is_file()


def test_lightning_recipe(tmp_path):
    pytest.importorskip("lightning")
    out = run("lightning_fit.py", "--out", str(tmp_path / "pl"), "--epochs", "2", cwd=tmp_path)
    assert "resume with trainer.fit" in out
    assert list((tmp_path / "pl").rglob("subnetwork.safetensors"))


def test_accelerate_recipe(tmp_path):
    out = run("accelerate_loop.py", cwd=tmp_path)
    assert "subnetwork.safetensors:" in out and (tmp_path / "subnetwork.safetensors").is_file()
