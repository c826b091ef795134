"""Interactive explorer apps (installed as attnscope.apps).

* ``explorer``: the app's logic as plain functions — request → traced generation → overlays, grids, base-vs-LoRA
  comparisons, download files. No Gradio: usable from notebooks and tests.
* ``ui``: the Gradio Blocks layout and its event wiring (``build_demo``, ``launch``).
* ``cli``: ``attnscope app`` (registered through the ``attnscope.commands`` entry-point group).
"""
