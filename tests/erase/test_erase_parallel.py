"""Data-parallel erasure under a real ``accelerate launch`` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import attnscope.cli
from attnscope.erase.cli import register

SPEC = (
    "name: red\ntargets: [red]\nsynonyms: [crimson]\nirrelevant: [blue, green]\n"
    "prompts: [a red circle, a photo of a red car]\npreserve_prompts: [a blue circle]\n"
)
ARGS = ["--model", "tiny-flux", "--steps", "4", "--batch", "2", "--sample-steps", "2", "--preserve-steps", "2",
        "--cache-seeds", "1", "--checkpoint-every", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    spec = folder / "red.yaml"
    spec.write_text(SPEC)
    out = folder / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "attnscope.cli", "erase", *ARGS, "--spec", str(spec), "--out", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return spec, out, done.stdout


def test_two_processes_train_one_lora(parallel_run, tmp_path, monkeypatch) -> None:
    spec, out, stdout = parallel_run
    assert stdout.count("LoRA:") == 1  # rank 0 alone reports (and writes)
    log = json.loads((out / "train_log.json").read_text())
    assert log["processes"] == 2 and len(log["steps"]) == 4
    assert len(torch.load(out / "checkpoint.pt", weights_only=False)["generators"]) == 2
    # The run ended with identical LoRAs on both ranks (checked inside, else it fails), and the second rank's rows
    # counted: the averaged update differs from a single process's on rank 0's rows alone.
    monkeypatch.setattr(
        attnscope.cli, "entry_points", lambda group: [type("EP", (), {"load": lambda self: register})()]
    )
    single = tmp_path / "single"
    assert attnscope.cli.main(["erase", *ARGS, "--spec", str(spec), "--out", str(single)]) == 0
    parallel_lora, single_lora = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(
        str(single / "pytorch_lora_weights.safetensors"))
    assert parallel_lora.keys() == single_lora.keys()
    assert any(not torch.equal(parallel_lora[k], single_lora[k]) for k in single_lora if "lora_B" in k)


def test_resume_with_another_process_count_is_refused(parallel_run, monkeypatch, capsys) -> None:
    spec, out, _ = parallel_run
    monkeypatch.setattr(
        attnscope.cli, "entry_points", lambda group: [type("EP", (), {"load": lambda self: register})()]
    )
    assert attnscope.cli.main(["erase", *ARGS, "--steps", "6", "--spec", str(spec), "--out", str(out), "--resume"]) == 2
    assert "written by 2 process(es); resume with the same number" in capsys.readouterr().err
