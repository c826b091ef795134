"""Model profiles and architecture adapters: the two registries that hold every model- and architecture-specific
fact, and the one-line errors for models that cannot be found."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel

import attnscope
from attnscope.adapters import UnsupportedModelError, adapter_for, register_adapter, supported
from attnscope.adapters.flux import FluxAdapter
from attnscope.profiles import (
    PAPER_ETA,
    PAPER_LORA_TARGETS,
    ModelNotFoundError,
    ModelProfile,
    PretrainedFacts,
    PretrainedProfile,
    profile_for,
    register_pretrained,
    register_profile,
)
from attnscope.shapes.profile import SHAPES_WORLD, ShapesProfile
from attnscope.shapes.vocabulary import OutOfVocabularyError


def test_builtin_profiles_carry_their_model_facts() -> None:
    shapes = profile_for("shapes")
    assert isinstance(shapes, ShapesProfile) and shapes.world is SHAPES_WORLD
    assert shapes.erase_defaults.eta == 2.0 and "add_v_proj" in shapes.erase_defaults.lora_targets
    assert shapes.erase_defaults.attention_weight == 0  # EraseAnything's attention term: off on the shapes models
    sd3 = profile_for("shapes-sd3")
    assert sd3.erase_defaults.lora_targets[-1] == "context_embedder" and sd3.erase_defaults.eta == 2.0
    assert shapes.default_call()["num_inference_steps"] == 20
    with pytest.raises(OutOfVocabularyError, match="'dog'"):
        shapes.check_call("a red dog", 32, 32)
    tiny = profile_for("tiny-flux")
    assert tiny.erase_defaults.eta == PAPER_ETA and tiny.erase_defaults.lora_targets == PAPER_LORA_TARGETS
    assert tiny.erase_defaults.attention_weight is None  # the method's own: the paper's
    assert tiny.default_call()["height"] == 32
    tiny.check_call("anything at all", 17, 3)  # a stand-in for a real model: no vocabulary, no size rule


def test_an_exported_shapes_folder_is_a_shapes_model(tmp_path) -> None:
    """A folder with the lab's export record (training.json) gets the profile of the bundled shapes model with its
    transformer class; any other diffusers folder is a pretrained model, described by that class."""
    from attnscope.shapes import bundled_path

    assert profile_for(str(bundled_path())).name == "shapes"
    # An export is claimed by the bundled model of its architecture, whose erasure defaults differ.
    for name in ("shapes", "shapes-sd3"):
        export = tmp_path / f"{name}-export"
        export.mkdir()
        for record in ("model_index.json", "training.json"):
            (export / record).write_text((bundled_path(name) / record).read_text())
        profile = profile_for(str(export))
        assert isinstance(profile, ShapesProfile) and profile.name == name
        assert profile.erase_defaults == profile_for(name).erase_defaults
    assert profile_for(str(tmp_path / "shapes-export")).erase_defaults != profile.erase_defaults
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    profile = profile_for(str(plain))
    assert isinstance(profile, PretrainedProfile) and profile.erase_defaults.eta == PAPER_ETA


def test_pretrained_facts_are_keyed_by_transformer_class(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WeirdTransformer"]}))
    monkeypatch.setattr("attnscope.profiles._PRETRAINED", {})
    register_pretrained("WeirdTransformer", PretrainedFacts(default_call=lambda: {"num_inference_steps": 3}))
    assert profile_for(str(folder)).default_call() == {"num_inference_steps": 3}


def test_a_registered_profile_claims_its_names(monkeypatch) -> None:
    class Doubled(ModelProfile):
        name = "tiny-flux-x2"

        def load(self, name_or_path, *, dtype=None, **kwargs):
            return attnscope.load_pipeline("tiny-flux")

        def default_call(self, pipe=None):
            return {"num_inference_steps": 4}

    monkeypatch.setattr("attnscope.profiles._PROFILES", list(__import__("attnscope.profiles").profiles._PROFILES))
    register_profile(Doubled())
    assert profile_for("tiny-flux-x2").default_call() == {"num_inference_steps": 4}
    assert isinstance(attnscope.load_pipeline("tiny-flux-x2").transformer, FluxTransformer2DModel)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nonexistent",
         "neither a model attnscope knows (shapes, shapes checkpoint (*.pt), shapes-sd3, "
         "shapes-sd3 checkpoint (*.pt), tiny-flux, tiny-sd3)"),
        ("black-forest-labs/FLUX.1-dev", "nor in the hub cache, and HF_HUB_OFFLINE is set: download it once"),
    ],
)
def test_a_model_that_cannot_be_found_is_one_line(model: str, message: str, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        attnscope.load_pipeline(model)
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline"):
        attnscope.load_pipeline(str(tmp_path))
    # The command line prints it as one line, with no traceback.
    out = subprocess.run([sys.executable, "-m", "attnscope.cli", "maps", "--model", model, "--prompt", "a cat",
                          "--words", "cat", "--out", str(tmp_path / "maps")], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == out.stderr.strip().splitlines()[-1:]
    assert message in out.stderr


def test_adapters_are_found_by_transformer_class() -> None:
    flux = attnscope.load_pipeline("tiny-flux")
    assert isinstance(adapter_for(flux), FluxAdapter) and isinstance(adapter_for(flux.transformer), FluxAdapter)
    assert {"FluxTransformer2DModel", "SD3Transformer2DModel"} <= set(supported().split(", "))
    with pytest.raises(UnsupportedModelError, match="attnscope supports"):
        adapter_for(torch.nn.Linear(2, 2))


def test_a_new_architecture_is_one_registration(monkeypatch) -> None:
    """An adapter registered for a transformer class serves that class (and its subclasses) everywhere: here a
    subclass of Flux's transformer gets its own adapter without touching any other module."""
    monkeypatch.setattr("attnscope.adapters._REGISTRY", dict(__import__("attnscope.adapters").adapters._REGISTRY))

    class MyTransformer(FluxTransformer2DModel):
        pass

    @register_adapter(MyTransformer)
    class MyAdapter(FluxAdapter):
        name = "mine"

    pipe = attnscope.load_pipeline("tiny-flux")
    pipe.transformer.__class__ = MyTransformer
    assert isinstance(adapter_for(pipe), MyAdapter)
    with attnscope.trace(pipe, layers="double") as tr:
        pipe("a red circle", num_inference_steps=1, height=32, width=32, max_sequence_length=32)
    assert tr.maps().word("red").numpy().shape[-2:] == (8, 8)
