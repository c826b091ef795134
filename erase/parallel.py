"""Data parallelism for ``attnscope erase`` under ``accelerate launch --multi_gpu`` (or ``torchrun``).

Every process holds the whole model and the LoRA and draws its own training rows (a generator per rank); after
the backward passes of a step the LoRA gradients are averaged with one all-reduce, so every rank applies the same
AdamW update and the LoRAs stay identical (checked at the end). The base-model cache is built once by rank 0 and
loaded by the others; rank 0 alone writes checkpoints and outputs. A single process (no launcher) pays nothing:
every collective is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DataParallel"]


class DataParallel:
    """This process's place in the run: ``rank``, ``world`` (number of processes) and the collectives used."""

    def __init__(self, cpu: bool) -> None:
        from accelerate import PartialState

        # Under a launcher this initializes the process group: gloo when training on the CPU (``cpu``), else NCCL.
        # Without ``cpu=True`` accelerate would not form a CPU process group at all.
        self._state = PartialState(cpu=cpu)
        self.rank: int = self._state.process_index
        self.world: int = self._state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The device for ``requested``: with several processes on CUDA, this rank's own GPU."""
        if self.world > 1 and requested.startswith("cuda"):
            return self._state.device
        return torch.device(requested)

    @classmethod
    def for_device(cls, device: str | torch.device) -> DataParallel:
        return cls(cpu=torch.device(device).type == "cpu")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so that all ranks take the same branch, e.g. on a NaN loss)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self._collective_device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def check_in_sync(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Raise if the ranks' parameters differ (they must, after identical averaged updates, be equal)."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        reference = flat.clone()
        torch.distributed.broadcast(reference, src=0)
        if not self.all_true(torch.equal(flat, reference)):
            raise RuntimeError("the LoRA weights differ between processes: the data-parallel run went out of sync")

    def _collective_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo moves CPU ones.
        return self._state.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
