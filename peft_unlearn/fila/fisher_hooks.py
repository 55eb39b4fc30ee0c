"""Weight gradients of linear layers from layer hooks, squared and accumulated one layer at a time.

The gradient of a loss with respect to the weight of a linear layer ``y = x Wᵀ (+ b)`` is
``∂L/∂W = Σ_t g_t x_tᵀ`` (``g = ∂L/∂y``, ``t`` over all tokens of the batch), whatever the storage of
``W``. A forward hook keeps the layer input ``x`` and puts a hook on the output ``y``; when the
backward pass reaches ``y`` the hook receives ``g``, forms ``∂L/∂W`` (``[out, in]``), adds
``n · (∂L/∂W)²`` to the layer's accumulator with a fused ``addcmul_`` and drops the gradient. So:

* no weight needs ``requires_grad`` and no ``.grad`` is ever written (the backward pass runs to the
  input-embedding output only, see [`input_embedding_roots`][peft_unlearn.fila.fisher_hooks.input_embedding_roots]);
* gradients exist one layer at a time, never all at once;
* quantized weights (bitsandbytes `Linear4bit`/`Linear8bitLt`: the Fisher of the dequantized weight
  the layer multiplies with), FSDP2 `DTensor` and ZeRO-3 partitioned weights all work, since only the
  layer's input and output gradient are used.

A layer called several times in one forward pass (shared weights) gets the square of the **sum** of
its per-call gradients, as an autograd weight gradient would: partial sums are kept until the last
call's gradient arrives.

Conv1D (GPT-2) computes ``y = x W + b`` with ``W`` of shape ``[in, out]``; ``gᵀx`` is the same
gradient in ``nn.Linear`` layout, which is the layout of the statistics.

A layer whose output gradient does not arrive (a module after it has no backward) fails with
[`MissingOutputGradientError`][peft_unlearn.fila.fisher_hooks.MissingOutputGradientError] naming the layer.
The known cause is checked before any pass by
[`check_no_cpu_inference_packing`][peft_unlearn.fila.fisher_hooks.check_no_cpu_inference_packing]: on CPUs
with AVX512-BF16, bitsandbytes repacks a 4-bit weight for an inference-only kernel at the first eval-mode
forward without gradients, and no gradient flows through that layer afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "MissingOutputGradientError",
    "WeightGradientHooks",
    "check_no_cpu_inference_packing",
    "input_embedding_roots",
]

_FIX = (
    "Reload the base model and run the data-driven init (UnlearningTrainer.train(), or initialize_adapter_weights) "
    "before any eval-mode forward without gradients, or run such forwards in train mode (model.train(): "
    "bitsandbytes repacks 4-bit weights for its CPU inference kernel only in eval mode)."
)


class MissingOutputGradientError(RuntimeError):
    """A target layer received no output gradient in the Fisher backward pass (a module after it has no backward)."""


def check_no_cpu_inference_packing(model: nn.Module) -> None:
    """Refuse a model whose bitsandbytes 4-bit weights were repacked for the CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) repacks a `Linear4bit` weight at its first eval-mode forward
    without gradients (``quant_state.packing_format_for_cpu``). The kernel it then uses has no backward, so the
    output gradients of the layers before it are missing (or wrong), and no Fisher statistics can be computed.

    Args:
        model: The model of the Fisher pass.

    Raises:
        MissingOutputGradientError: Naming the repacked layers and the fix.
    """
    packed = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    if packed:
        raise MissingOutputGradientError(
            f"bitsandbytes repacked the 4-bit weights of {len(packed)} layer(s) (e.g. {packed[0]!r}) for its CPU "
            "inference kernel, after an eval-mode forward without gradients (e.g. an evaluation or generation before "
            "training); that kernel has no backward, so the Fisher pass would get no output gradients. " + _FIX
        )


class WeightGradientHooks:
    """Accumulate ``n · (∂L/∂W)²`` for a set of linear layers from forward and output-gradient hooks.

    Use as a context manager (hooks are installed on entry, removed on exit); call
    [`begin`][peft_unlearn.fila.fisher_hooks.WeightGradientHooks.begin] before each forward pass and
    [`finish`][peft_unlearn.fila.fisher_hooks.WeightGradientHooks.finish] after its backward pass.

    Args:
        modules: ``name -> module`` whose forward is ``y = x Wᵀ (+ b)`` (or Conv1D's ``x W + b``) with the
            input as first positional argument.

    Examples:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2, bias=False)
        >>> acc = {"fc": torch.zeros(2, 3)}
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> with WeightGradientHooks({"fc": layer}) as hooks:
        ...     hooks.begin(acc, scale=1.0)
        ...     loss = layer(x).sum()
        ...     _ = torch.autograd.grad(loss, [x])
        ...     hooks.finish()
        >>> torch.allclose(acc["fc"], x.detach().sum(0).expand(2, 3) ** 2)
        True
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self._handles: list[Any] = []
        self._accumulators: Mapping[str, torch.Tensor] | None = None
        self._scale = 0.0
        self._pending: dict[str, int] = {}
        self._partial: dict[str, torch.Tensor] = {}
        self._staging: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def __enter__(self) -> WeightGradientHooks:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._accumulators = None
        self._partial.clear()
        self._staging.clear()

    def begin(self, accumulators: Mapping[str, torch.Tensor], scale: float) -> None:
        """Direct the next backward pass into ``accumulators`` (``name -> [out, in]``) with weight ``scale``."""
        self._accumulators = accumulators
        self._scale = scale
        self._pending = dict.fromkeys(self.modules, 0)
        self._partial.clear()

    def finish(self) -> None:
        """Flush partial sums of layers whose calls did not all receive a gradient; stop accumulating."""
        for name in list(self._partial):
            self._add(name, self._partial.pop(name))
        self._accumulators = None

    # ------------------------------------------------------------------------------------------------------------

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._accumulators is None or name not in self._accumulators or not args:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            x = args[0]
            if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or not out.requires_grad:
                return  # not on the backward path (e.g. the first pass of reentrant checkpointing)
            self._pending[name] += 1
            out.register_hook(functools.partial(self._on_output_grad, name, x.detach()))

        return hook

    def _on_output_grad(self, name: str, x: torch.Tensor, grad_out: torch.Tensor | None) -> None:
        if self._accumulators is None:
            return
        if grad_out is None:
            raise MissingOutputGradientError(
                f"The layer {name!r} received no output gradient in the Fisher backward pass: a module between it and "
                "the loss has no backward (for instance a bitsandbytes 4-bit layer repacked for the CPU inference "
                "kernel by an eval-mode forward without gradients), so its Fisher statistics cannot be computed. "
                + _FIX
            )
        with torch.no_grad():
            dtype = torch.promote_types(grad_out.dtype, x.dtype)
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            inputs = x.reshape(-1, x.shape[-1]).to(dtype)
            weight_grad = g.t() @ inputs  # [out, in]: sum over tokens of g_t x_t^T
            del g, inputs
            self._pending[name] -= 1
            if name in self._partial:
                self._partial[name] += weight_grad
            elif self._pending[name] > 0:
                self._partial[name] = weight_grad
                return
            else:
                self._add(name, weight_grad)
                return
            if self._pending[name] == 0:
                self._add(name, self._partial.pop(name))

    def _add(self, name: str, weight_grad: torch.Tensor) -> None:
        target = self._accumulators[name]
        weight_grad = weight_grad.to(dtype=target.dtype)  # no copy for fp32 gradients
        if weight_grad.device != target.device:
            weight_grad = self._to_host(weight_grad, target.device)
        target.addcmul_(weight_grad, weight_grad, value=self._scale)  # fused: no temporary for grad**2

    def _to_host(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if tensor.device.type != "cuda" or device.type != "cpu":
            return tensor.to(device)
        key = (tuple(tensor.shape), tensor.dtype)
        staging = self._staging.get(key)
        if staging is None:  # one pinned buffer per shape, reused for every batch
            staging = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._staging[key] = staging
        staging.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return staging


@contextlib.contextmanager
def input_embedding_roots(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Make the input-embedding output require grad and collect it, so a backward pass can stop there.

    The backward pass of the Fisher estimation is ``torch.autograd.grad(loss, roots)``: it runs through
    every layer (firing the output-gradient hooks) without computing any parameter gradient. Like
    PEFT's `enable_input_require_grads`, a forward hook calls ``requires_grad_()`` on the embedding
    output when it does not require grad already.

    Args:
        model: A model with `get_input_embeddings()`.

    Yields:
        The list that receives the embedding output of each forward pass (clear it between batches).

    Raises:
        ValueError: If the model has no input embeddings.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no input embeddings (`get_input_embeddings()` returned {embeddings!r}); the "
            "Fisher estimation needs a model that embeds `input_ids`."
        )
    roots: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and torch.is_grad_enabled():
            if not output.requires_grad:
                output.requires_grad_(True)
            roots.append(output)

    handle = embeddings.register_forward_hook(hook)
    try:
        yield roots
    finally:
        handle.remove()
