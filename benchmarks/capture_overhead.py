"""Capture overhead: hooked / unhooked transformer forward time, and retained memory.

    python benchmarks/capture_overhead.py                 # shapes model at 16/256/1024 image tokens
                                                          #   + one FLUX.1-dev block
    python benchmarks/capture_overhead.py --skip-real     # without the (slow, 1.3 GB) real-size block
    python benchmarks/capture_overhead.py --device cuda   # on a GPU (CUDA fused kernels)

Method: the same inputs are run unhooked, hooked on the fused path and hooked on the chunked path, interleaved
(plain, fused, chunked, plain, ...) so that machine noise hits all three alike; the ratio is the median over
repeats of hooked time / the neighbouring unhooked time. All layers are captured, heads averaged, every text
token of a typical prompt kept (``--text-kept``). Results print as a markdown table and go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

import attnscope


def _inputs(transformer: FluxTransformer2DModel, grid: tuple[int, int], text_len: int, device: str) -> dict[str, Any]:
    cfg = transformer.config
    h, w = grid
    g = torch.Generator().manual_seed(0)
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1
    )
    return {
        "hidden_states": torch.randn(1, h * w, cfg.in_channels, generator=g).to(device),
        "encoder_hidden_states": torch.randn(1, text_len, cfg.joint_attention_dim, generator=g).to(device),
        "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim, device=device),
        "timestep": torch.tensor([0.5], device=device),
        "img_ids": img_ids.reshape(-1, 3).to(device),
        "txt_ids": torch.zeros(text_len, 3, device=device),
        "return_dict": False,
    }


def _timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    transformer: FluxTransformer2DModel, grid: tuple[int, int], text_len: int, text_kept: int, repeats: int, device: str
) -> dict[str, Any]:
    kwargs = _inputs(transformer, grid, text_len, device)
    positions = list(range(text_kept))
    traces = {path: attnscope.trace(transformer, path=path, positions=positions) for path in ("fused", "chunked")}

    def plain() -> Any:
        return transformer(**kwargs)

    def hooked_time(path: str) -> float:
        # Installing and removing the processors is a one-off per trace, not per forward: time the forward only.
        with traces[path]:
            return _timed(plain, device)

    with torch.inference_mode():
        reference = plain()[0]
        for path in traces:  # warm-up, and the output-identity check at this size
            with traces[path]:
                assert torch.equal(plain()[0], reference), f"{path} path changed the output"
        times: dict[str, list[float]] = {"plain": [], "fused": [], "chunked": []}
        for _ in range(repeats):
            times["plain"].append(_timed(plain, device))
            times["fused"].append(hooked_time("fused"))
            times["chunked"].append(hooked_time("chunked"))
    ratios = {
        path: statistics.median(t / p for t, p in zip(times[path], times["plain"])) for path in ("fused", "chunked")
    }
    layers = len(traces["fused"].layers)
    retained = traces["fused"].retained_bytes // len(traces["fused"].generations)
    return {
        "image_tokens": grid[0] * grid[1],
        "text_tokens": text_len,
        "text_kept": text_kept,
        "layers": layers,
        "plain_ms": 1000 * statistics.median(times["plain"]),
        "fused_ratio": ratios["fused"],
        "chunked_ratio": ratios["chunked"],
        # bytes kept per forward (one step): N_img × T_kept × 4 × layers
        "retained_bytes_per_step": retained,
        "retained_formula": grid[0] * grid[1] * text_kept * 4 * layers,
    }


def small_transformer(device: str) -> tuple[FluxTransformer2DModel, str]:
    """The bundled shapes model's transformer."""
    from attnscope.shapes import bundled_path

    model = FluxTransformer2DModel.from_pretrained(bundled_path(), subfolder="transformer").to(device).eval()
    return model, f"shapes model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"


def real_block(device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """One double-stream block at FLUX.1-dev's real dimensions (random weights, nothing downloaded)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=0,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            in_channels=64,
            axes_dims_rope=(16, 56, 56),
        )
    model = model.to_empty(device=device)
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(0)
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.02)
    return model.to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--text-len", type=int, default=32, help="text sequence length for the small model")
    parser.add_argument("--text-kept", type=int, default=12, help="text tokens kept (a typical prompt's)")
    parser.add_argument("--skip-real", action="store_true", help="skip the FLUX.1-dev-size block")
    parser.add_argument("--real-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/capture_overhead.json"))
    args = parser.parse_args()

    rows = []
    small, name = small_transformer(args.device)
    for side in (4, 16, 32):
        row = measure(small, (side, side), args.text_len, args.text_kept, args.repeats, args.device)
        rows.append({"model": name, **row})
        print(rows[-1], flush=True)
    if not args.skip_real:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        block = real_block(args.device, dtype)
        row = measure(block, (64, 64), 512, 20, args.real_repeats, args.device)
        rows.append({"model": f"FLUX.1-dev double block ({dtype})".replace("torch.", ""), **row})
        print(rows[-1], flush=True)

    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    )
    report = {"device": device_name, "torch": torch.__version__, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\ndevice: {device_name}, torch {torch.__version__}\n")
    print("| model | image tokens | text (kept) | layers | unhooked ms | fused × | chunked × | retained / step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['image_tokens']} | {r['text_tokens']} ({r['text_kept']}) | {r['layers']} | "
            f"{r['plain_ms']:.1f} | {r['fused_ratio']:.3f} | {r['chunked_ratio']:.3f} | "
            f"{r['retained_bytes_per_step'] / 1024:.1f} KiB |"
        )


if __name__ == "__main__":
    main()
