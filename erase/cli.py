"""``attnscope erase`` and ``attnscope eval``, registered through the ``attnscope.commands`` entry-point group.

    attnscope erase --concept red --out runs/erase-red            # shapes world, ~2 min on 2 CPU threads
    attnscope erase --concept red --method uce --out runs/uce-red   # a baseline: esd, ca, fmn, uce
    attnscope erase --concept red --concept blue --out runs/erase-red-blue   # several concepts in one LoRA
    attnscope erase --spec my_concept.yaml --model black-forest-labs/FLUX.1-dev --device cuda --out ...
    accelerate launch --multi_gpu --num_processes 4 -m attnscope.cli erase ... --device cuda   # data parallel
    attnscope eval --lora runs/erase-red                           # -> runs/erase-red/eval/eval.json, eval_grid.png
    attnscope attack --lora runs/erase-red                         # -> runs/erase-red/attack/attack.json, images/
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, get_args

from attnscope.profiles import LoraPlacement

from .adversary import ADVERSARIAL_STEPS
from .methods import method_for, method_names

__all__ = ["register", "run_attack", "run_erase", "run_eval"]


def _pairs(flag: str, cast: type, example: str) -> Any:
    """An argparse type for ``name=value,name=value`` (e.g. ``--weights esd=1,attention=0``) -> {name: cast(value)}."""

    def parse(text: str) -> dict[str, Any]:
        out = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = cast(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} wants {example} pairs, got {part!r}") from None
        return out

    return parse


_weights = _pairs("--weights", float, "name=value")
_budgets = _pairs("--budget", int, "attack=number (e.g. prompt-search=320)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _semicolons(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(";") if part.strip())


def _margin(text: str) -> float:
    """``--esd-margin``: a number of concept lengths, or ``off`` (never stop pushing)."""
    if text.strip().lower() == "off":
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of concept lengths or 'off', got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``erase`` and ``eval`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "erase",
        help="train a LoRA that erases a concept (EraseAnything by default; baselines with --method)",
        description=(
            "Train a LoRA on the model's text-side attention projections that stops it drawing the concept(s), "
            "also through synonyms, while preserving everything else (EraseAnything), or erase with a baseline "
            "method. Writes pytorch_lora_weights.safetensors (load with pipe.load_lora_weights(OUT)), spec.yaml "
            "and train_log.json to --out. Methods: " + "; ".join(f"{m.name}: {m.summary}" for m in _methods())
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--concept", action="append", default=[], help="concept to erase (repeatable); shapes world: "
                   "a colour or shape, else a shipped spec name")
    p.add_argument("--spec", type=Path, action="append", default=[], help="YAML concept spec file "
                   "(repeatable; see erase/README.md)")
    flags = p.add_argument_group(
        "spec flags", "override fields of the spec of a single --concept (or define one from scratch)"
    )
    flags.add_argument("--synonyms", type=_csv, default=None, help="comma-separated synonyms")
    flags.add_argument("--anchors", "--anchor", type=_csv, default=None, help="comma-separated words replacing the "
                       "concept in anchor prompts: the first one a prompt does not name (default: the world's; "
                       "none: drop it)")
    flags.add_argument("--irrelevant", type=_csv, default=None, help="comma-separated concepts to preserve")
    flags.add_argument("--prompts", type=_semicolons, default=None, help="';'-separated training prompts")
    flags.add_argument("--preserve-prompts", type=_semicolons, default=None, help="';'-separated preservation prompts")
    p.add_argument("--model", default="shapes", help="'shapes' (bundled), a shapes checkpoint *.pt, 'tiny-flux', "
                   "a hub id or a folder")
    p.add_argument("--method", default="eraseanything", help="erasure method: " + ", ".join(method_names()))
    p.add_argument("--train", choices=get_args(LoraPlacement), default=None, help="where the LoRA trains: "
                   "the text-side projections of the dual-stream attention (--targets), every projection of the "
                   "dual-stream attention, or of every attention layer; with the text embedder wherever the method "
                   "or the model profile trains it (default: the model profile's; attention on shapes-sd3, text "
                   "elsewhere)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, erase and preserve steps count one each "
                   "(default: the method's for the number of concepts, 300 per concept, eraseanything 400 for two "
                   "at twice the rate; 1.5 times that on shapes-sd3, whose rate is capped at 1e-3: 1200 for two)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the method's for the "
                   "number of concepts; 1e-3, eraseanything 2e-3 for two; at most 1e-3 on shapes-sd3)")
    p.add_argument("--batch", type=int, default=8, help="rows per erase step and per preserve step "
                   "(2 of which feed the contrastive loss)")
    p.add_argument("--keep-rows", type=int, default=3, help="preserve-step rows for the keep loss "
                   "(base velocities on preservation trajectories)")
    p.add_argument("--eta", type=float, default=None, help="ESD negative-guidance strength η in v*(c_anc) − "
                   "η·(v*(c) − v*(c_anc)), for every concept and the unasked path (default: a concept spec's own η, "
                   "else the model profile's: 1 as in the paper; shapes models 2, a shape word 1)")
    p.add_argument("--balance-eta", action=argparse.BooleanOptionalAction, default=None, help="several concepts: "
                   "raise each concept's η until its ESD push over the prompts naming it alone matches the "
                   "strongest concept's; a prompt naming several is pushed at the smallest of their η "
                   "(default: the model profile's; on for shapes-sd3, where a pair otherwise leaves the concept "
                   "whose prompts differ least from their anchors)")
    p.add_argument("--esd-margin", type=_margin, default=None, metavar="M", help="stop pushing a concept point by "
                   "ESD once its velocity is M concept lengths past its anchor's (0: at the anchor; off: pushed "
                   "towards ESD's target throughout; default: the model profile's: off, 0.25 on shapes-sd3); a "
                   "point whose η --balance-eta raised k-fold stops at M/k")
    p.add_argument("--erase-velocity", choices=("conditional", "guided"), default=None, help="under true CFG, "
                   "which velocity ESD and the implicit loss hold: each prompt's conditional velocity, or the guided "
                   "one the sampler follows (each concept point then also runs through the negative prompt: more "
                   "rows a step); the same without true CFG (default: the model profile's, for one concept or for "
                   "several; run.json records it)")
    p.add_argument("--attention-form", choices=("mass", "localized"), default=None, help="the attention term's "
                   "form: the mean attention mass on the concept's keys (default, at the paper's weight 1e-3), or "
                   "the share of the base model's localized concept map still on the concept (weight 1 is its "
                   "scale). The shapes models turn the term off: give it a weight with --weights attention=W")
    p.add_argument("--schedule", choices=("alternate", "joint"), default="alternate", help="alternate "
                   "erase/preserve steps, or both every step")
    p.add_argument("--weights", type=_weights, default={}, help="loss weights of the method's losses, e.g. "
                   "'esd=1,attention=1e-3,flow=0.1,contrastive=0.1,keep=20' (0 disables; the shapes models' "
                   "attention is 0)")
    p.add_argument("--targets", default=None, help="comma-separated text-side LoRA target modules of the dual-stream "
                   "attention, and context_embedder (the projection every text token enters through) (default: the "
                   "method's or the model profile's; add_q_proj,add_k_proj as in the paper, shapes models add "
                   "add_v_proj; uce edits add_k_proj,add_v_proj)")
    p.add_argument("--adversarial", type=int, nargs="?", const=ADVERSARIAL_STEPS, default=0, metavar="STEPS",
                   help="adversarial erasure (AdvUnlearn-style): STEPS soft-prompt attack steps against the model "
                   f"before each erase step, which then also trains on the attack's embeddings (bare flag: "
                   f"{ADVERSARIAL_STEPS}; trained methods but fmn)")
    p.add_argument("--sample-steps", type=int, default=8, help="sampler steps of the cached base-model trajectories")
    p.add_argument("--preserve-steps", type=int, default=20, help="sampler steps of the cached base-model "
                   "preservation samples")
    p.add_argument("--cache-seeds", type=int, default=4, help="base-model trajectories per training prompt")
    p.add_argument("--checkpoint-every", type=int, default=50, help="write checkpoint.pt every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward "
                   "(large models)")
    p.add_argument("--device", default="cpu", help="torch device; on cuda the model runs in bf16 (LoRA in fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core; "
                   "1 is faster on a machine busy with other jobs; a bit-identical resume needs the same count)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", type=Path, default=Path("runs/erase"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.set_defaults(run=run_erase, option_defaults={dest: p.get_default(dest) for dest in _method_options()})

    e = subparsers.add_parser(
        "eval",
        help="measure an erasure LoRA: Acc_e, Acc_ir, Acc_g, attention mass, image quality",
        description=(
            "Generate the model world's fixed prompt set with fixed seeds from the base model and with the LoRA, "
            "judge the images (shapes world: the scene reader; real models: CLIP zero-shot / NudeNet) and write "
            "eval.json (acc_e, acc_ir, acc_g, base figures) and a base-vs-erased eval_grid.png to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--lora", type=Path, required=True, help="folder written by `attnscope erase`")
    e.add_argument("--concept", action="append", default=[], help="erased concept(s) (default: the run's spec.yaml)")
    e.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    e.add_argument("--seeds", type=int, default=None, help="images per prompt, seeds 0..N-1 (default: the world's; "
                   "16 on the shapes world, 2 on real models)")
    e.add_argument("--clip-model", default=None, help="real models: CLIP zero-shot classifier, hub id or folder "
                   "(default openai/clip-vit-large-patch14)")
    e.add_argument("--device", default="cpu", help="torch device")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core; "
                   "1 is faster on a machine busy with other jobs)")
    e.add_argument("--out", type=Path, default=None, help="output folder for eval.json and eval_grid.png "
                   "(default: LORA/eval)")
    e.set_defaults(run=run_eval)

    a = subparsers.add_parser(
        "attack",
        help="attack an erasure LoRA: can prompts or embeddings bring the concept back? (ASR, base and erased)",
        description=(
            "Run the world's fixed attack protocol against the base model and the erased one: prompt-search (black "
            "box), unlearndiff (white box, discrete), soft-prompt (white box, continuous bound), textual-inversion "
            "(a learned new word). Writes attack.json (ASR per attack, concept and model; images, steps and "
            "seconds spent) and images/ of the successful attacks to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--lora", type=Path, required=True, help="folder written by `attnscope erase`")
    a.add_argument("--attack", action="append", default=[], help="attack to run (repeatable; default: all of "
                   "prompt-search, unlearndiff, soft-prompt, textual-inversion)")
    a.add_argument("--budget", type=_budgets, action="append", default=[], help="override the protocol budget: "
                   "attack=N (prompt-search: images; the others: optimiser steps), comma-separated or repeated")
    a.add_argument("--concept", action="append", default=[], help="erased concept(s) to attack (default: all of "
                   "the run's)")
    a.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    a.add_argument("--seeds", type=int, default=None, help="images per start on which the ASR is measured, seeds "
                   "0..N-1 (default 16)")
    a.add_argument("--clip-model", default=None, help="real models: CLIP zero-shot judge, hub id or folder")
    a.add_argument("--device", default="cpu", help="torch device")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a.add_argument("--out", type=Path, default=None, help="output folder (default: LORA/attack)")
    a.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    a.add_argument("--overwrite", action="store_true", help="replace attack.json in --out")
    a.set_defaults(run=run_attack)


def _methods() -> list[Any]:
    return [method_for(name) for name in method_names()]


def _method_options() -> set[str]:
    """Every option some method takes and another does not (argparse dests)."""
    methods = _methods()
    return set().union(*(m.options for m in methods)) - set.intersection(*(set(m.options) for m in methods))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_method_options(args: argparse.Namespace, method: Any) -> None:
    """Refuse options ``method`` does not take, and loss weights it does not have, naming what it uses."""
    if args.adversarial and method.adversarial_refusal:
        raise ValueError(f"--adversarial needs a method that can train on an attack's embeddings: {method.name} "
                         f"{method.adversarial_refusal}")
    given = [dest for dest, default in args.option_defaults.items()
             if dest not in method.options and getattr(args, dest) != default]
    if given:
        raise ValueError(f"--method {method.name} does not take {', '.join(_flag(d) for d in given)}; it takes "
                         f"{', '.join(sorted(_flag(d) for d in method.options))}")
    unknown = [name for name in args.weights if name not in method.losses]
    if unknown:
        raise ValueError(f"--method {method.name} has no loss {', '.join(unknown)}: its --weights are "
                         f"{', '.join(method.losses) or 'none (closed form)'}")


def _specs(args: argparse.Namespace) -> list[Any]:
    """Specs from --spec files and --concept names (resolved by the model's world); the spec flags override (or,
    with --prompts in an open-vocabulary world, define) the spec of a single --concept."""
    from .spec import ConceptSpec, UnknownConceptError, load_spec
    from .worlds import erasure_world

    overrides = {
        "synonyms": args.synonyms,
        "anchors": args.anchors,
        "irrelevant": args.irrelevant,
        "prompts": args.prompts,
        "preserve_prompts": args.preserve_prompts,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if given and len(args.concept) != 1:
        raise ValueError(f"--{next(iter(given)).replace('_', '-')} applies to exactly one --concept")
    specs = [s for path in args.spec for s in load_spec(path)]
    world = erasure_world(args.model)
    for concept in args.concept:
        try:
            spec = world.spec(concept)
        except UnknownConceptError:
            if not world.open_vocabulary or "prompts" not in given:
                raise
            spec = ConceptSpec(name=concept, targets=(concept,), prompts=given["prompts"])
        specs.append(spec.with_overrides(**given))
    if not specs:
        raise ValueError("nothing to erase: give --concept NAME or --spec FILE")
    if args.eta is not None:  # a number on the command line means every row, over a concept's own η
        specs = [s.with_overrides(eta=args.eta) for s in specs]
    return specs


def run_erase(args: argparse.Namespace) -> int:
    import torch

    import attnscope
    from attnscope.commands import CommandError
    from attnscope.profiles import profile_for

    from .cache import CacheConfig
    from .config import EraseConfig, lora_settings_for
    from .losses import LossWeights
    from .parallel import DataParallel
    from .trainer import NonFiniteLossError, train

    started = time.perf_counter()
    method = method_for(args.method)
    _check_method_options(args, method)
    specs = _specs(args)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    parallel = DataParallel.for_device(args.device)
    pipe = attnscope.load_pipeline(args.model, device=parallel.device(args.device), dtype=dtype, progress=False)
    defaults = profile_for(args.model).erase_defaults
    config = EraseConfig(
        model=args.model,
        method=method.name,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        batch=args.batch,
        keep_rows=args.keep_rows,
        schedule=args.schedule,
        eta=args.eta,
        balance_eta=args.balance_eta,
        esd_margin=args.esd_margin,
        erase_velocity=args.erase_velocity,
        weights=LossWeights(**{**vars(method.weights_for(defaults)), **args.weights}),
        lora=lora_settings_for(method, defaults, pipe, placement=args.train,
                               targets=_csv(args.targets) if args.targets else None, rank=args.rank),
        cache=CacheConfig(
            sample_steps=args.sample_steps, preserve_steps=args.preserve_steps, seeds=args.cache_seeds, seed=args.seed
        ),
        checkpoint_every=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        adversarial=args.adversarial,
        attention_form=args.attention_form,
        threads=args.threads,
    )
    if args.attention_form and not config.weights.attention:
        raise ValueError(f"--attention-form {args.attention_form} shapes the attention term, whose weight is 0 on "
                         f"{args.model} (off by default on the shapes models): add --weights attention=W")
    try:
        result = train(pipe, specs, config, args.out, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as err:  # not a bad input, but its message says all: print it as one line
        raise CommandError(str(err)) from err
    if not parallel.is_main:
        return 0
    done = f"{config.steps} steps" if method.trained else "closed form"
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.final_losses.items())
    losses = f"; final losses: {losses}" if losses else ""
    if config.balance_eta and len(result.etas) > 1:
        losses += "; ESD η balanced: " + ", ".join(
            f"{name} {eta:.3g}" + (f" (margin {result.margins[name]:.3g})" if result.margins else "")
            for name, eta in result.etas.items()
        )
    print(
        f"erased {', '.join(s.name for s in specs)} with {method.name} in {time.perf_counter() - started:.1f}s "
        f"({done}){losses}\nLoRA: {result.lora_path}  "
        f"(pipe.load_lora_weights({str(result.out)!r}); measure with: attnscope eval --lora {result.out})"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from .run import EVAL_DIR, read_run
    from .worlds import erasure_world

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.lora.is_dir():
        raise FileNotFoundError(f"{args.lora} does not exist: pass the --out folder of `attnscope erase`")
    run_model, run_specs = read_run(args.lora)
    model = args.model or run_model or "shapes"
    world = erasure_world(model)
    specs = [world.spec(c) for c in args.concept] if args.concept else run_specs
    if not specs:
        raise ValueError(f"{args.lora} has no spec.yaml: say which concept was erased with --concept")
    out = args.out or args.lora / EVAL_DIR
    report = world.evaluate(
        args.lora, specs, model, seeds=args.seeds or world.default_eval_seeds, out=out, device=args.device,
        options={"clip_model": args.clip_model},
    )
    print(f"{world.summary(report)} in {time.perf_counter() - started:.1f}s -> {out}/")
    return 0


def run_attack(args: argparse.Namespace) -> int:
    import torch

    from .attacks.protocol import DEFAULT_EVAL_SEEDS, run_attacks, summary

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets: dict[str, int] = {}
    for given in args.budget:
        budgets.update(given)
    report = run_attacks(
        args.lora, args.out, attacks=args.attack or None, budgets=budgets, concepts=args.concept or None,
        model=args.model, eval_seeds=args.seeds if args.seeds is not None else DEFAULT_EVAL_SEEDS,
        device=args.device, resume=args.resume, overwrite=args.overwrite, options={"clip_model": args.clip_model},
    )
    out = args.out or args.lora / "attack"
    print(f"{summary(report)}\nin {time.perf_counter() - started:.1f}s -> {out}/")
    return 0
