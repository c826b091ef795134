"""What a package needs to add commands to ``attnscope``: the one-line error a command raises for bad input, and
command groups several packages share.

Packages plug their commands in through the ``attnscope.commands`` entry-point group (a ``register(subparsers)``
function each); this module imports nothing else of attnscope, so a command module never imports the CLI itself.
"""

from __future__ import annotations

import argparse

__all__ = ["CommandError", "command_group"]


class CommandError(Exception):
    """Raised by a command for a bad input it detected itself; printed as ``error: <message>``."""


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The subcommands of the group ``attnscope NAME ...``, created on first use, so that several packages can add
    commands to one group (the shapes world's ``eval``, the lab's ``train``/``export``)."""
    if name not in subparsers.choices:
        group = subparsers.add_parser(name, help=help)
        group.set_defaults(subcommands=group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND"))
    return subparsers.choices[name].get_default("subcommands")
