"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnscope


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on add_q_proj/add_k_proj with random (non-identity) weights, saved as `attnscope erase` would."""
    import peft
    from diffusers import FluxPipeline

    transformer = attnscope.load_pipeline("tiny-flux").transformer
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["add_q_proj", "add_k_proj"], init_lora_weights=False)
    transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=peft.utils.get_peft_model_state_dict(transformer))
    return folder


@pytest.fixture(scope="session")
def tiny_shapes_config():
    """A shapes model config small enough to train a few steps in seconds."""
    from attnscope.lab.model import ShapesModelConfig

    return ShapesModelConfig(hidden_heads=2, head_dim=16, double_layers=1, single_layers=1, t5_d_ff=32, clip_hidden=16)


@pytest.fixture(scope="session")
def tiny_shapes_folder(tmp_path_factory: pytest.TempPathFactory, tiny_shapes_config) -> str:
    """An exported tiny shapes model trained two steps on data (no guidance embedding); tests only read it."""
    from dataclasses import asdict

    from attnscope.lab.export import export_checkpoint
    from attnscope.lab.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-shapes")
    cfg = TrainConfig(out=str(root / "run"), steps=2, minutes=0, vae_steps=2, batch=2, checkpoint_minutes=60.0,
                      model=asdict(tiny_shapes_config))
    return str(export_checkpoint(train(cfg), root / "export"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more oversubscribe a busy 2-core machine (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
