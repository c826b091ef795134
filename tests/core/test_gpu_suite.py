"""The GPU suite's CPU dry run (``benchmarks/gpu_suite.py --scale tiny``): every section runs and reports."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def test_gpu_suite_dry_run_reports_every_section(tmp_path, one_thread) -> None:
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = suite  # dataclasses look their module up there
    try:
        spec.loader.exec_module(suite)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "gpu_suite.json"
    result = suite.main(["--scale", "tiny", "--device", "cpu", "--dtype", "float32", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    for name in ("capture", "sd3"):
        capture = result[name]
        assert capture["finite"], name
        assert capture["identical"] == {"fused": True, "chunked": True}, name
        assert capture["retained_bytes_per_forward"] == capture["retained_formula"] > 0, name
        assert capture["fused_ratio"] > 0 and capture["chunked_ratio"] > 0
    for key in ("checkpointing", "no_checkpointing"):
        run = result["erasure"][key]
        assert "error" not in run, run
        assert run["pair_s"] > 0 and run["plain_s"] > 0 and run["ratio"] > 0
    for attack in ("unlearndiff", "soft-prompt"):
        assert result["attacks"][attack]["step_s"] > 0, result["attacks"][attack]
    assert result["flux_params"] > 0 and result["scale"] == "tiny"
