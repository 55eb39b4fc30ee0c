"""Forget/retain pairing: the dataset the trainer iterates, with the retain partner redrawn every epoch.

Examples:
    >>> f = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2
    >>> r = [{"input_ids": [4, 5], "labels": [4, 5]}] * 3
    >>> sorted(PairedUnlearningDataset(f, r, pairing="cycle")[1])
    ['forget_input_ids', 'forget_labels', 'retain_input_ids', 'retain_labels']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset
from transformers import TrainerCallback

__all__ = ["PairedUnlearningDataset", "PairingEpochCallback", "TokenizedDataset"]


class TokenizedDataset(Dataset):
    """A map-style dataset over tokenized ``{"input_ids", "labels"}`` examples (evaluation, FILA Fisher pass).

    Args:
        examples: Output of `tokenize_dataset`.

    Examples:
        >>> ds = TokenizedDataset([{"input_ids": [1, 2], "labels": [1, 2]}])
        >>> len(ds), ds[0]["input_ids"]
        (1, [1, 2])
    """

    def __init__(self, examples: Sequence[Mapping[str, list[int]]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return dict(self.examples[index])


class PairedUnlearningDataset(Dataset):
    """Forget examples, each paired with a retain example (and, for IDK, an "I don't know" target).

    Item ``i`` holds ``forget_input_ids`` / ``forget_labels`` of forget example ``i``, ``retain_input_ids`` /
    ``retain_labels`` of retain example `retain_index` ``(i)`` when a retain set is given, and
    ``idk_input_ids`` / ``idk_labels`` (forget question + one answer, `idk_index`) when IDK variants are given.

    Pairing, for epoch ``e`` (set with `set_epoch`; the trainer does it at every epoch start):

    * ``"random"``: retain index drawn uniformly for every forget example from a generator seeded with
      ``(seed, e)``: deterministic for a seed, redrawn every epoch (the paper's protocol).
    * ``"cycle"``: ``(e * len(forget) + i) % len(retain)``, so successive epochs walk through the whole retain set.

    Args:
        forget: Tokenized forget examples.
        retain: Tokenized retain examples, or ``None``.
        pairing: ``"random"`` or ``"cycle"``.
        seed: Seed of the random pairing and of the IDK answer choice.
        idk: ``idk[i][j]``: forget question ``i`` with IDK answer ``j`` (from `tokenize_idk_dataset`).

    Examples:
        >>> f = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4
        >>> r = [{"input_ids": [4, 5], "labels": [4, 5]}] * 3
        >>> ds = PairedUnlearningDataset(f, r, pairing="cycle")
        >>> [ds.retain_index(i) for i in range(4)]
        [0, 1, 2, 0]
    """

    def __init__(
        self,
        forget: Sequence[Mapping[str, list[int]]],
        retain: Sequence[Mapping[str, list[int]]] | None = None,
        *,
        pairing: str = "random",
        seed: int = 42,
        idk: Sequence[Sequence[Mapping[str, list[int]]]] | None = None,
    ):
        if len(forget) == 0:
            raise ValueError("The forget dataset is empty; it needs at least one example.")
        if retain is not None and len(retain) == 0:
            raise ValueError("The retain dataset is empty; pass retain_dataset=None (and retain_loss=None) instead.")
        if pairing not in ("random", "cycle"):
            raise ValueError(f"`pairing` must be 'random' or 'cycle', got {pairing!r}.")
        if idk is not None and len(idk) != len(forget):
            raise ValueError(f"`idk` has {len(idk)} entries but the forget set has {len(forget)}.")
        if seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {seed}.")
        self.forget = list(forget)
        self.retain = None if retain is None else list(retain)
        self.idk = None if idk is None else [list(v) for v in idk]
        self.pairing = pairing
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the pairing of epoch ``epoch`` (called by the trainer at each epoch start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.forget)

    def _draws(self, kind: str, high: int) -> np.ndarray:
        key = (kind, self.epoch)
        if key not in self._cache:
            stream = {"retain": 0, "idk": 1}[kind]
            rng = np.random.default_rng([self.seed, self.epoch, stream])
            self._cache = {k: v for k, v in self._cache.items() if k[1] == self.epoch}
            self._cache[key] = rng.integers(0, high, size=len(self.forget))
        return self._cache[key]

    def retain_index(self, index: int) -> int:
        """Index of the retain example paired with forget example ``index`` in the current epoch."""
        if self.retain is None:
            raise ValueError("This dataset has no retain set.")
        if self.pairing == "cycle":
            return (self.epoch * len(self.forget) + index) % len(self.retain)
        return int(self._draws("retain", len(self.retain))[index])

    def idk_index(self, index: int) -> int:
        """Index of the IDK answer used for forget example ``index`` in the current epoch."""
        if self.idk is None:
            raise ValueError("This dataset has no IDK variants.")
        return int(self._draws("idk", len(self.idk[index]))[index])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        forget = self.forget[index]
        item = {"forget_input_ids": forget["input_ids"], "forget_labels": forget["labels"]}
        if self.retain is not None:
            retain = self.retain[self.retain_index(index)]
            item["retain_input_ids"] = retain["input_ids"]
            item["retain_labels"] = retain["labels"]
        if self.idk is not None:
            idk = self.idk[index][self.idk_index(index)]
            item["idk_input_ids"] = idk["input_ids"]
            item["idk_labels"] = idk["labels"]
        return item


class PairingEpochCallback(TrainerCallback):
    """Selects the forget/retain pairing of the epoch that starts (`set_epoch` on the paired dataset)."""

    def __init__(self, dataset: PairedUnlearningDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))
