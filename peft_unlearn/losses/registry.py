"""The loss registry: one table of every forget and retain loss the trainer accepts, and how it runs them.

`UnlearningConfig` (its choices and `beta` defaults), `UnlearningTrainer.compute_loss` (the dispatch), the CLI
(its choices), the model card (the descriptions) and `docs/concepts/losses.md` (the tables, checked by a test) all
read `LOSS_REGISTRY`. Adding a loss is one `UnlearningLoss` entry here plus its tests.

Examples:
    >>> [spec.name for spec in LOSS_REGISTRY if spec.needs_reference]
    ['npo', 'kl', 'rmu']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..utils import IGNORE_INDEX
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

__all__ = [
    "FORGET_LOSSES",
    "LOSS_REGISTRY",
    "RETAIN_LOSSES",
    "LossBatch",
    "LossTerm",
    "UnlearningLoss",
    "get_loss",
    "loss_names",
    "loss_table",
    "reference_users",
]


@dataclass(frozen=True)
class LossTerm:
    """One part (forget or retain) of a step's objective.

    Attributes:
        total: The loss summed over this micro-batch (with grad); the trainer divides it by the count of the whole
            accumulated batch.
        count: This micro-batch's normaliser (tokens or sequences, see `UnlearningLoss.normalization`).
        nll: Detached mean token NLL of the part's own examples, logged as `forget_nll` / `retain_nll`.
    """

    total: Tensor
    count: Tensor
    nll: Tensor


class LossBatch:
    """A paired batch (`forget_*`, `retain_*`, `idk_*` tensors) and the config, as the loss terms see them.

    Args:
        inputs: The collated batch.
        config: An `UnlearningConfig` (the terms read `beta`, `simnpo_delta`, `kl_mask`, `rmu_layer`,
            `rmu_steering_coeff`, `seed`).

    Examples:
        >>> batch = LossBatch({"forget_labels": torch.tensor([[-100, 5, 6]])}, config=None)
        >>> int(batch.supervised_count("forget"))
        2
    """

    def __init__(self, inputs: Mapping[str, Tensor], config: Any):
        self.inputs = inputs
        self.config = config

    def labels(self, part: str) -> Tensor:
        """Labels `[B, T]` of one part (`"forget"`, `"retain"` or `"idk"`)."""
        return self.inputs[f"{part}_labels"]

    def supervised_count(self, part: str) -> Tensor:
        """Number of supervised next-token positions (shifted labels that are not ignored)."""
        return (self.labels(part)[:, 1:] != IGNORE_INDEX).sum()

    def forward(self, model: torch.nn.Module, part: str, **kwargs: Any) -> Any:
        """Run `model` on one part of the batch (no KV cache) and return its output."""
        return model(
            input_ids=self.inputs[f"{part}_input_ids"],
            attention_mask=self.inputs[f"{part}_attention_mask"],
            use_cache=False,
            **kwargs,
        )

    def logits(self, model: torch.nn.Module, part: str) -> Tensor:
        """Logits `[B, T, V]` of `model` on one part."""
        return self.forward(model, part).logits

    def layer_output(self, model: torch.nn.Module, part: str) -> tuple[Tensor, Tensor]:
        """`(hidden states of decoder layer config.rmu_layer [B, T, d], logits)` of `model` on one part."""
        out = self.forward(model, part, output_hidden_states=True)
        states = out.hidden_states
        n_layers = len(states) - 1
        layer = self.config.rmu_layer
        layer = n_layers // 4 if layer is None else layer
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"rmu_layer={self.config.rmu_layer} is out of range: the model has {n_layers} decoder layers; pass "
                f"an index in [0, {n_layers - 1}] (negative values count from the last layer) or None."
            )
        return states[layer % n_layers + 1], out.logits


TermFn = Callable[[LossBatch, torch.nn.Module, Any], LossTerm]
ReferenceFn = Callable[[LossBatch, torch.nn.Module], Any]


@dataclass(frozen=True)
class UnlearningLoss:
    """One entry of `LOSS_REGISTRY`: a forget or retain objective and how the trainer runs it.

    Attributes:
        name: The `forget_loss` / `retain_loss` value selecting it.
        role: `"forget"` or `"retain"`.
        function: The public loss function it applies (for the docs and direct use).
        normalization: What a step's summed loss is divided by, over the whole accumulated batch: `"tokens"`
            (supervised tokens) or `"sequences"`.
        needs_reference: Whether it needs the initial model (a frozen copy of the adapter, or `ref_model`).
        objective: One-line formula for the docs table.
        description: Short name for the model card.
        source: Where it comes from.
        term: `term(batch, model, reference)` -> `LossTerm`.
        reference: `reference(batch, reference_model)` -> whatever `term` needs from the initial model (run
            first, under no grad); `None` when `needs_reference` is false.
        count: `count(inputs, config)` -> the normaliser of a micro-batch (used to count the accumulated batch).
        default_beta: Default of `UnlearningConfig.beta` for this loss, if it uses one.
    """

    name: str
    role: Literal["forget", "retain"]
    function: Callable[..., Tensor]
    normalization: Literal["tokens", "sequences"]
    needs_reference: bool
    objective: str
    description: str
    source: str
    term: TermFn
    count: Callable[[Mapping[str, Tensor], Any], Tensor]
    reference: ReferenceFn | None = None
    default_beta: float | None = None

    @property
    def metrics(self) -> tuple[str, str]:
        """Training metrics it logs: `{role}_loss` (the normalised loss) and `{role}_nll` (token NLL)."""
        return (f"{self.role}_loss", f"{self.role}_nll")


def _tokens(part: str) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    return lambda inputs, config: LossBatch(inputs, config).supervised_count(part)


def _sequences(inputs: Mapping[str, Tensor], config: Any) -> Tensor:
    ids = inputs["forget_input_ids"]
    return torch.tensor(ids.shape[0], device=ids.device)


def _marked_tokens(part: str) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    return lambda inputs, config: (inputs[f"{part}_labels"] != IGNORE_INDEX).sum()


def _kl_count(inputs: Mapping[str, Tensor], config: Any) -> Tensor:
    if config.kl_mask == "none":
        return torch.tensor(inputs["retain_input_ids"].numel(), device=inputs["retain_input_ids"].device)
    return LossBatch(inputs, config).supervised_count("retain")


def _ihl_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    logits, labels = batch.logits(model, "forget"), batch.labels("forget")
    total = inverted_hinge_loss(logits, labels, reduction="sum")
    margin = getattr(batch.config, "quantization_margin", None)
    if margin is not None:  # the QUAIL-style defence (UnlearningConfig.quantization_margin), token-normalised too
        total = total + quantization_margin_loss(logits, labels, margin, reduction="sum").to(total.dtype)
    return LossTerm(total, batch.supervised_count("forget"), nll_loss(logits.detach(), labels))


def _ga_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = gradient_ascent_loss(batch.logits(model, "forget"), batch.labels("forget"), reduction="sum")
    count = batch.supervised_count("forget")
    return LossTerm(total, count, -total.detach() / count.clamp_min(1))


def _idk_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = nll_loss(batch.logits(model, "idk"), batch.labels("idk"), reduction="sum")
    with torch.no_grad():  # logged: the likelihood of the original forget answers
        nll = nll_loss(batch.logits(model, "forget"), batch.labels("forget"))
    return LossTerm(total, batch.supervised_count("idk"), nll)


def _forget_logps(batch: LossBatch, model: torch.nn.Module) -> Tensor:
    return sequence_log_probs(batch.logits(model, "forget"), batch.labels("forget"))[0]


def _npo_like_term(batch: LossBatch, model: torch.nn.Module, reference: Any, npo: bool) -> LossTerm:
    logps, num_tokens = sequence_log_probs(batch.logits(model, "forget"), batch.labels("forget"))
    config = batch.config
    if npo:
        total = npo_loss(logps, reference, beta=config.beta, reduction="sum")
    else:
        total = simnpo_loss(logps, num_tokens, beta=config.beta, delta=config.simnpo_delta, reduction="sum")
    count = torch.tensor(logps.shape[0], device=logps.device)
    return LossTerm(total, count, -logps.detach().sum() / num_tokens.sum().clamp_min(1))


def _rmu_forget_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    hidden, logits = batch.layer_output(model, "forget")
    target = rmu_control_vector(hidden.shape[-1], batch.config.rmu_steering_coeff, batch.config.seed)
    labels = batch.labels("forget")
    mask = labels != IGNORE_INDEX
    return LossTerm(rmu_loss(hidden, target, mask, reduction="sum"), mask.sum(), nll_loss(logits.detach(), labels))


def _nll_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = nll_loss(batch.logits(model, "retain"), batch.labels("retain"), reduction="sum")
    count = batch.supervised_count("retain")
    return LossTerm(total, count, total.detach() / count.clamp_min(1))


def _kl_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    logits, labels = batch.logits(model, "retain"), batch.labels("retain")
    kl_labels = labels if batch.config.kl_mask == "labels" else None
    total = kl_loss(logits, reference, labels=kl_labels, reduction="sum")
    count = _kl_count(batch.inputs, batch.config).to(total.device)
    return LossTerm(total, count, nll_loss(logits.detach(), labels))


def _rmu_retain_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    hidden, logits = batch.layer_output(model, "retain")
    labels = batch.labels("retain")
    mask = labels != IGNORE_INDEX
    total = rmu_loss(hidden, reference, mask, reduction="sum")
    return LossTerm(total, mask.sum(), nll_loss(logits.detach(), labels))


LOSS_REGISTRY: tuple[UnlearningLoss, ...] = (
    UnlearningLoss(
        name="inverted_hinge",
        role="forget",
        function=inverted_hinge_loss,
        normalization="tokens",
        needs_reference=False,
        objective="mean over tokens of `1 + p_y − max_{v≠y} p_v`",
        description="Inverted Hinge Loss (IHL, Cha et al. 2025)",
        source="Cha et al. 2025",
        term=_ihl_term,
        count=_tokens("forget"),
    ),
    UnlearningLoss(
        name="gradient_ascent",
        role="forget",
        function=gradient_ascent_loss,
        normalization="tokens",
        needs_reference=False,
        objective="`−NLL` (maximise the forget NLL)",
        description="gradient ascent (negated token NLL)",
        source="Jang et al. 2023",
        term=_ga_term,
        count=_tokens("forget"),
    ),
    UnlearningLoss(
        name="npo",
        role="forget",
        function=npo_loss,
        normalization="sequences",
        needs_reference=True,
        objective="`−(2/β)·mean log σ(β(log π_ref(y) − log π_θ(y)))` on summed sequence log-probs, β = 0.1",
        description="Negative Preference Optimization (NPO)",
        source="Zhang et al. 2024",
        term=lambda batch, model, reference: _npo_like_term(batch, model, reference, npo=True),
        count=_sequences,
        reference=_forget_logps,
        default_beta=0.1,
    ),
    UnlearningLoss(
        name="simnpo",
        role="forget",
        function=simnpo_loss,
        normalization="sequences",
        needs_reference=False,
        objective="`−(2/β)·mean log σ(−β·log π_θ(y)/|y| − βδ)`, β = 4.5, δ = 0",
        description="SimNPO (reference-free NPO)",
        source="Fan et al. 2024",
        term=lambda batch, model, reference: _npo_like_term(batch, model, reference, npo=False),
        count=_sequences,
        default_beta=4.5,
    ),
    UnlearningLoss(
        name="idk",
        role="forget",
        function=nll_loss,
        normalization="tokens",
        needs_reference=False,
        objective='NLL of the forget question answered by a random "I don\'t know" reply',
        description="NLL of 'I don't know' answers to the forget questions",
        source="Maini et al. 2024",
        term=_idk_term,
        count=_tokens("idk"),
    ),
    UnlearningLoss(
        name="rmu",
        role="forget",
        function=rmu_loss,
        normalization="tokens",
        needs_reference=False,
        objective="mean over tokens of `‖h_l − c·u‖² / d` at layer `rmu_layer`, `u` a seeded random unit vector",
        description="representation misdirection (RMU) of the forget activations",
        source="Li et al. 2024 (WMDP)",
        term=_rmu_forget_term,
        count=_marked_tokens("forget"),
    ),
    UnlearningLoss(
        name="nll",
        role="retain",
        function=nll_loss,
        normalization="tokens",
        needs_reference=False,
        objective="mean token NLL (gradient difference when paired with `gradient_ascent`)",
        description="token negative log-likelihood",
        source="Liu et al. 2022",
        term=_nll_term,
        count=_tokens("retain"),
    ),
    UnlearningLoss(
        name="kl",
        role="retain",
        function=kl_loss,
        normalization="tokens",
        needs_reference=True,
        objective="`KL(p_ref ‖ p_θ)` at positions that predict a supervised token (`kl_mask`)",
        description="KL divergence to the reference (initial) model",
        source="Maini et al. 2024",
        term=_kl_term,
        count=_kl_count,
        reference=lambda batch, model: batch.logits(model, "retain"),
    ),
    UnlearningLoss(
        name="rmu",
        role="retain",
        function=rmu_loss,
        normalization="tokens",
        needs_reference=True,
        objective="mean over tokens of `‖h_l − h_l^ref‖² / d` at layer `rmu_layer` (weight α = `retain_weight`)",
        description="RMU retain term: activations kept at the reference model's",
        source="Li et al. 2024 (WMDP)",
        term=_rmu_retain_term,
        count=_marked_tokens("retain"),
        reference=lambda batch, model: batch.layer_output(model, "retain")[0],
    ),
)
"""Every loss the trainer accepts; `forget_loss` / `retain_loss` select an entry of the matching role."""


def loss_names(role: Literal["forget", "retain"]) -> tuple[str, ...]:
    """Names of the registered losses of one role, in registry order.

    Examples:
        >>> loss_names("retain")
        ('nll', 'kl', 'rmu')
    """
    return tuple(spec.name for spec in LOSS_REGISTRY if spec.role == role)


def get_loss(role: Literal["forget", "retain"], name: str) -> UnlearningLoss:
    """The registry entry of a `forget_loss` / `retain_loss` name.

    Args:
        role: `"forget"` or `"retain"`.
        name: The loss name.

    Returns:
        The `UnlearningLoss`.

    Raises:
        ValueError: If no loss of that role has that name.

    Examples:
        >>> get_loss("forget", "npo").needs_reference
        True
    """
    for spec in LOSS_REGISTRY:
        if spec.role == role and spec.name == name:
            return spec
    choices = ", ".join(repr(n) for n in loss_names(role))
    raise ValueError(f"`{role}_loss` must be one of {choices}, got {name!r}.")


def reference_users(forget_loss: str, retain_loss: str | None) -> list[str]:
    """The chosen losses that need a reference model, as `"forget_loss='npo'"`-style strings (empty: none).

    Examples:
        >>> reference_users("npo", "kl"), reference_users("inverted_hinge", None)
        (["forget_loss='npo'", "retain_loss='kl'"], [])
    """
    chosen = [("forget", forget_loss)] + ([("retain", retain_loss)] if retain_loss is not None else [])
    return [f"{role}_loss={name!r}" for role, name in chosen if get_loss(role, name).needs_reference]


def loss_table(role: Literal["forget", "retain"]) -> str:
    """The Markdown table of one role's losses, as `docs/concepts/losses.md` shows it (a test keeps them equal).

    Examples:
        >>> loss_table("retain").splitlines()[0]
        '| `retain_loss` | Objective | Normalised over | Reference model | Source |'
    """
    lines = [f"| `{role}_loss` | Objective | Normalised over | Reference model | Source |", "|---|---|---|---|---|"]
    for spec in LOSS_REGISTRY:
        if spec.role == role:
            reference = "yes" if spec.needs_reference else "no"
            lines.append(f"| `{spec.name}` | {spec.objective} | {spec.normalization} | {reference} | {spec.source} |")
    return "\n".join(lines)


FORGET_LOSSES: tuple[str, ...] = loss_names("forget")
"""Names of the forget-set losses (`idk` is the NLL of "I don't know" answers)."""

RETAIN_LOSSES: tuple[str, ...] = loss_names("retain")
"""Names of the retain-set losses."""
