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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more oversubscribe a busy 2-core machine (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
