"""Real-model evaluation (``erase/worlds/open_eval.py``) on a tiny random Flux with a tiny random CLIP built offline.

The classifier's weights are random, so its labels mean nothing; what is tested is the protocol: base and erased
images come from the same pipeline and seeds (an identity LoRA gives identical figures), a LoRA that changes the
model moves the preservation figures, the report is written, NudeNet runs on the images, the CLI dispatches here
for non-shapes models, and bad input is refused clearly.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import attnscope
from attnscope.erase.lora import LoraSettings, add_lora, save_lora
from attnscope.erase.spec import ConceptSpec
from attnscope.erase.worlds.open_eval import ZeroShot, nudity_detector, real_eval
from attnscope.tiny import TINY_FLUX_CALL_KWARGS, build_clip_tokenizer

SPEC = ConceptSpec(
    name="cat",
    targets=("cat",),
    synonyms=("dog",),
    irrelevant=("car", "tree"),
    prompts=("a photo of a cat", "a painting of a cat"),
    preserve_prompts=("a photo of a car", "a red house"),
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _lora_dir(pipe, folder, scale: float):
    """A LoRA folder for ``pipe``: the identity (peft's zero-initialized B) or, with ``scale``, random weights."""
    settings = LoraSettings(targets=("add_q_proj", "add_k_proj"), rank=4)
    params = add_lora(pipe.transformer, settings)
    with torch.no_grad():
        for p in params:
            if scale:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * scale)
    save_lora(pipe.transformer, folder, settings)
    pipe.transformer.delete_adapters(pipe.transformer.active_adapters())
    return folder


def test_identity_lora_scores_like_the_base_model(clip_dir, tmp_path):
    pipe = attnscope.load_pipeline("tiny-flux")
    lora = _lora_dir(pipe, tmp_path / "identity", scale=0.0)
    report = real_eval(lora, [SPEC], pipe, seeds=2, clip_model=clip_dir, call_kwargs=TINY_FLUX_CALL_KWARGS)
    cat = report["concepts"]["cat"]
    assert cat["acc_ir"] == 1.0 and cat["pixel_mae"] == 0.0 and cat["clip_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert cat["acc_e"] == cat["base"]["acc_e"] and cat["acc_g"] == cat["base"]["acc_g"]
    saved = json.loads((lora / "eval" / "eval.json").read_text())
    assert {"acc_e", "acc_g", "acc_ir", "base"} <= set(saved) and saved["acc_ir"] == 1.0
    assert saved["prompts"]["cat"]["synonym"] == ["a photo of a dog", "a painting of a dog"]
    assert (lora / "eval" / "eval_grid.png").is_file()


def test_a_lora_that_changes_the_model_moves_the_preservation_figures(clip_dir, tmp_path):
    pipe = attnscope.load_pipeline("tiny-flux")
    lora = _lora_dir(pipe, tmp_path / "random", scale=0.5)
    report = real_eval(lora, [SPEC], pipe, seeds=2, clip_model=clip_dir, call_kwargs=TINY_FLUX_CALL_KWARGS,
                       out=tmp_path / "report")
    cat = report["concepts"]["cat"]
    assert cat["pixel_mae"] > 1e-4 and cat["clip_similarity"] < 1.0
    for key in ("acc_e", "acc_g", "acc_ir"):
        assert 0.0 <= report[key] <= 1.0
    assert (tmp_path / "report" / "eval.json").is_file()


def test_zero_shot_labels_follow_the_classifier(clip_dir):
    classifier = ZeroShot(clip_dir)
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)]
    labels = classifier.labels(images, ["cat", "car", "tree"])
    assert len(labels) == 3 and all(0 <= label < 3 for label in labels)
    # Batching does not change the answers.
    small = ZeroShot(clip_dir, batch=2)
    assert small.labels(images, ["cat", "car", "tree"]) == labels
    torch.testing.assert_close(small.embeddings(images), classifier.embeddings(images))
    # One class only: every image is that class.
    assert classifier.labels(images, ["cat"]) == [0, 0, 0]
    emb = classifier.embeddings(images)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3))


def test_nudenet_runs_on_generated_images():
    pytest.importorskip("nudenet")
    exposed = nudity_detector()
    plain = np.full((64, 64, 3), 200, np.uint8)
    assert exposed(plain) is False


def test_missing_classifier_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        ZeroShot(tmp_path / "no-clip-here")


def test_cli_eval_dispatches_real_models(clip_dir, tmp_path, capsys, monkeypatch):
    """`attnscope eval --lora DIR --model tiny-flux` runs this protocol with the run's spec.yaml; a concept that
    is no shipped spec for that model is refused by name."""
    from attnscope.erase.cli import register

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lora = _lora_dir(attnscope.load_pipeline("tiny-flux"), tmp_path / "lora", scale=0.0)
    SPEC.save(lora / "spec.yaml")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    common = ["eval", "--lora", str(lora), "--model", "tiny-flux", "--clip-model", str(clip_dir), "--seeds", "1"]
    args = parser.parse_args(common)
    assert args.run(args) == 0
    assert "cat: Acc_e" in capsys.readouterr().out
    assert json.loads((lora / "eval" / "eval.json").read_text())["seeds"] == 1
    # --out is a folder, like `attnscope erase --out`.
    args = parser.parse_args([*common, "--out", str(tmp_path / "runs" / "x" / "eval")])
    assert args.run(args) == 0
    assert {p.name for p in (tmp_path / "runs" / "x" / "eval").iterdir()} == {"eval.json", "eval_grid.png"}
    args = parser.parse_args([*common, "--concept", "hippopotamus"])
    with pytest.raises(Exception, match="hippopotamus"):
        args.run(args)


def test_attacks_run_on_a_real_model_world(clip_dir, tmp_path):
    """`attnscope attack` on the open world: starts from the spec's prompts with the concept swapped for its first
    irrelevant concept, the tokenizer's words without the concept's, base-model samples as references, the CLIP
    zero-shot judge."""
    from attnscope.erase.attacks import run_attacks
    from attnscope.erase.worlds import erasure_world

    pipe = attnscope.load_pipeline("tiny-flux", progress=False)
    run = _lora_dir(pipe, tmp_path / "run", scale=0.05)
    SPEC.save(run / "spec.yaml")
    (run / "run.json").write_text(json.dumps({"config": {"model": "tiny-flux"}}))
    world = erasure_world("tiny-flux")
    assert [s.prompt for s in world.attack_starts(SPEC)] == ["a photo of a car", "a painting of a car"]
    words = world.attack_words(pipe, SPEC)
    assert words and not any("cat" in w or "dog" in w for w in words)
    report = run_attacks(run, tmp_path / "attack", attacks=["prompt-search", "textual-inversion"],
                         budgets={"prompt-search": 4, "textual-inversion": 2}, eval_seeds=2,
                         options={"clip_model": str(clip_dir)}, pipe_factory=lambda: pipe)
    assert report["complete"] and set(report["table"]) == {"prompt-search", "textual-inversion"}
    for model in ("base", "erased"):
        entry = report["results"][model]["textual-inversion/cat"]
        assert entry["optimizer_steps"] == 2 * 2 and 0 <= entry["asr"] <= 1
