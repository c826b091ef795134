"""``attnscope attack``: how well does an erased concept resist being brought back?

Four attacks, one module each, registered by name (:func:`register_attack`):

* ``prompt-search`` (:mod:`.prompt_search`): black box, a genetic search over the allowed words;
* ``unlearndiff`` (:mod:`.unlearndiff`): white box, discrete prompt words optimised through the model's loss;
* ``soft-prompt`` (:mod:`.soft_prompt`): white box, the text conditioning itself (an upper bound);
* ``textual-inversion`` (:mod:`.textual_inversion`): white box, a learned new word for the concept.

:mod:`.protocol` runs them against the base model and the erased one and writes ``attack.json``;
:mod:`.base` holds what they share. From Python::

    from attnscope.erase.attacks import run_attacks
    report = run_attacks("runs/erase-red", "runs/erase-red/attack", attacks=["prompt-search"])
"""

from __future__ import annotations

from .base import Attack, AttackContext, Conditioning, SearchOutcome
from .protocol import ATTACK_FILE, ATTACK_PROTOCOL_VERSION, run_attacks
from .registry import UnknownAttackError, attack_names, get_attack, register_attack

__all__ = [
    "ATTACK_FILE",
    "ATTACK_PROTOCOL_VERSION",
    "Attack",
    "AttackContext",
    "Conditioning",
    "SearchOutcome",
    "UnknownAttackError",
    "attack_names",
    "get_attack",
    "register_attack",
    "run_attacks",
]
