"""Unlearning losses on Hugging Face causal-LM outputs, and the registry the trainer reads them from.

Every token-level loss takes the **unshifted** ``logits [B, T, V]`` and ``labels [B, T]`` a Hugging Face causal
LM uses (position ``t`` of the logits predicts token ``t + 1``), with ``ignore_index`` (-100) marking tokens that
are not supervised (prompt, padding). The shift is done inside by shifting the *labels*
(``labels[:, 1:]`` padded with ``ignore_index`` at the end); the logits are never sliced, because slicing makes
autograd materialise one more ``[tokens, vocab]`` gradient tensor.

``reduction``:

* ``"mean"``: mean over supervised tokens (over sequences for `npo_loss` / `simnpo_loss`). When no
  token is supervised the result is ``0`` and still attached to the autograd graph (zero gradient) instead of NaN,
  so a micro-batch made only of padding does not poison training.
* ``"sum"``: plain sum; the trainer divides by a global count for exact gradient accumulation.

Memory costs are given in units of one ``[N, V]`` tensor of the logits' dtype, ``N = B * T``.

Implemented losses:

* `inverted_hinge_loss`: IHL of Cha et al. (arXiv 2408.06621), ``1 + p_y - max_{v != y} p_v`` per token,
  with a hand-written backward that needs a single ``[N, V]`` gradient buffer.
* `gradient_ascent_loss` (``-NLL``), `nll_loss`, `kl_loss` (retain KL to a reference model),
  `sequence_log_probs`, `npo_loss`, `simnpo_loss`.
* Fused linear + loss (`peft_unlearn.losses.fused`): `fused_inverted_hinge_loss`, `fused_nll_loss`,
  `fused_sequence_log_probs`, `fused_kl_loss`, `fused_quantization_margin_loss` take the last hidden states and the output projection
  (`output_head`) and process tokens in chunks, so the ``[N, V]`` logits are never materialized; the trainer uses
  them by default (`UnlearningConfig.fused_loss`).
* `rmu_loss` with `rmu_control_vector`: representation misdirection (RMU, Li et al. 2024), an MSE on the hidden
  states of one layer.

The trainer reads every loss from one table, `LOSS_REGISTRY` (name, function, normalisation, reference model,
logged metrics); adding a built-in loss means adding one `UnlearningLoss` entry there (see CONTRIBUTING, "How to
add a loss"), and a user's own loss is added without editing the package with `register_loss`.

Examples:
    >>> import torch
    >>> from peft_unlearn.losses import inverted_hinge_loss
    >>> logits = torch.zeros(1, 3, 5)  # uniform: p_y = max_{v != y} p_v, so IHL = 1 at every token
    >>> inverted_hinge_loss(logits, torch.tensor([[1, 2, 3]])).item()
    1.0
"""

from __future__ import annotations

from .functions import (
    gradient_ascent_loss,
    inverted_hinge_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    quantization_margin_loss,
    rmu_control_vector,
    rmu_loss,
    sequence_log_probs,
    simnpo_loss,
)
from .fused import (
    FusedLossUnsupportedError,
    OutputHead,
    fused_inverted_hinge_loss,
    fused_kl_loss,
    fused_nll_loss,
    fused_quantization_margin_loss,
    fused_sequence_log_probs,
    model_hidden_states,
    output_head,
    use_fused_loss,
)
from .registry import (
    FORGET_LOSSES,
    LOSS_REGISTRY,
    RETAIN_LOSSES,
    LossBatch,
    LossTerm,
    UnlearningLoss,
    get_loss,
    loss_names,
    loss_options,
    loss_table,
    reference_users,
    register_loss,
    registered_losses,
    unregister_loss,
)

__all__ = [
    "FORGET_LOSSES",
    "LOSS_REGISTRY",
    "FusedLossUnsupportedError",
    "OutputHead",
    "RETAIN_LOSSES",
    "LossBatch",
    "LossTerm",
    "UnlearningLoss",
    "fused_inverted_hinge_loss",
    "fused_kl_loss",
    "fused_nll_loss",
    "fused_quantization_margin_loss",
    "fused_sequence_log_probs",
    "get_loss",
    "gradient_ascent_loss",
    "inverted_hinge_loss",
    "quantization_margin_loss",
    "kl_loss",
    "loss_names",
    "loss_options",
    "loss_table",
    "model_hidden_states",
    "nll_loss",
    "npo_loss",
    "output_head",
    "reference_users",
    "register_loss",
    "registered_losses",
    "rmu_control_vector",
    "rmu_loss",
    "sequence_log_probs",
    "simnpo_loss",
    "use_fused_loss",
    "unregister_loss",
]
