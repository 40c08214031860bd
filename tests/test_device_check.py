"""benchmarks/device_check.py, the script prepared for a GPU or TPU, runs to the end on this
CPU with --tiny and reports every number it would report on a device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


@pytest.mark.slow
def test_device_check_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    ssd = report["ssd"]
    assert ssd["impl"] == "interpret" and ssd["ok"]
    assert ssd["max_err_y"] <= 1e-4 * max(ssd["max_abs_y"], 1.0) and ssd["max_rel_err_grads"] <= 1e-3
    assert [row["batch"] for row in report["decode"]] == [1, 2]
    for row in report["decode"]:
        assert row["tokens_per_s"] > 0 and row["bandwidth_limit_tokens_per_s"] > 0 and row["avg_layers"] == 4
        for k in (1, 2, 3):  # static exits of the 4-layer tiny model: FLOPs fall with the layers run
            assert 1.0 < row[f"static_{k}"]["ideal_speedup"]
        assert row["static_1"]["ideal_speedup"] > row["static_2"]["ideal_speedup"] > row["static_3"]["ideal_speedup"]


def test_device_check_refuses_the_full_size_without_a_device():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2 and "needs a GPU or TPU" in proc.stderr
