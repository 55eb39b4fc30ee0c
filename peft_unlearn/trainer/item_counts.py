"""The normalisers of one optimizer step: forget/retain item counts of the whole accumulated batch.

Under gradient accumulation (and data parallelism) `UnlearningTrainer.compute_loss` divides each part's summed
loss by the token (or sequence) count of every micro-batch of the step on every process, so `batch 4 x
accumulation 1` and `batch 2 x accumulation 2` give the same update.

Examples:
    >>> import torch
    >>> UnlearningItemCounts(forget=torch.tensor(12)).loss_scale
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["UnlearningItemCounts", "count_items"]


@dataclass
class UnlearningItemCounts:
    """Normalisers of one optimizer step, passed to `compute_loss` as `num_items_in_batch`.

    Attributes:
        forget: Supervised forget tokens (IHL, GA, IDK tokens) or forget sequences (NPO, SimNPO) of the whole
            accumulated batch, summed over processes.
        retain: Supervised retain tokens (NLL, KL with `kl_mask="labels"`) or retain positions (KL with
            `kl_mask="none"`), or None without retain loss.
        loss_scale: Factor compensating the gradient averaging of data parallelism (the number of processes).
    """

    forget: torch.Tensor
    retain: torch.Tensor | None = None
    loss_scale: float = 1.0


def count_items(
    batch_samples: Sequence[Mapping[str, Any]],
    specs: Mapping[str, Any],
    args: Any,
    device: torch.device,
    accelerator: Any = None,
) -> UnlearningItemCounts:
    """Count the forget/retain items of the micro-batches of one optimizer step, summed over processes.

    Args:
        batch_samples: The paired micro-batches of the step.
        specs: Role (`"forget"`, optionally `"retain"`) -> loss registry entry (its `count(batch, args)`).
        args: The `UnlearningConfig` of the run (`world_size`).
        device: Device of the counts.
        accelerator: The trainer's `Accelerator`, used to gather the counts when `args.world_size > 1`.

    Returns:
        The counts of the step.
    """
    has_retain = "retain" in specs
    forget = sum(specs["forget"].count(b, args).to(device) for b in batch_samples)
    retain = (
        sum(specs["retain"].count(b, args).to(device) for b in batch_samples)
        if has_retain
        else torch.zeros((), device=device)
    )
    counts = torch.stack([torch.as_tensor(forget, device=device), torch.as_tensor(retain, device=device)]).long()
    scale = 1.0
    if args.world_size > 1:
        counts = accelerator.gather(counts).reshape(-1, 2).sum(0)
        scale = float(accelerator.num_processes)
    return UnlearningItemCounts(forget=counts[0], retain=counts[1] if has_retain else None, loss_scale=scale)
