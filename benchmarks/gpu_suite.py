"""The GPU suite (issue 27): capture, erasure and attack costs on a FLUX.1-dev-size transformer, random init.

    bash benchmarks/gpu_suite.sh                     # on a GPU machine: full size, bf16 -> $OUT/gpu_suite.json
    python benchmarks/gpu_suite.py --scale tiny --device cpu --dtype float32 --json out.json   # the CPU dry run

No hub is reachable, and speed and memory do not depend on the weights, so every model is built from its
architecture's config with random weights: the transformer built directly on the device in its dtype (its buffers,
such as SD3's position table, computed by its own constructor), then an in-place init scaled by ``1/√fan_in`` so
activations stay finite through 57 blocks; around it the tiny text encoders, tokenizers and VAE of
``attnscope.tiny`` widened to the transformer's text width. Sections, each written to the JSON as soon as it ends
(a timeout keeps what finished; a section that fails records its error):

1. ``capture``: one transformer forward at ``size``² (1024² → 4,096 image tokens, 512 text tokens), unhooked, then
   with every layer captured on the fused and on the chunked path (a typical prompt's ``text_kept`` columns),
   interleaved; output identity, median time ratios, retained bytes against the README's formula
   ``N_img × T_kept × 4 × layers`` and peak-memory growth against the fused path's transient
   ``B × H × N_img × T_kept × 4`` bytes.
2. ``erasure``: ``attnscope.erase``'s trainer on that model (LoRA r8 on the default targets): one erase + preserve
   step pair and one plain LoRA flow-matching step, with gradient checkpointing on and off; seconds and peak memory.
3. ``attacks``: one ``unlearndiff`` and one ``soft-prompt`` optimiser step at that size (the attacks' own code; the
   progress check that would sample images returns at once).
4. ``sd3``: capture overhead of an SD3.5-large-size transformer, when ``--budget`` leaves time.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import attnscope

#: FLUX.1-dev's transformer config (without the fields left at diffusers' defaults).
FLUX_DEV = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                axes_dims_rope=(16, 56, 56), guidance_embeds=True)
#: Stable Diffusion 3.5 large's transformer config.
SD35_LARGE = dict(num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, in_channels=16, out_channels=16,
                  patch_size=2, sample_size=128, pos_embed_max_size=192, qk_norm="rms_norm")


@dataclass(frozen=True)
class Scale:
    flux: dict[str, Any]
    sd3: dict[str, Any]
    size: int  # image side in pixels
    text_len: int  # max_sequence_length
    text_kept: int  # captured text columns (a typical prompt's tokens)
    text_dim: int  # T5 width = joint_attention_dim
    repeats: int
    erase_batch: int
    vae_channels: tuple[int, ...] = (4, 8, 8, 8)  # four levels: a factor-8 VAE as FLUX.1's
    latent_channels: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


SCALES = {
    "full": Scale(flux=FLUX_DEV, sd3=SD35_LARGE, size=1024, text_len=512, text_kept=16, text_dim=4096, repeats=3,
                  erase_batch=2),
    "tiny": Scale(flux=dict(num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                            axes_dims_rope=(4, 6, 6), guidance_embeds=True),
                  sd3=dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                           caption_projection_dim=16, pooled_projection_dim=32, in_channels=4, out_channels=4,
                           patch_size=2, sample_size=8, pos_embed_max_size=16, qk_norm="rms_norm"),
                  size=64, text_len=32, text_kept=8, text_dim=32, repeats=2, erase_batch=2, latent_channels=4),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _random_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter in place on its device: matrices ~ N(0, 1/fan_in), vectors (norms, biases) as a trained
    model's start (norm scales 1, biases 0)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def _on_device(cls: type, config: dict[str, Any], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A model of ``cls(**config)`` allocated once, on ``device`` in ``dtype`` (never a float32 copy first).

    Built by its own constructor rather than on ``meta`` + ``to_empty``: that leaves buffers (SD3's ``pos_embed``)
    as uninitialized memory, whose garbage made the SD3 output NaN in some runs and not in others."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    return _random_init(model.to(dtype), seed=0).eval()


def flux_pipeline(scale: Scale, device: str, dtype: torch.dtype) -> Any:
    """A FluxPipeline: the FLUX.1-dev-size transformer and tiny text encoders / VAE of the same widths."""
    from diffusers import FluxTransformer2DModel

    from attnscope.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(text_dim=scale.text_dim, vae_block_out_channels=scale.vae_channels,
                                    latent_channels=scale.latent_channels, guidance_embeds=True)
    config = {**scale.flux, "in_channels": 4 * scale.latent_channels, "joint_attention_dim": scale.text_dim,
              "pooled_projection_dim": scale.text_dim}
    pipe.transformer = _on_device(FluxTransformer2DModel, config, device, dtype)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_inputs(transformer: Any, size: int, text_len: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    h = w = size // 16  # packed tokens of a factor-8 VAE's latent
    g = torch.Generator().manual_seed(0)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)),
                                         indexing="ij"), -1).reshape(-1, 3)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(1, h * w, cfg.in_channels, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype) if cfg.guidance_embeds else None,
        "img_ids": img_ids.to(device, dtype),
        "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        "return_dict": False,
    }


def _sd3_inputs(transformer: Any, size: int, text_len: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    cfg = transformer.config
    side = size // 8
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, cfg.in_channels, side, side, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, 77 + text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        "timestep": torch.tensor([500.0], device=device, dtype=dtype),
        "return_dict": False,
    }


def capture_section(transformer: Any, inputs: dict[str, Any], text_kept: int, repeats: int, device: str,
                    offset: int = 0) -> dict[str, Any]:
    """Unhooked vs every layer captured (fused, chunked): identity, time ratios, retained and transient memory.
    ``offset``: text position of the first kept column (SD3's text follows its 77 CLIP positions)."""
    positions = list(range(offset, offset + text_kept))
    traces = {path: attnscope.trace(transformer, path=path, positions=positions) for path in ("fused", "chunked")}

    def plain() -> Any:
        return transformer(**inputs)

    result: dict[str, Any] = {}
    with torch.inference_mode():
        _reset_peak(device)
        reference = plain()[0]
        plain_peak = _peak(device)
        finite = bool(torch.isfinite(reference).all())  # NaN != NaN: identity means nothing without it
        identical = {}
        peaks = {}
        for path, tr in traces.items():
            _reset_peak(device)
            with tr:
                identical[path] = bool(torch.equal(plain()[0], reference))
            peaks[path] = _peak(device)
        times: dict[str, list[float]] = {"plain": [], "fused": [], "chunked": []}
        for _ in range(repeats):
            times["plain"].append(_timed(plain, device))
            for path, tr in traces.items():
                with tr:
                    times[path].append(_timed(plain, device))
    layers = len(traces["fused"].layers)
    n_image = traces["fused"].generations[-1].grid[0] * traces["fused"].generations[-1].grid[1]
    heads = max(m.heads for m in transformer.modules() if hasattr(m, "heads") and isinstance(m.heads, int))
    per_forward = [g for g in traces["fused"].generations if g.forwards]
    result.update({
        "layers": layers,
        "image_tokens": n_image,
        "text_kept": text_kept,
        "finite": finite,
        "identical": identical,
        "plain_ms": round(1000 * statistics.median(times["plain"]), 2),
        "fused_ratio": round(statistics.median(t / p for t, p in zip(times["fused"], times["plain"])), 4),
        "chunked_ratio": round(statistics.median(t / p for t, p in zip(times["chunked"], times["plain"])), 4),
        "retained_bytes_per_forward": traces["fused"].retained_bytes // sum(g.forwards for g in per_forward),
        "retained_formula": n_image * text_kept * 4 * layers,
        "plain_peak_bytes": plain_peak,
        "hooked_peak_bytes": peaks,
        "transient_formula_fused": heads * n_image * text_kept * 4,
    })
    return result


def erasure_section(pipe: Any, scale: Scale, device: str) -> dict[str, Any]:
    """One erase + preserve step pair and one plain LoRA flow-matching step, gradient checkpointing on and off."""
    out: dict[str, Any] = {"batch": scale.erase_batch}
    for checkpointing in (True, False):
        key = "checkpointing" if checkpointing else "no_checkpointing"
        try:
            out[key] = _erase_steps(pipe, scale, device, checkpointing)
        except Exception as err:  # an out-of-memory run is a result, not the end of the suite
            out[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        finally:
            _remove_lora(pipe)
            _reset_peak(device)
    return out


def _erase_steps(pipe: Any, scale: Scale, device: str, checkpointing: bool) -> dict[str, Any]:
    from attnscope.erase.cache import CacheConfig
    from attnscope.erase.config import EraseConfig, LossWeights
    from attnscope.erase.spec import ConceptSpec
    from attnscope.erase.trainer import Trainer

    spec = ConceptSpec(name="red", targets=("red",), anchors=("blue",), irrelevant=("green", "yellow"),
                       prompts=("a red circle",), preserve_prompts=("a blue square",))
    config = EraseConfig(
        model="tiny-flux", height=scale.size, width=scale.size, max_sequence_length=scale.text_len,
        batch=scale.erase_batch, contrastive_rows=1, keep_rows=1, steps=4, checkpoint_every=10**6,
        cache=CacheConfig(sample_steps=2, preserve_steps=2, seeds=1, contrastive_points=2, batch=2),
        gradient_checkpointing=checkpointing, guidance_scale=3.5,
    )
    trainer = Trainer(pipe, [spec], config, Path(tempfile.mkdtemp(prefix="gpu-suite-")))
    started = time.perf_counter()
    trainer.prepare_cache(None)
    cache_s = time.perf_counter() - started
    full = trainer.config
    plain_config = replace(full, schedule="joint",
                           weights=LossWeights(esd=0, attention=0, flow=1, contrastive=0, keep=0, implicit=0))

    def pair() -> None:
        trainer.step = 0
        trainer.train_step()
        trainer.train_step()

    def plain() -> None:
        trainer.config = plain_config
        trainer.train_step()
        trainer.config = full

    pair(), plain()  # warm-up
    _reset_peak(device)
    pair_s = [_timed(pair, device) for _ in range(scale.repeats)]
    pair_peak = _peak(device)
    _reset_peak(device)
    plain_s = [_timed(plain, device) for _ in range(scale.repeats)]
    plain_peak = _peak(device)
    return {
        "cache_s": round(cache_s, 2),
        "pair_s": round(statistics.median(pair_s), 4),
        "plain_s": round(statistics.median(plain_s), 4),
        "ratio": round(statistics.median(pair_s) / statistics.median(plain_s), 3),
        "pair_peak_bytes": pair_peak,
        "plain_peak_bytes": plain_peak,
    }


def _remove_lora(pipe: Any) -> None:
    from attnscope.erase.lora import ADAPTER_NAME

    transformer = pipe.transformer
    if getattr(transformer, "peft_config", None) and ADAPTER_NAME in transformer.peft_config:
        transformer.delete_adapters(ADAPTER_NAME)
    transformer.disable_gradient_checkpointing()
    transformer.eval()


def attack_section(pipe: Any, scale: Scale, device: str) -> dict[str, Any]:
    """One optimiser step of ``unlearndiff`` and of ``soft-prompt`` through the full-size model."""
    from attnscope.adapters import adapter_for
    from attnscope.erase.attacks.base import REFERENCE_BATCH, AttackContext
    from attnscope.erase.attacks.registry import get_attack
    from attnscope.erase.spec import ConceptSpec
    from attnscope.erase.worlds import AttackStart

    class NoDrawContext(AttackContext):
        def success_rate(self, conditioning: Any, seeds: Any = ()) -> float:  # no images: the step is measured
            return 0.0

    call = adapter_for(pipe).model_call(pipe, scale.size, scale.size, guidance_scale=3.5)
    spec = ConceptSpec(name="red", targets=("red",), anchors=("blue",))
    start = AttackStart(prompt="a blue circle", concept_prompt="a red circle", word="red", swap="blue")
    g = torch.Generator().manual_seed(0)
    references = {start.prompt: torch.randn(REFERENCE_BATCH, call.n_tokens, call.channels, generator=g).to(
        device, pipe.transformer.dtype)}
    context = NoDrawContext(pipe, call, {"max_sequence_length": scale.text_len}, spec, lambda images, s: [False],
                            ["red", "blue", "green", "circle", "square"], references)
    # REFERENCE_BATCH rows at 4,096 image tokens keep every block's activations for the embeddings' gradient:
    # hundreds of GB through 57 blocks unless the blocks recompute them.
    out: dict[str, Any] = {"gradient_checkpointing": True, "reference_batch": REFERENCE_BATCH}
    pipe.transformer.enable_gradient_checkpointing()
    try:
        for name in ("unlearndiff", "soft-prompt"):
            try:
                step = functools.partial(get_attack(name).run, context, start, budget=1, seed=0)
                step()  # warm-up
                _reset_peak(device)
                seconds = [_timed(step, device) for _ in range(scale.repeats)]
                out[name] = {"step_s": round(statistics.median(seconds), 4), "peak_bytes": _peak(device)}
            except Exception as err:
                out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            finally:
                _reset_peak(device)
    finally:
        pipe.transformer.disable_gradient_checkpointing()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; the SD3 section runs only if "
                        "at least a fifth of it is left")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/gpu_suite.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    scale, dtype = SCALES[args.scale], getattr(torch, args.dtype)
    import diffusers

    result: dict[str, Any] = {
        "scale": args.scale, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "machine": platform.node(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }

    def section(name: str, run: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception:
            result[name] = {"error": traceback.format_exc(limit=3).strip().splitlines()[-1]}
        result[name]["seconds"] = round(time.perf_counter() - t0, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"{name}: {json.dumps(result[name])}", flush=True)

    t0 = time.perf_counter()
    flux = flux_pipeline(scale, args.device, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["flux_params"] = sum(p.numel() for p in flux.transformer.parameters())
    inputs = _flux_inputs(flux.transformer, scale.size, scale.text_len, args.device, dtype)
    section("capture", functools.partial(capture_section, flux.transformer, inputs, scale.text_kept, scale.repeats,
                                         args.device))
    section("erasure", functools.partial(erasure_section, flux, scale, args.device))
    section("attacks", functools.partial(attack_section, flux, scale, args.device))
    flux = inputs = None  # the FLUX model leaves the device before the SD3 one arrives
    _reset_peak(args.device)
    if time.perf_counter() - started < 0.8 * args.budget:
        from diffusers import SD3Transformer2DModel

        def sd3() -> dict[str, Any]:
            transformer = _on_device(SD3Transformer2DModel, scale.sd3, args.device, dtype)
            inputs = _sd3_inputs(transformer, scale.size, scale.text_len, args.device, dtype)
            return capture_section(transformer, inputs, scale.text_kept, scale.repeats, args.device, offset=77)

        section("sd3", sd3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
