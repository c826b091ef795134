"""The boundary between the product and the shapes lab: nothing in the product imports the lab, and the lab plugs
its training checkpoints into ``attnscope.load_pipeline`` through the ``attnscope.profiles`` entry point."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import attnscope

PRODUCT = ["attnscope", "attnscope.shapes", "attnscope.shapes.metrics", "attnscope.shapes.localization",
           "attnscope.shapes.profile", "attnscope.shapes.cli", "attnscope.cli", "attnscope.erase"]
if importlib.util.find_spec("gradio") is not None:
    PRODUCT.append("attnscope.apps.explorer")


def _fresh(code: str) -> str:
    """The last line ``code`` prints in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_product_imports_no_lab_module():
    code = (f"import importlib, json, sys\nfor name in {PRODUCT!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m == 'attnscope.lab' or m.startswith('attnscope.lab.'))))")
    assert json.loads(_fresh(code)) == []


def test_no_product_source_imports_the_lab_even_inside_a_function():
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for folder in ("attnscope", "erase", "apps"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):  # `from attnscope.lab... import x`, `from attnscope import lab`
                    names = [node.module or ""] + [f"attnscope.{a.name}" for a in node.names
                                                   if node.module == "attnscope" or (node.level and not node.module)]
                if any(n == "attnscope.lab" or n.startswith("attnscope.lab.") for n in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_shapes_config):
    from attnscope.lab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = TrainConfig(out=str(out), steps=1, minutes=0, vae_steps=2, batch=2, checkpoint_minutes=60.0,
                      model=asdict(tiny_shapes_config))
    return train(cfg)


def test_load_pipeline_loads_a_training_checkpoint_through_the_entry_point_profile(checkpoint):
    from attnscope.lab.profile import CheckpointProfile
    from attnscope.lab.train import load_checkpoint_pipeline
    from attnscope.profiles import profile_for

    profile = profile_for(checkpoint)
    assert isinstance(profile, CheckpointProfile) and profile.name == "shapes checkpoint (*.pt)"
    pipe = attnscope.load_pipeline(str(checkpoint))
    assert type(pipe).__name__ == "FluxPipeline" and pipe.device.type == "cpu"
    reference = load_checkpoint_pipeline(checkpoint)
    for name, value in reference.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], value), name
    # A checkpoint is a shapes model: the world's call, checks and erasure defaults.
    assert profile.default_call(pipe)["true_cfg_scale"] > 1  # no guidance embedding: true CFG
    assert profile.erase_defaults == profile_for("shapes").erase_defaults
    half = attnscope.load_pipeline(str(checkpoint), dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no such training checkpoint"):
        attnscope.load_pipeline(str(checkpoint.parent / "missing.pt"))


def test_a_checkpoint_loads_in_a_fresh_interpreter_through_the_installed_entry_point(checkpoint):
    code = (f"import attnscope, sys\npipe = attnscope.load_pipeline({str(checkpoint)!r})\n"
            "print(type(pipe).__name__, 'attnscope.lab.profile' in sys.modules)")
    assert _fresh(code) == "FluxPipeline True"
