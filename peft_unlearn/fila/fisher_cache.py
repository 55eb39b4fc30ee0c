"""What a Fisher cache file was computed from: the key that decides whether it can be reused.

A cached set of statistics is only valid for the same base weights, the same target layers, the same
forget and retain data (the batches actually consumed, after ``max_batches``) and the same estimation
settings. [`FisherCacheKey`][peft_unlearn.fila.fisher_cache.FisherCacheKey] holds one field per such
input; the file stores it in its metadata, and [`estimate_fisher`][peft_unlearn.fila.fisher.estimate_fisher] compares
it field by field before reusing the file.

* ``weights``: SHA-256 of every base parameter's name, shape, dtype and all of its values (LoRA
  parameters excluded: the statistics are computed with adapters disabled). Sharded
  parameters are gathered one at a time (FSDP2 `DTensor.full_tensor()`, ZeRO-3 `GatheredParameters`),
  so the fingerprint does not depend on the sharding. Quantized weights are hashed in their stored
  (packed) form.
* ``forget_data`` / ``retain_data``: SHA-256 of the ``input_ids``, ``attention_mask`` and ``labels`` of
  every batch consumed, in order (all ranks' digests combined in rank order under `torch.distributed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DataDigest", "FisherCacheKey", "weight_fingerprint"]

_DATA_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class FisherCacheKey:
    """The inputs that determine a set of Fisher statistics.

    Attributes:
        architecture: Class name and ``model_type`` of the base model.
        weights: Fingerprint of the base weights (see [`weight_fingerprint`][peft_unlearn.fila.fisher_cache.weight_fingerprint]).
        targets: SHA-256 of the sorted ``name:[out, in]`` target list.
        forget_data: Digest of the forget batches consumed.
        retain_data: Digest of the retain batches consumed (``"none"`` without retain data).
        settings: ``fp32_accumulation``, ``train_mode``, ``max_batches`` as a JSON string.
    """

    architecture: str
    weights: str
    targets: str
    forget_data: str
    retain_data: str
    settings: str

    def to_json(self) -> str:
        """Serialise for the safetensors metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> FisherCacheKey | None:
        """Parse [`to_json`][peft_unlearn.fila.fisher_cache.FisherCacheKey.to_json] output; None if absent or unreadable."""
        if not text:
            return None
        try:
            values = json.loads(text)
            return cls(**{f.name: str(values[f.name]) for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError):
            return None

    def differences(self, other: FisherCacheKey | None) -> list[str]:
        """Names of the fields that differ (all fields if ``other`` is None)."""
        if other is None:
            return [f.name for f in dataclasses.fields(self)]
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def settings_json(*, fp32_accumulation: bool, train_mode: bool, max_batches: int | None) -> str:
    """The estimation settings that change the statistics, as a canonical JSON string."""
    return json.dumps(
        {"fp32_accumulation": bool(fp32_accumulation), "train_mode": bool(train_mode), "max_batches": max_batches},
        sort_keys=True,
    )


def targets_digest(shapes: Mapping[str, tuple[int, int]]) -> str:
    """SHA-256 of the sorted ``name:[out, in]`` list."""
    text = "\n".join(f"{name}:{list(shape)}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def architecture(model: nn.Module) -> str:
    """``ClassName/model_type`` of the base model (PeftModel unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    return f"{type(base).__name__}/{model_type}"


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return b""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy of a large weight


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """All values, flattened: the fingerprint is exact (a change of any weight makes the cache stale)."""
    return tensor.detach().reshape(-1)


def _gathered_sample(param: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    if isinstance(param, DTensor):
        full = param.full_tensor()
        return tuple(full.shape), _sample(full)
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        from peft.utils.integrations import gather_params_ctx

        with gather_params_ctx(param):
            return tuple(param.shape), _sample(param).clone()
    return tuple(param.shape), _sample(param)


def weight_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the base parameters (names, shapes, dtypes, every value), adapters excluded.

    Hashing every value costs about one read of the weights (a fraction of one Fisher pass, which runs a
    forward and backward per batch over them).

    Args:
        model: A PeftModel or plain model.

    Returns:
        A hex digest, equal for equal weights however they are sharded.

    Examples:
        >>> import torch
        >>> a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> weight_fingerprint(a) == weight_fingerprint(a), weight_fingerprint(a) == weight_fingerprint(b)
        (True, False)
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        shape, values = _gathered_sample(param)
        digest.update(f"{name}|{shape}|{param.dtype}|".encode())
        digest.update(_tensor_bytes(values))
    return digest.hexdigest()


class DataDigest:
    """Incremental SHA-256 of the causal-LM batches consumed (``input_ids``, ``attention_mask``, ``labels``).

    Examples:
        >>> import torch
        >>> batch = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[-100, 6]])}
        >>> d1, d2 = DataDigest(), DataDigest()
        >>> d1.update(batch); d2.update(batch)
        >>> d1.hexdigest() == d2.hexdigest()
        True
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.num_batches = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one batch."""
        self.num_batches += 1
        self._hash.update(f"batch{self.num_batches}".encode())
        for key in _DATA_KEYS:
            value = batch.get(key) if isinstance(batch, Mapping) else None
            if isinstance(value, torch.Tensor):
                self._hash.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
                self._hash.update(_tensor_bytes(value))

    def hexdigest(self) -> str:
        """The digest of everything added so far (combined over ranks by the caller)."""
        return self._hash.hexdigest()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield ``batches`` unchanged, adding each one to the digest."""
        for batch in batches:
            self.update(batch)
            yield batch


def combine_over_ranks(digest: str) -> str:
    """Combine per-rank digests in rank order (identity in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return digest
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return hashlib.sha256("|".join(gathered).encode()).hexdigest()
