"""benchmarks/gpu_check.py's code runs here, on the CPU with tiny sizes (--smoke), so the one call a
GPU machine gets is not spent on a typo; and gpu_check.sh refuses a machine without CUDA in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_figures_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("CPU, torch") and "bf16 matmul peak" in lines[1]
    assert any("activation checkpointing" in line and "MFU" in line for line in lines)
    assert sum("generate, greedy" in line for line in lines) == 2
    assert any("flex vs dense mask" in line and "(equal within 1e-5)" in line for line in lines), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_script_stops_without_a_gpu():
    completed = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                               env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert completed.returncode == 1 and completed.stderr.strip() == "no CUDA device: nothing to check"
