"""The shapes lab: how the bundled shapes models (``attnscope/shapes/weights``, ``weights-sd3``) were made.

Every run that made the bundle is recorded as a command in ``weights/training.json`` (``command``, and the chain of
``fine_tuned_from`` records), so the weights are reproducible from them with this package:

* ``model``: the pipeline's architecture, built offline (tokenizers, positional T5, tiny Flux transformer,
  pixel-space VAE, the re-noising sampler).
* ``train``: the trainer (``attnscope shapes train``): rectified flow on rendered scenes, EMA, checkpoints and
  resume, fine-tunes of an exported model; ``load_checkpoint_pipeline`` builds a pipeline from a checkpoint.
* ``grounding``: the token grounding loss on the captured attention.
* ``distill``: guidance distillation (``--distill-from``).
* ``preference``: preference sets of a model's own judged samples (``attnscope shapes preferences``) and the
  Diffusion-DPO loss (``--preference``).
* ``sd3`` / ``sd3_train``: the SD3-form model's architecture, started from the Flux model's blocks, and its
  trainer (``attnscope shapes train-sd3``): distillation of the Flux model's guided velocity through SD3's CFG.
* ``export``: a checkpoint (either architecture) as a diffusers folder with its record (``attnscope shapes export``).
* ``profile``: training checkpoints (``*.pt``) as a model profile, so ``attnscope.load_pipeline("run/ckpt.pt")``
  (and every command that loads through it, such as ``attnscope shapes eval --model run/ckpt.pt``) loads them.
* ``cli``: the lab's commands, added to ``attnscope shapes`` through the ``attnscope.commands`` entry point.

The lab imports the product (``attnscope``, its shapes world); nothing in the product imports the lab.
"""
