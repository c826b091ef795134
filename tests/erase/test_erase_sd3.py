"""Erasure, eval and attacks on SD3: the direct-call plumbing is the pipeline's, the LoRA lands on the text-side
projections of every joint block (SD3.5's ``attn2`` untouched), ``StableDiffusion3Pipeline.load_lora_weights``
loads it, and a LoRA made for the other architecture is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file

import attnscope
from attnscope.adapters import adapter_for
from attnscope.adapters.sd3 import SD3Call, unpatchify
from attnscope.erase import losses
from attnscope.erase.attacks import run_attacks
from attnscope.erase.cache import CacheConfig, EraseCache, maps_forward
from attnscope.erase.config import EraseConfig, LossWeights, fill_model_defaults, lora_settings_for
from attnscope.erase.lora import ARCHITECTURE_KEY, LoraFileError, LoraSettings, base_model, check_lora_file, load_lora
from attnscope.erase.methods import method_for
from attnscope.erase.sampling import PromptBank, sample_trajectory
from attnscope.erase.trainer import train
from attnscope.erase.worlds.shapes import shapes_spec
from attnscope.erase.worlds.shapes_eval import evaluate
from attnscope.lab.model import (
    ShapesModelConfig,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_text_encoders,
    build_vae,
)
from attnscope.lab.sd3 import SD3ShapesConfig, assemble_sd3_pipeline, build_clip_encoders, build_sd3_transformer
from attnscope.shapes import MAX_SEQUENCE_LENGTH
from attnscope.tiny import build_tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"batch": 3, "contrastive_rows": 1, "keep_rows": 1, "checkpoint_every": 2,
        "cache": CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=4)}


def small_shapes_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The SD3-form shapes layout (shapes tokenizers, positional T5, one-level VAE, 32×32) with small random
    weights whose CLIP token embeddings are not zero, so that every text position carries its word."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        flux_cfg = ShapesModelConfig(hidden_heads=2, head_dim=16, t5_d_ff=64)
        cfg = SD3ShapesConfig(joint_layers=2, hidden_heads=2, head_dim=16, clip_hidden=16)
        t5_tokenizer = build_t5_tokenizer()
        _, t5 = build_text_encoders(flux_cfg, t5_tokenizer, build_clip_tokenizer())
        clips = build_clip_encoders(cfg, build_clip_tokenizer())
        for clip in clips:
            torch.nn.init.normal_(clip.text_model.embeddings.token_embedding.weight, std=0.5)
        transformer = build_sd3_transformer(cfg, t5.config.d_model, 3)
        pipe = assemble_sd3_pipeline(cfg, transformer, clips, t5, t5_tokenizer, build_vae(flux_cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(**changes) -> EraseConfig:
    return EraseConfig(**{"model": "shapes", "steps": 4, **FAST, **changes})


@pytest.mark.parametrize("layout", ["sd3.5", "sd3"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sd3_call_samples_as_the_pipeline(layout: str, guidance_scale: float) -> None:
    """The cache's base-model samples are the latents StableDiffusion3Pipeline draws: its sigmas, its CFG batch."""
    options = {} if layout == "sd3.5" else {"dual_attention_layers": (), "qk_norm": None}
    pipe = build_tiny_sd3_pipeline(**options)
    pipe.set_progress_bar_config(disable=True)
    prompt, steps = "a red circle", 3
    expected = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=guidance_scale,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(5), output_type="latent").images
    call = SD3Call(pipe, 32, 32, guidance_scale=guidance_scale)
    assert call.n_tokens == 64 and call.wants_negative == (guidance_scale > 1)
    bank = PromptBank(call, pipe.tokenizer_max_length + 16)
    call.negative = bank.get([""]) if call.wants_negative else None
    embeds, pooled = bank.get([prompt])
    x1 = call.noise(1, torch.Generator().manual_seed(5))
    trajectory = sample_trajectory(call, pipe.transformer, x1, steps, embeds, pooled, bank.text_ids)
    torch.testing.assert_close(unpatchify(trajectory.states[-1], 2, 16, 16), expected.float(), atol=1e-5, rtol=1e-5)
    # White-box attacks encode from T5 input embeddings: the prompt's own give encode_prompt's conditioning.
    ids = call.token_ids([prompt], bank.length - call.embedding_offset)
    from_embeddings, pooled_again, _ = call.encode_token_embeddings(call.token_embedding()(ids), [prompt])
    torch.testing.assert_close(from_embeddings, embeds)
    torch.testing.assert_close(pooled_again, pooled)


@pytest.fixture(scope="module")
def sd3_red_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-red")
    train(small_shapes_sd3_pipeline(), [shapes_spec("red")], _config(model="shapes-sd3"), out, progress=False)
    return out


def test_an_sd3_erasure_lora_sits_on_every_joint_attention_projection_and_loads_with_diffusers(sd3_red_run) -> None:
    """The SD3-form shapes model's placement: every projection of every joint block's attention, the image side
    too, and the text embedder."""
    lora = sd3_red_run / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as opened:
        keys, metadata = set(opened.keys()), opened.metadata()
    assert metadata[ARCHITECTURE_KEY] == "sd3"
    blocks = {k.split(".")[2] for k in keys if k.startswith("transformer.transformer_blocks.")}
    modules = {k.removesuffix(".weight").rsplit(".", 1)[0].split(".attn.")[-1].removeprefix("transformer.")
               for k in keys}
    assert blocks == {"0", "1"} and modules == {
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "context_embedder"
    }
    pipe = small_shapes_sd3_pipeline()
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 4.5,
              "max_sequence_length": MAX_SEQUENCE_LENGTH, "output_type": "np"}
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(sd3_red_run))  # diffusers' own loader, no attnscope in between
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    checked = small_shapes_sd3_pipeline()
    load_lora(checked, sd3_red_run)
    through_attnscope = checked("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 0 and np.array_equal(after, through_attnscope)


def test_sd3_eval_runs_and_a_lora_of_the_other_architecture_is_refused(sd3_red_run, tmp_path) -> None:
    from test_erase_run import small_shapes_pipeline  # the Flux-form counterpart (pytest puts this folder on the path)

    evaluate(sd3_red_run, pipe_factory=small_shapes_sd3_pipeline, seeds=1, out=tmp_path / "report")
    data = json.loads((tmp_path / "report" / "eval.json").read_text())
    for key in ("acc_e", "acc_ir", "acc_g", "acc_ctx", "acc_implicit"):
        assert 0 <= data[key] <= 1
    with pytest.raises(LoraFileError, match="LoRA for sd3 models, not for this flux pipeline"):
        check_lora_file(small_shapes_pipeline(), sd3_red_run)
    flux_run = tmp_path / "flux-red"
    train(small_shapes_pipeline(), [shapes_spec("red")], _config(steps=2), flux_run, progress=False)
    with pytest.raises(LoraFileError, match="LoRA for flux models, not for this sd3 pipeline"):
        load_lora(small_shapes_sd3_pipeline(), flux_run)


@pytest.mark.parametrize("architecture", ["flux", "sd3"])
def test_the_attention_term_lowers_the_concepts_attention_at_all_its_positions(architecture: str, tmp_path) -> None:
    """Direction through the whole stack: training on the attention loss alone lowers the concept's attention, on
    Flux (T5 positions) and on SD3 (its CLIP and its T5 position)."""
    from test_erase_run import small_shapes_pipeline  # the Flux-form counterpart (pytest puts this folder on the path)

    pipe = small_shapes_pipeline() if architecture == "flux" else small_shapes_sd3_pipeline()
    config = _config(steps=6, lr=1e-2, schedule="joint", weights=LossWeights(esd=0, attention=1, flow=0, contrastive=0))
    adapter = adapter_for(pipe)
    call = adapter.model_call(pipe, 32, 32)
    bank = PromptBank(call, adapter.text_length(pipe, MAX_SEQUENCE_LENGTH))
    prompt = "a red circle"
    positions = bank.positions(prompt, "red")
    if architecture == "sd3":
        assert len(positions) == 2 and positions[0] < pipe.tokenizer_max_length <= positions[1]
    embeds, pooled = bank.get([prompt])
    x = call.noise(1, torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.7])

    def mass() -> float:
        with torch.no_grad():
            maps, keep = maps_forward(call, pipe.transformer, x, sigma, embeds, pooled, bank.text_ids, positions)
        return float(losses.attention_loss(maps, torch.ones(1, len(keep), dtype=torch.bool)))

    before = mass()
    train(pipe, [shapes_spec("red")], config, tmp_path, progress=False)
    after = mass()
    with base_model(pipe.transformer):
        assert mass() == pytest.approx(before)
    assert after < 0.9 * before


@pytest.mark.parametrize("method", ["uce", "esd", "ca", "fmn"])
def test_every_method_erases_on_tiny_sd3_into_a_lora_sd3_loads(method: str, tmp_path) -> None:
    pipe = attnscope.load_pipeline("tiny-sd3", progress=False)
    pipe.set_progress_bar_config(disable=True)
    spec = attnscope.erase.ConceptSpec(name="red", targets=["red"], synonyms=["crimson"], irrelevant=["blue"],
                                       prompts=["a red circle", "a photo of a red car"],
                                       preserve_prompts=["a blue circle"])
    config = EraseConfig(model="tiny-sd3", method=method, **({} if method == "uce" else {"steps": 2}),
                         **{k: v for k, v in FAST.items() if method != "uce" or k == "cache"})
    train(pipe, [spec], config, tmp_path, progress=False)
    fresh = attnscope.load_pipeline("tiny-sd3", progress=False)
    load_lora(fresh, tmp_path)
    assert fresh.transformer.transformer_blocks[0].attn2 is not None
    assert not any("attn2" in name for name, _ in fresh.transformer.named_modules() if "lora_A" in name)


def test_attacks_run_on_an_sd3_erasure(sd3_red_run, tmp_path) -> None:
    budgets = {"prompt-search": 4, "unlearndiff": 1, "soft-prompt": 1, "textual-inversion": 1}
    report = run_attacks(sd3_red_run, tmp_path / "attack", attacks=list(budgets), budgets=budgets, eval_seeds=1,
                         pipe_factory=small_shapes_sd3_pipeline)
    assert report["complete"] and set(report["table"]) == set(budgets)
    for model in ("base", "erased"):
        for attack in budgets:
            assert 0 <= report["results"][model][f"{attack}/red"]["asr"] <= 1


def test_lora_on_every_attention_projection_leaves_sd35s_image_only_attention_alone() -> None:
    transformer = build_tiny_sd3_pipeline().transformer  # SD3.5 layout: attn2 in block 0
    assert transformer.transformer_blocks[0].attn2 is not None
    settings = LoraSettings(targets=adapter_for(transformer).attention_projections, layers="all")
    names = settings.target_modules(transformer)
    assert names and not any(".attn2." in name for name in names)
    assert {name.split(".")[1] for name in names} == {"0", "1"} and any("to_add_out" in n for n in names)


@pytest.mark.parametrize(("model", "trains_embedder"), [("shapes-sd3", True), ("shapes", False)])
def test_training_every_attention_projection_keeps_the_text_embedder_the_profile_trains(model, trains_embedder) -> None:

    pipe = attnscope.load_pipeline(model, progress=False)
    defaults = attnscope.profile_for(model).erase_defaults
    assert ("context_embedder" in defaults.lora_targets) is trains_embedder
    names = {
        placement: lora_settings_for(method_for("eraseanything"), defaults, pipe, placement=placement)
        .target_modules(pipe.transformer)
        for placement in ("text", "attention")
    }
    assert ("context_embedder" in names["attention"]) is trains_embedder
    assert set(names["text"]) < set(names["attention"])
    assert any(n.endswith(".attn.to_q") for n in names["attention"])


@pytest.mark.parametrize(("model", "placement", "steps", "two"), [
    ("shapes-sd3", "attention", 450, (1200, 1e-3)), ("shapes", "text", 300, (400, 2e-3)),
])
def test_the_model_profile_chooses_where_the_lora_trains_and_for_how_many_steps(model, placement, steps, two) -> None:
    """What a run gets when not told: the SD3 model trains every attention projection and its text embedder for half
    as many steps again as the method's schedule, two concepts at its ``max_lr`` for proportionally more steps,
    their ESD pushes balanced and stopped past a margin; the Flux model the text side for the method's steps, two
    concepts at the faster rate, each at its own η. Text-side ``targets``, given or the method's own, mean the text
    placement; given, they refuse a wider one."""

    pipe = attnscope.load_pipeline(model, progress=False)
    filled = fill_model_defaults(EraseConfig(model=model), pipe)
    assert (filled.steps, filled.lr) == (steps, 1e-3)
    assert filled.lora.layers == ("all" if placement == "attention" else "double")
    names = filled.lora.target_modules(pipe.transformer)
    assert any(n.endswith(".attn.to_q") for n in names) is (placement == "attention")
    pair = fill_model_defaults(EraseConfig(model=model), pipe, concepts=2)
    assert (pair.steps, pair.lr) == two
    assert pair.balance_eta is (model == "shapes-sd3")
    assert fill_model_defaults(EraseConfig(model=model, balance_eta=False), pipe, concepts=2).balance_eta is False
    # The SD3 model stops ESD a quarter of a concept length past the anchor, for the methods that push by ESD.
    assert filled.esd_margin == (0.25 if model == "shapes-sd3" else None)
    assert fill_model_defaults(EraseConfig(model=model, esd_margin=math.inf), pipe).esd_margin == math.inf
    assert fill_model_defaults(EraseConfig(model=model, method="ca"), pipe).esd_margin is None
    # The SD3 model holds the velocity its CFG sampler follows for one concept, the conditional one for a pair.
    assert filled.erase_velocity == ("guided" if model == "shapes-sd3" else "conditional")
    assert pair.erase_velocity == "conditional"
    assert fill_model_defaults(EraseConfig(model=model, method="ca"), pipe).erase_velocity is None
    told = fill_model_defaults(EraseConfig(model=model, steps=7, lr=5e-4), pipe)
    assert (told.steps, told.lr) == (7, 5e-4)
    method, defaults = method_for("eraseanything"), attnscope.profile_for(model).erase_defaults
    paper = lora_settings_for(method, defaults, pipe, targets=("add_q_proj", "add_k_proj"))
    assert paper.layers == "double" and paper.targets == ("add_q_proj", "add_k_proj")
    uce = lora_settings_for(method_for("uce"), defaults, pipe)  # a method that names its projections keeps them
    assert uce.layers == "double" and uce.targets == ("add_k_proj", "add_v_proj")
    with pytest.raises(ValueError, match="--targets chooses the text-side projections; --train attention"):
        lora_settings_for(method, defaults, pipe, placement="attention", targets=("add_q_proj",))


def test_erasing_an_unsupported_architecture_names_the_supported_ones(tmp_path) -> None:
    from types import SimpleNamespace

    from attnscope.adapters import UnsupportedModelError

    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2))  # no MMDiT joint attention
    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel, SD3Transformer2DModel"):
        train(pipe, [shapes_spec("red")], _config(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_the_keep_loss_holds_the_velocity_the_guided_sampler_follows(guidance_scale, monkeypatch, tmp_path) -> None:
    """The sampler follows v_neg + w·(v − v_neg) under true CFG: ``guidance_gain`` is that w (1 without CFG). Each
    keep point is then two rows, its prompt and the negative prompt, aligned with the cached base velocities of
    both: the untrained LoRA (B = 0) gives a zero keep loss, which any misaligned row would not."""
    pipe = small_shapes_sd3_pipeline()
    call = SD3Call(pipe, 32, 32, guidance_scale=guidance_scale)
    bank = PromptBank(call, pipe.tokenizer_max_length + MAX_SEQUENCE_LENGTH)
    call.negative = bank.get([""]) if call.wants_negative else None
    embeds, pooled = bank.get(["a red circle"])
    x = call.noise(1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        followed, v, v_neg = call.sampling_velocity(pipe.transformer, x, torch.tensor([0.6]), embeds, pooled,
                                                    bank.text_ids)
    assert call.guidance_gain == guidance_scale
    if call.guided:
        torch.testing.assert_close(followed - v_neg, call.guidance_gain * (v - v_neg))
    else:
        torch.testing.assert_close(followed, v)

    seen: list[tuple[str, float, int]] = []
    guided, plain = losses.guided_velocity_loss, losses.velocity_matching_loss

    def guided_spy(v, v_negative, v_base, v_negative_base, scale):
        seen.append(("guided", scale, len(v_negative)))
        return guided(v, v_negative, v_base, v_negative_base, scale)

    def plain_spy(v, v_base):
        seen.append(("plain", 1.0, 0))
        return plain(v, v_base)

    monkeypatch.setattr(losses, "guided_velocity_loss", guided_spy)
    monkeypatch.setattr(losses, "velocity_matching_loss", plain_spy)
    weights = LossWeights(esd=0, attention=0, flow=0, contrastive=0, implicit=0, keep=1)
    result = train(pipe, [shapes_spec("red")], _config(steps=2, guidance_scale=guidance_scale, weights=weights,
                                                       batch=4, keep_rows=2), tmp_path, progress=False)
    expected = ("guided", guidance_scale, 2) if guidance_scale > 1 else ("plain", 1.0, 0)
    assert seen == [expected]
    assert result.final_losses["keep"] < 1e-10
    cache = torch.load(tmp_path / "cache.pt", weights_only=False)
    assert len(cache["keep_v_negative"]) == (len(cache["keep_x"]) if guidance_scale > 1 else 0)


def test_a_guided_erase_refers_each_row_to_its_own_points_negative_prompt_row(monkeypatch, tmp_path) -> None:
    """Under true CFG a guided erase runs each concept point through the negative prompt too and draws the implicit
    rows at the same points. The untrained LoRA (B = 0) gives every row its base velocity, so ESD must see exactly
    the cached conditional velocity and the implicit loss at η = 0 must be zero: a row referred to another point's
    negative row, or an implicit row misread from the prompt-major cache, would not be."""
    seen: list[float] = []
    esd = losses.esd_loss

    def esd_spy(v, v_base_concept, *args, **kwargs):
        seen.append(float((v.detach().float() - v_base_concept.float()).abs().max()))
        return esd(v, v_base_concept, *args, **kwargs)

    monkeypatch.setattr(losses, "esd_loss", esd_spy)
    weights = LossWeights(esd=1, attention=0, flow=0, contrastive=0, implicit=1, keep=0)
    config = _config(steps=1, guidance_scale=3.0, weights=weights, eta=0.0, batch=4, erase_velocity="guided")
    result = train(small_shapes_sd3_pipeline(), [shapes_spec("red")], config, tmp_path, progress=False)
    assert len(seen) == 1 and seen[0] < 1e-4
    assert result.final_losses["implicit"] < 1e-8
    cache = EraseCache.load(tmp_path / "cache.pt")
    assert cache.v_negative.shape == cache.x.shape
    # The negative prompt's rows are the concept points' own; the other prompts that name nothing stay implicit rows.
    names = list(dict.fromkeys(cache.implicit_prompts))
    assert names == ["and", "the", "a"] and cache.implicit_prompt_count == 3
    prompt_index = torch.tensor([names.index(p) for p in cache.implicit_prompts])
    rows = cache.implicit_rows(cache.implicit_point, prompt_index)
    assert torch.equal(rows, torch.arange(len(cache.implicit_point)))


def test_without_true_cfg_a_guided_erase_is_the_conditional_one(tmp_path) -> None:
    """Without a negative branch the sampler follows the conditional velocity: ``erase_velocity`` changes nothing,
    not even the cache."""
    weights = LossWeights(esd=1, attention=0, flow=0.1, contrastive=0, implicit=1, keep=1)
    for velocity in ("conditional", "guided"):
        train(small_shapes_sd3_pipeline(), [shapes_spec("red")],
              _config(steps=2, guidance_scale=1.0, weights=weights, erase_velocity=velocity), tmp_path / velocity,
              progress=False)
    conditional, guided = (load_file(str(tmp_path / v / "pytorch_lora_weights.safetensors"))
                           for v in ("conditional", "guided"))
    assert conditional.keys() == guided.keys() and all(torch.equal(conditional[k], guided[k]) for k in guided)
    cache = EraseCache.load(tmp_path / "guided" / "cache.pt")
    assert len(cache.v_negative) == 0 and "" in cache.implicit_prompts


