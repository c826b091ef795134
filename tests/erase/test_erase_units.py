"""Erasure building blocks: concept specs, the losses (value and gradient direction), the LoRA file format."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from attnscope.erase import losses
from attnscope.erase.lora import (
    LoraFileError,
    LoraSettings,
    add_lora,
    base_model,
    load_lora,
    save_lora,
)
from attnscope.erase.spec import (
    ConceptNotInPromptError,
    ConceptSpec,
    SpecError,
    UnknownConceptError,
    load_spec,
)
from attnscope.erase.worlds import erasure_world
from attnscope.erase.worlds.open import shipped_specs
from attnscope.erase.worlds.shapes import shapes_spec
from attnscope.shapes import vocabulary as vocab
from attnscope.tiny import (
    TINY_FLUX_CALL_KWARGS,
    TINY_SD3_CALL_KWARGS,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("word", [*vocab.COLORS, *vocab.SHAPES])
def test_shapes_spec_for_every_concept(word: str) -> None:
    spec = shapes_spec(word)
    assert spec.synonyms == vocab.SYNONYMS[word]
    assert word not in spec.irrelevant and spec.irrelevant
    spec.check_prompts()  # every training prompt names the concept, no preservation prompt does
    for prompt in (*spec.prompts, *spec.preserve_prompts):
        vocab.check_prompt(prompt)  # the model was trained on these words only
    assert all(word not in vocab.words_of(spec.anchor_prompt(p)) for p in spec.prompts)
    # Two-object preservation scenes, none naming an object pair the shapes evaluation asks for (held out).
    from attnscope.erase.worlds.shapes import TWO_OBJECT_PRESERVATION
    from attnscope.shapes.metrics import TWO_OBJECT_PROMPTS

    pairs = [frozenset(vocab.parse_prompt(p)) for p in spec.preserve_prompts if len(vocab.parse_prompt(p)) == 2]
    assert len(pairs) == len(set(pairs)) == TWO_OBJECT_PRESERVATION
    assert not set(pairs) & {frozenset(vocab.parse_prompt(p)) for p in TWO_OBJECT_PROMPTS}


def test_unknown_concept_suggests_close_words() -> None:
    shapes = erasure_world("shapes")
    with pytest.raises(UnknownConceptError, match="did you mean 'red'"):
        shapes.spec("redd")
    with pytest.raises(UnknownConceptError, match="synonym of 'red'"):
        shapes.spec("crimson")
    with pytest.raises(UnknownConceptError, match="'nudity'"):
        erasure_world("black-forest-labs/FLUX.1-dev").spec("nudty")
    with pytest.raises(UnknownConceptError, match="'purple'"):
        shapes.check_words(None, ["purple"])
    # Suggestions are distinct words (the vocabulary lists each concept under several keys).
    with pytest.raises(UnknownConceptError, match=r"did you mean 'azure', 'square', 'circle'\?"):
        shapes.spec("purple")


def test_unknown_word_for_tokenizer() -> None:
    pipe = build_tiny_flux_pipeline(0)
    tiny = erasure_world("tiny-flux")
    tiny.check_words(pipe, ["red", "crimson"])
    with pytest.raises(UnknownConceptError, match="does not know the word"):
        tiny.check_words(pipe, ["日本"])


def test_concept_absent_from_training_prompt() -> None:
    spec = ConceptSpec(name="red", targets=("red",), prompts=("a red circle", "a blue square"))
    with pytest.raises(ConceptNotInPromptError, match="'a blue square' does not contain the concept 'red'"):
        spec.check_prompts()
    with pytest.raises(SpecError, match="erased word"):
        ConceptSpec(
            name="red", targets=("red",), synonyms=("crimson",), preserve_prompts=("a crimson box",)
        ).check_prompts()


def test_spec_yaml_roundtrip_and_shipped_specs(tmp_path) -> None:
    spec = shapes_spec("circle")
    spec.save(tmp_path / "s.yaml")
    assert load_spec(tmp_path / "s.yaml") == [spec]
    (tmp_path / "bad.yaml").write_text("name: x\ntargets: [x]\ncolour: red\n")
    with pytest.raises(SpecError, match="unknown key"):
        load_spec(tmp_path / "bad.yaml")
    # A key given twice is refused, not silently the last one (an added ``eta`` above a saved ``eta: null``).
    (tmp_path / "twice.yaml").write_text("- name: x\n  eta: 1\n  targets: [x]\n  eta: null\n")
    twice = r"twice.yaml: not valid YAML \(the key 'eta' is given twice in one mapping, line 4\)$"
    with pytest.raises(SpecError, match=twice):
        load_spec(tmp_path / "twice.yaml")
    assert {"nudity", "van-gogh", "parachute"} <= set(shipped_specs())
    for path in shipped_specs().values():
        for shipped in load_spec(path):
            shipped.check_prompts()
            assert shipped.synonyms and shipped.irrelevant and shipped.preserve_prompts


# ------------------------------------------------------------------------------------------------ losses
def _sgd(param: torch.Tensor, loss_fn, lr: float) -> tuple[float, float]:
    before = loss_fn()
    before.backward()
    with torch.no_grad():
        param -= lr * param.grad
    param.grad = None
    return float(before.detach()), float(loss_fn().detach())


def test_esd_loss_moves_towards_negative_guidance_target() -> None:
    g = torch.Generator().manual_seed(0)
    v_c, v_anc = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    target = losses.esd_target(v_c, v_anc, eta=1.0)
    torch.testing.assert_close(target, 2 * v_anc - v_c)  # v_anc - 1·(v_c - v_anc)
    v = v_c.clone().requires_grad_(True)  # the model starts where the base model is
    before, after = _sgd(v, lambda: losses.esd_loss(v, v_c, v_anc), lr=10.0)
    assert after < before
    # The velocity moved away from the concept direction (v_c - v_anc).
    direction = (v_c - v_anc).flatten()
    assert torch.dot((v.detach() - v_c).flatten(), direction) < 0


def test_esd_margin_stops_pushing_a_row_once_it_is_past_its_anchor() -> None:
    g = torch.Generator().manual_seed(0)
    v_c, v_anc = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    d = v_c - v_anc
    # Progress along the concept direction: 1 at the base model, 0 at the anchor, -η at ESD's target.
    target = losses.esd_target(v_c, v_anc, 2.0)
    for v, expected in ((v_c, 1.0), (v_anc, 0.0), (target, -2.0), (v_anc - 0.1 * d, -0.1)):
        torch.testing.assert_close(losses.esd_progress(v, v_c, v_anc), torch.full((3,), expected))
    # Row 0 at the base model, row 1 a tenth past its anchor, row 2 half past it; margin 0.25 pushes rows 0 and 1.
    v = torch.stack([v_c[0], v_anc[1] - 0.1 * d[1], v_anc[2] - 0.5 * d[2]]).requires_grad_(True)
    losses.esd_loss(v, v_c, v_anc, 2.0, margin=0.25).backward()
    alone = v.detach().clone().requires_grad_(True)
    losses.esd_loss(alone, v_c, v_anc, 2.0).backward()
    assert torch.equal(v.grad[:2], alone.grad[:2]) and not v.grad[2].any() and alone.grad[2].any()
    # Without a margin, or with an infinite one (`--esd-margin off`), it is the plain regression to ESD's target.
    for margin in (None, math.inf):
        assert torch.equal(losses.esd_loss(v, v_c, v_anc, 2.0, margin=margin), F.mse_loss(v, target))


def test_esd_pushes_each_concept_point_with_its_concepts_eta() -> None:
    from types import SimpleNamespace

    from attnscope.erase.methods.rows import concept_eta, named_concepts, point_etas, push_sizes, run_etas

    g = torch.Generator().manual_seed(0)
    v_c, v_anc = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    eta = torch.tensor([1.0, 2.0, 0.5]).view(-1, 1, 1)
    per_row = torch.stack([losses.esd_target(v_c[i], v_anc[i], float(e)) for i, e in enumerate(eta.flatten())])
    assert torch.equal(losses.esd_target(v_c, v_anc, eta), per_row)
    # A run erasing a colour (the run's η) and a shape (its own) at once; points index the cache's concept column.
    # Red's points differ from their anchors by 3 per element, circle's by 1 and 2: pushes 9 and 2.5 per unit η,
    # and circle's alone (over "a green circle", the one of its prompts naming no red) 1.
    anchor = torch.zeros(4, 5, 4)
    concept = anchor + torch.tensor([3.0, 1.0, 2.0, 3.0]).view(-1, 1, 1)
    prompts = ["a red square", "a green circle", "a red circle", "a red triangle"]
    cache = SimpleNamespace(concept=torch.tensor([0, 1, 1, 0]), v_concept=concept, v_anchor=anchor, prompts=prompts)
    specs = [shapes_spec("red"), shapes_spec("circle")]
    torch.testing.assert_close(push_sizes(cache, 2), torch.tensor([9.0, 2.5]))
    assert named_concepts(specs, prompts).tolist() == [[True, False], [False, True], [True, True], [True, False]]
    torch.testing.assert_close(push_sizes(cache, 2, torch.tensor([True, True, False, True])), torch.tensor([9.0, 1.0]))
    own = run_etas(specs, cache, 2.0, balance=False)
    assert own.tolist() == [2.0, 1.0]
    assert point_etas(specs, cache, own, balance=False).tolist() == [2.0, 1.0, 1.0, 2.0]  # each point its concept's
    trainer = SimpleNamespace(cache=cache, point_etas=point_etas(specs, cache, own, balance=False),
                              transformer=SimpleNamespace(device=torch.device("cpu")))
    assert concept_eta(trainer, torch.tensor([3, 1, 0])).flatten().tolist() == [2.0, 1.0, 2.0]
    # Balanced, circle's push over the points naming it alone is raised to red's (η²·push 36 for both: η 6), and
    # red keeps its η; "a red circle", which names both, is pushed at the smaller η, red's.
    balanced = run_etas(specs, cache, 2.0, balance=True)
    torch.testing.assert_close(balanced, torch.tensor([2.0, 6.0]))
    assert point_etas(specs, cache, balanced, balance=True).tolist() == [2.0, 6.0, 2.0, 2.0]
    red_only = SimpleNamespace(concept=torch.zeros(4, dtype=torch.long), v_concept=concept, v_anchor=anchor,
                               prompts=prompts)
    assert run_etas(specs[:1], red_only, 2.0, balance=True).tolist() == [2.0]  # one concept: its own
    # A concept whose every prompt names another is balanced over all its points.
    shared = SimpleNamespace(concept=torch.tensor([0, 1]), v_concept=concept[[0, 2]], v_anchor=anchor[:2],
                             prompts=["a red square", "a red circle"])
    torch.testing.assert_close(run_etas(specs, shared, 2.0, balance=True), torch.tensor([2.0, 3.0]))
    with pytest.raises(SpecError, match="'eta' must be a positive number"):
        ConceptSpec(name="red", targets=("red",), eta=0)
    with pytest.raises(SpecError, match="'eta' must be a positive number"):
        ConceptSpec.from_dict({"name": "red", "eta": "strong"})


def test_a_point_whose_eta_the_balance_raised_stops_nearer_its_anchor() -> None:
    from types import SimpleNamespace

    from attnscope.erase.methods.rows import concept_margin, point_etas, point_margins, run_etas

    # Red (the run's η 2) and circle (its spec's η 1): red's points differ from their anchors by 3, circle's by 1.
    anchor = torch.zeros(4, 5, 4)
    concept = anchor + torch.tensor([3.0, 1.0, 1.0, 3.0]).view(-1, 1, 1)
    cache = SimpleNamespace(concept=torch.tensor([0, 1, 1, 0]), v_concept=concept, v_anchor=anchor,
                            prompts=["a red square", "a green circle", "a red circle", "a red triangle"])
    specs = [shapes_spec("red"), shapes_spec("circle")]
    own = run_etas(specs, cache, 2.0, balance=False)
    assert point_margins(specs, cache, 2.0, 0.25, point_etas(specs, cache, own, balance=False)).tolist() == [0.25] * 4
    # Balanced, circle's η is raised 1 → 6 and its own point stops a sixth as far past its anchor; "a red circle",
    # pushed at red's η 2, twice circle's own, half as far; red's points keep the margin.
    balanced = point_etas(specs, cache, run_etas(specs, cache, 2.0, balance=True), balance=True)
    margins = point_margins(specs, cache, 2.0, 0.25, balanced)
    torch.testing.assert_close(margins, torch.tensor([0.25, 0.25 / 6, 0.125, 0.25]))
    trainer = SimpleNamespace(point_margins=margins, transformer=SimpleNamespace(device=torch.device("cpu")))
    torch.testing.assert_close(concept_margin(trainer, torch.tensor([1, 0])), torch.tensor([0.25 / 6, 0.25]))
    for margin in (None, math.inf):  # no margin: every point pushed throughout
        assert point_margins(specs, cache, 2.0, margin, balanced) is None
        assert concept_margin(SimpleNamespace(point_margins=None), torch.tensor([0])) is None
    # A margin per row is the same loss as one margin where the rows share it.
    g = torch.Generator().manual_seed(0)
    v, v_c, v_anc = (torch.randn(4, 5, 4, generator=g) for _ in range(3))
    assert torch.equal(losses.esd_loss(v, v_c, v_anc, 2.0, margin=torch.full((4,), 0.25)),
                       losses.esd_loss(v, v_c, v_anc, 2.0, margin=0.25))


def test_attention_loss_lowers_concept_mass() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 5, generator=g).requires_grad_(True)  # (B, H, N, T kept of S=5 keys)
    columns = torch.tensor([[True, False, False, False, False], [False, True, True, False, False]])

    def loss():
        probs = torch.softmax(logits, dim=-1)
        return losses.attention_loss([probs, probs.mean(dim=1)], columns)

    before, after = _sgd(logits, loss, lr=5.0)
    assert 0 < after < before <= 1
    probs = torch.softmax(torch.randn(1, 3, 4), -1)
    assert losses.attention_mass(probs, torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_localized_attention_loss_is_the_share_of_the_base_map_left_and_lowers_it_where_the_concept_lives() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 5, generator=g).requires_grad_(True)  # (B, H, N, T)
    columns = torch.tensor([[True, False, False, False, False], [False, True, True, False, False]])
    base = losses.concept_map([torch.softmax(logits.detach(), dim=-1)], columns)  # (B, N)
    assert base.shape == (2, 6)

    def loss():
        return losses.localized_attention_loss([torch.softmax(logits, dim=-1)], columns, base)

    assert loss().item() == pytest.approx(1.0)  # unedited: all of the base model's map is left
    start = torch.softmax(logits.detach(), dim=-1)
    before, after = _sgd(logits, loss, lr=5.0)
    assert 0 < after < before
    # The drop is largest where the base model looked at the concept most.
    drop = base - losses.concept_map([torch.softmax(logits.detach(), dim=-1)], columns)
    assert all(drop[b, base[b].argmax()] >= drop[b, base[b].argmin()] for b in range(2))
    zero = torch.zeros_like(start)
    assert losses.localized_attention_loss([zero], columns, base).item() == 0


def test_flow_matching_loss_direction() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    assert losses.flow_matching_loss(noise - x0, x0, noise).item() == 0
    v = torch.zeros(2, 5, 4, requires_grad=True)
    before, after = _sgd(v, lambda: losses.flow_matching_loss(v, x0, noise), lr=10.0)
    assert after < before


def test_the_referred_velocity_is_the_one_the_guided_sampler_follows_with_the_negative_branch_held() -> None:
    g = torch.Generator().manual_seed(0)
    v, v_negative, v_negative_base = (torch.randn(2, 4, 3, generator=g).requires_grad_() for _ in range(3))
    w = 4.5
    referred = losses.referred_velocity(v, v_negative, v_negative_base, w)
    # Through the base negative branch it gives exactly the image the adapted model's two branches give.
    torch.testing.assert_close(v_negative_base + w * (referred - v_negative_base), v_negative + w * (v - v_negative))
    referred.sum().backward()
    assert v_negative.grad is None and v_negative_base.grad is None
    torch.testing.assert_close(v.grad, torch.ones_like(v))
    torch.testing.assert_close(losses.referred_velocity(v, v_negative, v_negative_base, 1.0), v.float())


def test_the_guided_keep_loss_is_the_error_of_the_velocity_the_sampler_follows() -> None:
    g = torch.Generator().manual_seed(0)
    v_base, v_negative_base, e = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    w = 4.5
    # The negative branch gives up e and the conditional branch makes up for it: the guided sum is unchanged.
    moved = losses.guided_velocity_loss(v_base + (w - 1) / w * e, v_negative_base + e, v_base, v_negative_base, w)
    assert moved.item() == pytest.approx(0, abs=1e-10)
    # An error of the conditional branch alone reaches the image w-fold; at w = 1 it is the plain keep loss.
    alone = losses.guided_velocity_loss(v_base + e, v_negative_base, v_base, v_negative_base, w)
    torch.testing.assert_close(alone, w**2 * losses.velocity_matching_loss(v_base + e, v_base))
    unguided = losses.guided_velocity_loss(v_base + e, v_negative_base + e, v_base, v_negative_base, 1.0)
    torch.testing.assert_close(unguided, losses.velocity_matching_loss(v_base + e, v_base))


def test_velocity_matching_loss_pulls_to_the_base_velocity() -> None:
    target = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    assert losses.velocity_matching_loss(target.clone(), target).item() == 0
    v = torch.zeros(2, 5, 4, requires_grad=True)
    before, after = _sgd(v, lambda: losses.velocity_matching_loss(v, target), lr=10.0)
    assert after < before
    assert torch.allclose(v.detach() / v.detach().norm(), target / target.norm(), atol=1e-5)  # straight towards it


def test_contrastive_loss_pulls_to_irrelevant_and_pushes_from_synonyms() -> None:
    g = torch.Generator().manual_seed(0)
    n = 16
    positives = torch.nn.functional.normalize(torch.rand(2, 3, n, generator=g), dim=-1)
    negatives = torch.nn.functional.normalize(torch.rand(2, 2, n, generator=g), dim=-1)
    raw = torch.rand(2, n, generator=g).requires_grad_(True)
    pos_mask = torch.tensor([[True, True, False], [True, True, True]])  # a padded slot must not count

    def loss():
        anchor = torch.nn.functional.normalize(raw, dim=-1)
        return losses.contrastive_loss(anchor, positives, negatives, 0.07, pos_mask)

    def sims():
        a = torch.nn.functional.normalize(raw.detach(), dim=-1)
        pos = torch.einsum("bn,bkn->bk", a, positives)[pos_mask].mean()
        neg = torch.einsum("bn,bsn->bs", a, negatives).mean()
        return pos, neg

    pos0, neg0 = sims()
    before, after = _sgd(raw, loss, lr=0.05)
    pos1, neg1 = sims()
    assert after < before and pos1 > pos0 and neg1 < neg0
    with pytest.raises(ValueError, match="at least one positive"):
        losses.contrastive_loss(raw, positives, negatives, positive_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_attention_features_are_unit_norm_and_sum_multi_piece_words() -> None:
    probs = torch.rand(1, 4, 3)
    f = losses.attention_features([probs], torch.tensor([[True, True, False]]))
    torch.testing.assert_close(f, torch.nn.functional.normalize(probs[0, :, :2].sum(-1), dim=0)[None])


# ------------------------------------------------------------------------------------------------ LoRA file
def _image(pipe, call=TINY_FLUX_CALL_KWARGS) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images


def _nudged_lora(transformer, settings: LoraSettings) -> None:
    """Add the adapter and move every LoRA matrix off its start, so the adapted model differs from the base."""
    with torch.no_grad():
        for p in add_lora(transformer, settings):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    pipe = build_tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    _nudged_lora(pipe.transformer, LoraSettings(rank=4))
    folder = tmp_path_factory.mktemp("lora")
    save_lora(pipe.transformer, folder, LoraSettings(rank=4))
    return pipe, folder


def test_saved_lora_reloads_exactly_in_a_fresh_pipeline(trained_lora) -> None:
    pipe, folder = trained_lora
    erased = _image(pipe)
    with base_model(pipe.transformer):
        base_again = _image(pipe)
    fresh = build_tiny_flux_pipeline(0)
    fresh.set_progress_bar_config(disable=True)
    base = _image(fresh)
    torch.testing.assert_close(base_again, base, rtol=0, atol=0)  # adapter disabled = the base model
    fresh.load_lora_weights(folder)
    assert torch.equal(_image(fresh), erased)
    assert not torch.equal(erased, base)


def test_lora_targets_only_dual_stream_text_projections() -> None:
    pipe = build_tiny_flux_pipeline(0)
    names = LoraSettings().target_modules(pipe.transformer)
    assert names == [f"transformer_blocks.{b}.attn.{m}" for b in range(2) for m in ("add_q_proj", "add_k_proj")]
    assert LoraSettings(blocks=(1,), targets=("add_q_proj",)).target_modules(pipe.transformer) == [
        "transformer_blocks.1.attn.add_q_proj"
    ]
    with pytest.raises(ValueError, match="match"):
        LoraSettings(targets=("nonexistent",)).target_modules(pipe.transformer)


@pytest.mark.parametrize(("build", "call"), [(build_tiny_flux_pipeline, TINY_FLUX_CALL_KWARGS),
                                             (build_tiny_sd3_pipeline, TINY_SD3_CALL_KWARGS)], ids=["flux", "sd3"])
def test_a_lora_on_the_text_embedder_reloads_exactly_with_diffusers(build, call, tmp_path) -> None:
    """``context_embedder`` as a target puts the adapter on the one projection every text token enters through, beside
    the attention projections named with it; diffusers' own loader gives back the same images on Flux and SD3 from a
    LoRA that sits there alone (so its effect is the embedder's)."""
    pipe = build(0)
    names = LoraSettings(targets=("add_q_proj", "context_embedder")).target_modules(pipe.transformer)
    assert names[-1] == "context_embedder" and names[:-1] and all(n.endswith("attn.add_q_proj") for n in names[:-1])
    settings = LoraSettings(rank=4, targets=("context_embedder",))
    _nudged_lora(pipe.transformer, settings)
    save_lora(pipe.transformer, tmp_path, settings)
    assert set(load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))) == {
        "transformer.context_embedder.lora_A.weight", "transformer.context_embedder.lora_B.weight"}
    erased, base = _image(pipe, call), _image(build(0), call)
    fresh = build(0)
    fresh.load_lora_weights(tmp_path)
    assert torch.equal(_image(fresh, call), erased) and not torch.equal(erased, base)


def test_corrupt_or_mismatched_lora_is_refused(trained_lora, tmp_path) -> None:
    _, folder = trained_lora
    pipe = build_tiny_flux_pipeline(0)
    with pytest.raises(LoraFileError, match="no LoRA"):
        load_lora(pipe, tmp_path)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        load_lora(pipe, tmp_path)
    wider = build_tiny_flux_pipeline(0, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    with pytest.raises(LoraFileError, match="does not fit this model"):
        load_lora(wider, folder)


def test_multi_concept_anchor_names_no_erased_concept() -> None:
    from attnscope.erase.cache import multi_anchor_prompt

    specs = [shapes_spec("red"), shapes_spec("circle")]
    # The first anchor: another colour (shape) replaces the erased one, the same at every point of a prompt.
    assert multi_anchor_prompt(specs[:1], 0, "a red circle") == "a green circle"
    assert specs[0].anchor_prompt("a red circle") == "a green circle"
    # Not an anchor the prompt names already: "green" would make two green objects, which the model draws alike.
    assert multi_anchor_prompt(specs[:1], 0, "a red circle and a green square") == "a blue circle and a green square"
    assert specs[0].anchor_prompt("a red circle and a green square") == "a blue circle and a green square"
    two = multi_anchor_prompt(specs, 0, "a red circle and a green circle")
    assert two == "a blue square and a green square"
    assert multi_anchor_prompt(specs, 1, "a red circle") == "a green square"
    # No anchor names another erased concept: with red and green erased, green's anchors skip red.
    both = [shapes_spec("red"), shapes_spec("green")]
    assert multi_anchor_prompt(both, 1, "a green circle") == "a blue circle"
    assert multi_anchor_prompt(both, 0, "a red circle and a blue square") == "a yellow circle and a blue square"
    dark = ConceptSpec(name="red", targets=("red",), anchors=("dark red",), prompts=("a red car",))
    assert multi_anchor_prompt([dark], 0, "a red car") == "a dark red car"  # an anchor may contain the word
    dropped = ConceptSpec(name="red", targets=("red",), prompts=("a red car",))
    assert multi_anchor_prompt([dropped], 0, "a red car") == "a car"
    # The one-anchor form of a YAML spec.
    assert ConceptSpec.from_dict({"name": "red", "anchor": "kite"}).anchors == ("kite",)
    assert ConceptSpec.from_dict({"name": "red", "anchor": None}).anchors == ()


def test_default_lora_targets_and_eta_per_model() -> None:
    from attnscope.profiles import PAPER_LORA_TARGETS, profile_for

    def eta(model: str) -> float:
        return profile_for(model).erase_defaults.eta

    def targets(model: str) -> tuple[str, ...]:
        return profile_for(model).erase_defaults.lora_targets

    assert eta("black-forest-labs/FLUX.1-dev") == eta("tiny-flux") == 1.0
    assert eta("shapes") == eta("runs/shapes-train/ckpt.pt") == 2.0
    # On the shapes models a shape's own η is gentler; a colour takes the model's.
    assert [shapes_spec(w).eta for w in vocab.SHAPES] == [1.0] * len(vocab.SHAPES)
    assert {shapes_spec(w).eta for w in vocab.COLORS} == {None}

    assert targets("black-forest-labs/FLUX.1-dev") == PAPER_LORA_TARGETS == ("add_q_proj", "add_k_proj")
    assert targets("tiny-flux") == PAPER_LORA_TARGETS
    assert targets("shapes") == targets("runs/shapes-train/ckpt.pt") == (*PAPER_LORA_TARGETS, "add_v_proj")
    # The SD3-form shapes model's LoRA also sits on its text embedder; its η is the Flux-form model's.
    assert targets("shapes-sd3") == (*targets("shapes"), "context_embedder") and eta("shapes-sd3") == 2.0


# ------------------------------------------------------------------------------------- shapes eval protocol
def test_eval_prompts_name_the_concept_more_than_once_and_not_at_all() -> None:
    from attnscope.erase.worlds.shapes_eval import shapes_prompts

    red = shapes_prompts([shapes_spec("red")])
    assert red["erased"][:5] == ["a red circle", "a red square", "a red triangle",
                                 "a red circle and a green square", "a red square and a blue triangle"]
    assert "a red circle, a red square, a red triangle" in red["erased"]
    assert any("red" in p and "crimson" in p for p in red["erased"])  # mixed with a synonym
    assert max(len(vocab.parse_prompt(p)) for p in red["synonym"]) == 3
    assert all(not any(vocab.is_color(w) for w in vocab.words_of(p)) for p in red["implicit"])
    assert "" in red["implicit"] and "with" in red["implicit"]
    triangle = shapes_prompts([shapes_spec("triangle")])
    assert all(not any(vocab.is_shape(w) for w in vocab.words_of(p)) for p in triangle["implicit"])
    # Two concepts: an implicit prompt of one never names the other (that is the other's erased prompt).
    both = shapes_prompts([shapes_spec("red"), shapes_spec("circle")])
    named = {"red", "crimson", "scarlet", "circle", "disc", "orb"}
    assert both["implicit"] and not any(set(vocab.words_of(p)) & named for p in both["implicit"])


def test_context_counts_everything_but_the_erased_attribute() -> None:
    from types import SimpleNamespace

    from attnscope.erase.worlds.shapes_eval import context_correct

    def objects(*pairs):
        return [SimpleNamespace(color=c, shape=s) for c, s in pairs]

    prompt = "a red circle and a blue square"
    assert context_correct(prompt, objects(("green", "circle"), ("blue", "square")), ["red"])
    assert context_correct(prompt, objects(("blue", "square"), ("red", "circle")), ["red"])  # Acc_e's business
    assert not context_correct(prompt, objects(("blue", "square"), ("blue", "square")), ["red"])  # circle lost
    assert not context_correct(prompt, objects(("blue", "square")), ["red"])  # count
    assert not context_correct(prompt, objects(("green", "circle"), ("blue", "triangle")), ["red"])
    assert context_correct("a crimson circle", objects(("yellow", "circle"),), ["red"])  # synonyms too
    assert context_correct(prompt, objects(("red", "triangle"), ("blue", "square")), ["circle"])
    assert context_correct("a red circle", objects(("blue", "square"),), ["red", "circle"])  # anything at all


def test_eval_summary_line_names_every_headline_figure() -> None:
    figures = {"acc_e": 0.0, "acc_g": 0.0, "acc_ir": 0.98, "acc_ctx": 0.5, "acc_implicit": 0.75}
    report = {**figures, "acc_ir_relative": 1.0, "concepts": ["red"], "quality": {"pixel_mae": 0.01},
              "base": {**figures, "acc_e": 1.0}}
    line = erasure_world("shapes").summary(report)
    assert line.startswith("red: Acc_e 0.0% (base 100.0%)") and "Acc_ctx 50.0% (base 50.0%)" in line
    assert "Acc_implicit 75.0%" in line and "\n" not in line


def test_implicit_loss_pushes_along_the_concept_minus_its_anchor_only() -> None:
    """Unconditional ESD moves the prompt that names nothing by -η·(v(concept) − v(anchor)): what the concept prompt
    shares with its anchor (the other words) does not move it."""
    g = torch.Generator().manual_seed(0)
    v_here, shared, concept_only = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    v_concept, v_anchor = shared + concept_only, shared
    target = v_here - 2.0 * concept_only
    assert losses.implicit_loss(target, v_here, v_concept, v_anchor, eta=2.0) < 1e-12
    assert losses.implicit_loss(v_here, v_here, v_concept, v_anchor, eta=2.0) > 1
    # With nothing separating the concept from its anchor, the target is the base velocity itself.
    assert losses.implicit_loss(v_here, v_here, shared, shared, eta=2.0) == 0


def test_the_eval_can_score_seeds_it_never_draws(one_thread) -> None:
    """``score_model(first_seed=...)`` draws exactly the images of those seeds (how recipes are chosen off the
    eval's own seeds), and the eval's default is seeds from 0."""
    import numpy as np

    import attnscope
    from attnscope.erase.worlds.shapes_eval import score_model
    from attnscope.shapes.generate import generate

    pipe = attnscope.load_pipeline("shapes", progress=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = {"erased": ["a red circle"], "synonym": [], "irrelevant": [], "implicit": []}
    spec = [shapes_spec("red")]
    _, held_out = score_model(pipe, prompts, spec, seeds=2, label="held out", first_seed=7)
    _, default = score_model(pipe, prompts, spec, seeds=1, label="eval")
    assert all(np.array_equal(a, b) for a, b in zip(held_out["a red circle"], generate(pipe, "a red circle", [7, 8])))
    assert np.array_equal(default["a red circle"][0], generate(pipe, "a red circle", [0])[0])
    assert not np.array_equal(default["a red circle"][0], held_out["a red circle"][0])
