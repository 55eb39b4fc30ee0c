"""The loss registry: one table of every forget and retain loss the trainer accepts, and how it runs them.

`UnlearningConfig` (its choices, `beta` defaults and the "option ignored" warnings), `UnlearningTrainer.compute_loss`
(the dispatch), the CLI (its choices), the model card (the descriptions) and `docs/concepts/losses.md` (the tables,
checked by a test) all read `LOSS_REGISTRY`. Adding a built-in loss is one `UnlearningLoss` entry here plus its
tests; a user adds one of their own, without editing the package, with `register_loss`.

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
from .fused import (
    OutputHead,
    TokenStatistics,
    fused_nll_loss,
    fused_sequence_log_probs,
    fused_token_statistics,
    model_hidden_states,
    output_head,
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
    "loss_options",
    "loss_table",
    "reference_users",
    "register_loss",
    "registered_losses",
    "unregister_loss",
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
            `rmu_steering_coeff`, `seed`, `loss_chunk_size`).
        fused: Compute the token-level losses with the fused linear + loss path (`peft_unlearn.losses.fused`):
            the model is run for its last hidden states only and the ``[B, T, V]`` logits are never materialized.

    Examples:
        >>> batch = LossBatch({"forget_labels": torch.tensor([[-100, 5, 6]])}, config=None)
        >>> int(batch.supervised_count("forget"))
        2
    """

    def __init__(self, inputs: Mapping[str, Tensor], config: Any, fused: bool = False):
        self.inputs = inputs
        self.config = config
        self.fused = fused

    @property
    def chunk_rows(self) -> int | None:
        """Tokens per chunk of the fused path (`config.loss_chunk_size`; None: automatic)."""
        return getattr(self.config, "loss_chunk_size", None)

    def labels(self, part: str) -> Tensor:
        """Labels `[B, T]` of one part (`"forget"`, `"retain"` or `"idk"`)."""
        return self.inputs[f"{part}_labels"]

    def supervised_count(self, part: str) -> Tensor:
        """Number of supervised next-token positions (shifted labels that are not ignored)."""
        return (self.labels(part)[:, 1:] != IGNORE_INDEX).sum()

    def _model_inputs(self, part: str) -> dict[str, Tensor]:
        return {"input_ids": self.inputs[f"{part}_input_ids"], "attention_mask": self.inputs[f"{part}_attention_mask"]}

    def forward(self, model: torch.nn.Module, part: str, **kwargs: Any) -> Any:
        """Run `model` on one part of the batch (no KV cache) and return its output."""
        return model(**self._model_inputs(part), use_cache=False, **kwargs)

    def logits(self, model: torch.nn.Module, part: str) -> Tensor:
        """Logits `[B, T, V]` of `model` on one part (the unfused path).

        Raises:
            ValueError: If the model returns ``logits=None`` (e.g. Liger-Kernel's fused cross-entropy forward).
        """
        logits = self.forward(model, part).logits
        if logits is None:
            raise ValueError(
                "The model returned logits=None (as a Liger-Kernel or cut-cross-entropy patched forward does), but "
                "this loss reads the logits. Set `fused_loss='auto'` (the default) or `fused_loss=True` so that the "
                "losses are computed from the hidden states, or set `use_liger_kernel=False`."
            )
        return logits

    def hidden(self, model: torch.nn.Module, part: str) -> tuple[Tensor, OutputHead]:
        """`(last hidden states [B, T, d], output projection)` of `model` on one part (the fused path)."""
        return model_hidden_states(model, **self._model_inputs(part)), output_head(model)

    def token_stats(
        self, model: torch.nn.Module, part: str, runner_up: bool = False, reference: Any = None
    ) -> TokenStatistics:
        """Fused per-token statistics of one part (`fused_token_statistics`); ``reference`` = `hidden` of the
        reference model for the KL (then `kl_mask="none"` selects every position)."""
        hidden, head = self.hidden(model, part)
        ref_hidden, ref_head = reference if reference is not None else (None, None)
        return fused_token_statistics(
            hidden,
            head,
            self.labels(part),
            runner_up=runner_up,
            ref_hidden=ref_hidden,
            ref_head=ref_head,
            all_positions=reference is not None and self.config.kl_mask == "none",
            chunk_rows=self.chunk_rows,
        )

    def nll_sum(self, model: torch.nn.Module, part: str) -> Tensor:
        """Summed token NLL of `model` on one part (fused or not)."""
        if self.fused:
            hidden, head = self.hidden(model, part)
            return fused_nll_loss(hidden, head, self.labels(part), reduction="sum", chunk_rows=self.chunk_rows)
        return nll_loss(self.logits(model, part), self.labels(part), reduction="sum")

    def sequence_log_probs(self, model: torch.nn.Module, part: str) -> tuple[Tensor, Tensor]:
        """`(logps [B], num_tokens [B])` of `model` on one part (fused or not)."""
        if self.fused:
            hidden, head = self.hidden(model, part)
            return fused_sequence_log_probs(hidden, head, self.labels(part), chunk_rows=self.chunk_rows)
        return sequence_log_probs(self.logits(model, part), self.labels(part))

    def layer_output(self, model: torch.nn.Module, part: str) -> tuple[Tensor, Tensor]:
        """`(hidden states of decoder layer config.rmu_layer [B, T, d], detached mean token NLL)` on one part."""
        extra = {"logits_to_keep": 1} if self.fused else {}
        out = self.forward(model, part, output_hidden_states=True, **extra)
        states = out.hidden_states
        n_layers = len(states) - 1
        layer = self.config.rmu_layer
        layer = n_layers // 4 if layer is None else layer
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"rmu_layer={self.config.rmu_layer} is out of range: the model has {n_layers} decoder layers; pass "
                f"an index in [0, {n_layers - 1}] (negative values count from the last layer) or None."
            )
        labels = self.labels(part)
        with torch.no_grad():
            if self.fused:
                nll = fused_nll_loss(states[-1], output_head(model), labels, chunk_rows=self.chunk_rows)
            else:
                if out.logits is None:
                    raise ValueError("The model returned logits=None; set `fused_loss='auto'` or `True`.")
                nll = nll_loss(out.logits, labels)
        return states[layer % n_layers + 1], nll


TermFn = Callable[[LossBatch, torch.nn.Module, Any], LossTerm]
ReferenceFn = Callable[[LossBatch, torch.nn.Module], Any]


@dataclass(frozen=True)
class UnlearningLoss:
    """One entry of the loss registry: a forget or retain objective and how the trainer runs it.

    Only `name`, `role` and `term` are required; the rest defaults to what a token-level loss without a reference
    model needs. Register your own with [`register_loss`][peft_unlearn.losses.registry.register_loss].

    Attributes:
        name: The `forget_loss` / `retain_loss` value selecting it.
        role: `"forget"` or `"retain"`.
        term: `term(batch, model, reference)` -> `LossTerm`: the loss of one micro-batch summed (with grad), its
            count and its logged NLL.
        reference: `reference(batch, reference_model)` -> whatever `term` needs from the initial model (run first,
            under no grad, with the adapters disabled or on `ref_model`); `None` (the default) when the loss needs
            no reference model.
        normalization: What a step's summed loss is divided by, over the whole accumulated batch: `"tokens"`
            (supervised tokens, the default) or `"sequences"`.
        count: `count(inputs, config)` -> the normaliser of a micro-batch (used to count the accumulated batch).
            `None` (the default) counts what `normalization` says on the part named by `role`: its supervised
            next-token positions, or its sequences.
        function: The public loss function it applies, for the docs and direct use (optional).
        objective: One-line formula for the docs table.
        description: Short name for the model card; defaults to `name`.
        source: Where it comes from (paper, or your project).
        default_beta: Default of `UnlearningConfig.beta` for this loss, if it uses one.
        options: The `UnlearningConfig` fields the loss reads besides the common ones (e.g. `("beta",)`);
            setting one of these while no chosen loss reads it warns that it is ignored.
    """

    name: str
    role: Literal["forget", "retain"]
    term: TermFn
    reference: ReferenceFn | None = None
    normalization: Literal["tokens", "sequences"] = "tokens"
    count: Callable[[Mapping[str, Tensor], Any], Tensor] | None = None
    function: Callable[..., Tensor] | None = None
    objective: str = ""
    description: str = ""
    source: str = ""
    default_beta: float | None = None
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_spec(self)
        if self.count is None:
            default = _tokens(self.role) if self.normalization == "tokens" else _sequences(self.role)
            object.__setattr__(self, "count", default)
        if not self.description:
            object.__setattr__(self, "description", self.name)
        object.__setattr__(self, "options", tuple(self.options))

    @property
    def needs_reference(self) -> bool:
        """Whether it needs the initial model (a frozen copy of the adapter, or `ref_model`): it has a `reference`."""
        return self.reference is not None

    @property
    def metrics(self) -> tuple[str, str]:
        """Training metrics it logs: `{role}_loss` (the normalised loss) and `{role}_nll` (token NLL)."""
        return (f"{self.role}_loss", f"{self.role}_nll")


def _check_spec(spec: UnlearningLoss) -> None:
    """Reject an `UnlearningLoss` whose fields the trainer could not run, naming the field and the fix."""
    if spec.role not in ("forget", "retain"):
        raise ValueError(f"UnlearningLoss `role` must be 'forget' or 'retain', got {spec.role!r}.")
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise ValueError(
            f"UnlearningLoss `name` must be a Python identifier such as 'my_loss' (it is a config value and a CLI "
            f"choice), got {spec.name!r}."
        )
    if spec.role == "retain" and spec.name.lower() == "none":
        raise ValueError("UnlearningLoss `name`='none' is reserved: retain_loss=None / 'none' means no retain term.")
    if spec.normalization not in ("tokens", "sequences"):
        raise ValueError(
            f"UnlearningLoss `normalization` must be 'tokens' or 'sequences', got {spec.normalization!r}; pass "
            "`count=` for any other normaliser."
        )
    for field_name in ("term", "reference", "count", "function"):
        value = getattr(spec, field_name)
        if value is not None and not callable(value):
            raise TypeError(f"UnlearningLoss `{field_name}` must be callable, got {type(value).__name__}.")
    if not callable(spec.term):
        raise TypeError(f"UnlearningLoss `term` must be callable, got {type(spec.term).__name__}.")
    if isinstance(spec.options, str) or not all(isinstance(o, str) for o in spec.options):
        raise TypeError(f"UnlearningLoss `options` must be a tuple of config field names, got {spec.options!r}.")


def _tokens(part: str) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    return lambda inputs, config: LossBatch(inputs, config).supervised_count(part)


def _sequences(part: str) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    def count(inputs: Mapping[str, Tensor], config: Any) -> Tensor:
        ids = inputs[f"{part}_input_ids"]
        return torch.tensor(ids.shape[0], device=ids.device)

    return count


def _marked_tokens(part: str) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    return lambda inputs, config: (inputs[f"{part}_labels"] != IGNORE_INDEX).sum()


def _kl_count(inputs: Mapping[str, Tensor], config: Any) -> Tensor:
    if config.kl_mask == "none":
        return torch.tensor(inputs["retain_input_ids"].numel(), device=inputs["retain_input_ids"].device)
    return LossBatch(inputs, config).supervised_count("retain")


def _ihl_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    labels, count = batch.labels("forget"), batch.supervised_count("forget")
    margin = getattr(batch.config, "quantization_margin", None)
    if batch.fused:
        stats = batch.token_stats(model, "forget", runner_up=True)
        total = (1.0 + (stats.log_p.exp() - stats.runner_up_p)).sum()
        if margin is not None:  # the QUAIL-style margin from the same statistics: z_y - z_k = log p_y - log p_k
            total = total + torch.relu(stats.logit_margin() + float(margin)).sum()
        return LossTerm(total, count, -stats.log_p.detach().sum() / count.clamp_min(1))
    logits = batch.logits(model, "forget")
    total = inverted_hinge_loss(logits, labels, reduction="sum")
    if margin is not None:  # the QUAIL-style defence (UnlearningConfig.quantization_margin), token-normalised too
        total = total + quantization_margin_loss(logits, labels, margin, reduction="sum").to(total.dtype)
    return LossTerm(total, count, nll_loss(logits.detach(), labels))


def _ga_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = -batch.nll_sum(model, "forget")
    count = batch.supervised_count("forget")
    return LossTerm(total, count, -total.detach() / count.clamp_min(1))


def _idk_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = batch.nll_sum(model, "idk")
    with torch.no_grad():  # logged: the likelihood of the original forget answers
        count = batch.supervised_count("forget")
        nll = batch.nll_sum(model, "forget") / count.clamp_min(1)
    return LossTerm(total, batch.supervised_count("idk"), nll)


def _forget_logps(batch: LossBatch, model: torch.nn.Module) -> Tensor:
    return batch.sequence_log_probs(model, "forget")[0]


def _npo_like_term(batch: LossBatch, model: torch.nn.Module, reference: Any, npo: bool) -> LossTerm:
    logps, num_tokens = batch.sequence_log_probs(model, "forget")
    config = batch.config
    if npo:
        total = npo_loss(logps, reference, beta=config.beta, reduction="sum")
    else:
        total = simnpo_loss(logps, num_tokens, beta=config.beta, delta=config.simnpo_delta, reduction="sum")
    count = torch.tensor(logps.shape[0], device=logps.device)
    return LossTerm(total, count, -logps.detach().sum() / num_tokens.sum().clamp_min(1))


def _rmu_forget_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    hidden, nll = batch.layer_output(model, "forget")
    target = rmu_control_vector(hidden.shape[-1], batch.config.rmu_steering_coeff, batch.config.seed)
    mask = batch.labels("forget") != IGNORE_INDEX
    return LossTerm(rmu_loss(hidden, target, mask, reduction="sum"), mask.sum(), nll)


def _nll_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    total = batch.nll_sum(model, "retain")
    count = batch.supervised_count("retain")
    return LossTerm(total, count, total.detach() / count.clamp_min(1))


def _kl_reference(batch: LossBatch, model: torch.nn.Module) -> Any:
    """The reference side of the KL: full logits, or (hidden states, output projection) on the fused path."""
    return batch.hidden(model, "retain") if batch.fused else batch.logits(model, "retain")


def _kl_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    labels = batch.labels("retain")
    count = _kl_count(batch.inputs, batch.config).to(labels.device)
    if batch.fused:
        stats = batch.token_stats(model, "retain", reference=reference)
        nll = -stats.log_p.detach().sum() / batch.supervised_count("retain").clamp_min(1)
        return LossTerm(stats.kl.sum(), count, nll)
    logits = batch.logits(model, "retain")
    kl_labels = labels if batch.config.kl_mask == "labels" else None
    total = kl_loss(logits, reference, labels=kl_labels, reduction="sum")
    return LossTerm(total, count.to(total.device), nll_loss(logits.detach(), labels))


def _rmu_retain_term(batch: LossBatch, model: torch.nn.Module, reference: Any) -> LossTerm:
    hidden, nll = batch.layer_output(model, "retain")
    mask = batch.labels("retain") != IGNORE_INDEX
    total = rmu_loss(hidden, reference, mask, reduction="sum")
    return LossTerm(total, mask.sum(), nll)


LOSS_REGISTRY: tuple[UnlearningLoss, ...] = (
    UnlearningLoss(
        name="inverted_hinge",
        role="forget",
        function=inverted_hinge_loss,
        objective="mean over tokens of `1 + p_y − max_{v≠y} p_v`",
        description="Inverted Hinge Loss (IHL, Cha et al. 2025)",
        source="Cha et al. 2025",
        term=_ihl_term,
        options=("quantization_margin",),
    ),
    UnlearningLoss(
        name="gradient_ascent",
        role="forget",
        function=gradient_ascent_loss,
        objective="`−NLL` (maximise the forget NLL)",
        description="gradient ascent (negated token NLL)",
        source="Jang et al. 2023",
        term=_ga_term,
    ),
    UnlearningLoss(
        name="npo",
        role="forget",
        function=npo_loss,
        normalization="sequences",
        objective="`−(2/β)·mean log σ(β(log π_ref(y) − log π_θ(y)))` on summed sequence log-probs, β = 0.1",
        description="Negative Preference Optimization (NPO)",
        source="Zhang et al. 2024",
        term=lambda batch, model, reference: _npo_like_term(batch, model, reference, npo=True),
        reference=_forget_logps,
        default_beta=0.1,
        options=("beta",),
    ),
    UnlearningLoss(
        name="simnpo",
        role="forget",
        function=simnpo_loss,
        normalization="sequences",
        objective="`−(2/β)·mean log σ(−β·log π_θ(y)/|y| − βδ)`, β = 4.5, δ = 0",
        description="SimNPO (reference-free NPO)",
        source="Fan et al. 2024",
        term=lambda batch, model, reference: _npo_like_term(batch, model, reference, npo=False),
        default_beta=4.5,
        options=("beta", "simnpo_delta"),
    ),
    UnlearningLoss(
        name="idk",
        role="forget",
        function=nll_loss,
        objective='NLL of the forget question answered by a random "I don\'t know" reply',
        description="NLL of 'I don't know' answers to the forget questions",
        source="Maini et al. 2024",
        term=_idk_term,
        count=_tokens("idk"),
        options=("idk_answers",),
    ),
    UnlearningLoss(
        name="rmu",
        role="forget",
        function=rmu_loss,
        objective="mean over tokens of `‖h_l − c·u‖² / d` at layer `rmu_layer`, `u` a seeded random unit vector",
        description="representation misdirection (RMU) of the forget activations",
        source="Li et al. 2024 (WMDP)",
        term=_rmu_forget_term,
        count=_marked_tokens("forget"),
        options=("rmu_layer", "rmu_steering_coeff"),
    ),
    UnlearningLoss(
        name="nll",
        role="retain",
        function=nll_loss,
        objective="mean token NLL (gradient difference when paired with `gradient_ascent`)",
        description="token negative log-likelihood",
        source="Liu et al. 2022",
        term=_nll_term,
    ),
    UnlearningLoss(
        name="kl",
        role="retain",
        function=kl_loss,
        objective="`KL(p_ref ‖ p_θ)` at positions that predict a supervised token (`kl_mask`)",
        description="KL divergence to the reference (initial) model",
        source="Maini et al. 2024",
        term=_kl_term,
        count=_kl_count,
        reference=_kl_reference,
        options=("kl_mask",),
    ),
    UnlearningLoss(
        name="rmu",
        role="retain",
        function=rmu_loss,
        objective="mean over tokens of `‖h_l − h_l^ref‖² / d` at layer `rmu_layer` (weight α = `retain_weight`)",
        description="RMU retain term: activations kept at the reference model's",
        source="Li et al. 2024 (WMDP)",
        term=_rmu_retain_term,
        count=_marked_tokens("retain"),
        reference=lambda batch, model: batch.layer_output(model, "retain")[0],
        options=("rmu_layer",),
    ),
)
"""The built-in losses, in the order the docs list them; `registered_losses()` adds the ones users registered."""

_USER_LOSSES: dict[tuple[str, str], UnlearningLoss] = {}


def registered_losses() -> tuple[UnlearningLoss, ...]:
    """Every loss the trainer accepts now: the built-in `LOSS_REGISTRY`, then those added with `register_loss`.

    Examples:
        >>> registered_losses()[: len(LOSS_REGISTRY)] == LOSS_REGISTRY
        True
    """
    return LOSS_REGISTRY + tuple(_USER_LOSSES.values())


def register_loss(loss: UnlearningLoss, *, replace: bool = False) -> UnlearningLoss:
    """Make a loss of your own selectable as `UnlearningConfig(forget_loss=...)` / `retain_loss=...`.

    The trainer then runs it like a built-in one: `term` gives the summed loss, the trainer divides it by the count
    of the whole accumulated batch, weights it (`forget_weight` / `retain_weight`), logs `forget_loss` /
    `forget_nll` (or `retain_*`) and names `description` in the model card. A loss with a `reference` gets the
    initial model (adapters disabled, or `ref_model`), exactly as NPO and KL do. Registration is per process:
    register before building the `UnlearningConfig`. The command line (`peft-unlearn train`) accepts the built-in
    names only.

    Args:
        loss: The `UnlearningLoss` entry (at least `name`, `role` and `term`).
        replace: Allow replacing a loss registered earlier under the same role and name (built-in ones can never
            be replaced: pick another name).

    Returns:
        `loss`, so it can be kept at module level.

    Raises:
        TypeError: If `loss` is not an `UnlearningLoss`.
        ValueError: If the name is a built-in loss of that role, or already registered and `replace` is False.

    Examples:
        >>> import torch
        >>> from peft_unlearn.losses import LossTerm, nll_loss
        >>> def flat_forget(batch, model, reference):  # push the forget NLL towards log(V): a uniform prediction
        ...     logits, labels = batch.logits(model, "forget"), batch.labels("forget")
        ...     nll = nll_loss(logits, labels, reduction="sum")
        ...     count = batch.supervised_count("forget")
        ...     target = torch.log(torch.tensor(float(logits.shape[-1])))
        ...     return LossTerm((nll / count.clamp_min(1) - target) ** 2 * count, count, nll.detach() / count)
        >>> spec = register_loss(UnlearningLoss(name="flat_forget", role="forget", term=flat_forget))
        >>> "flat_forget" in loss_names("forget")
        True
        >>> unregister_loss("forget", "flat_forget")
    """
    if not isinstance(loss, UnlearningLoss):
        raise TypeError(
            f"register_loss() takes an UnlearningLoss, got {type(loss).__name__}; build one with "
            "UnlearningLoss(name=..., role='forget' or 'retain', term=...)."
        )
    key = (loss.role, loss.name)
    if any((spec.role, spec.name) == key for spec in LOSS_REGISTRY):
        raise ValueError(
            f"{loss.role}_loss={loss.name!r} is a built-in loss and cannot be replaced; register yours under "
            "another name."
        )
    if key in _USER_LOSSES and not replace:
        raise ValueError(
            f"{loss.role}_loss={loss.name!r} is already registered; pass replace=True to replace it, or call "
            f"unregister_loss({loss.role!r}, {loss.name!r}) first."
        )
    _USER_LOSSES[key] = loss
    return loss


def unregister_loss(role: Literal["forget", "retain"], name: str) -> None:
    """Remove a loss added with `register_loss` (built-in losses cannot be removed).

    Raises:
        ValueError: If `name` is a built-in loss or was not registered.
    """
    key = (role, name)
    if key not in _USER_LOSSES:
        builtin = any((spec.role, spec.name) == key for spec in LOSS_REGISTRY)
        what = "a built-in loss and cannot be removed" if builtin else "not a registered loss"
        raise ValueError(f"{role}_loss={name!r} is {what}.")
    del _USER_LOSSES[key]


def loss_names(role: Literal["forget", "retain"]) -> tuple[str, ...]:
    """Names of the losses of one role the trainer accepts now (built-in first, then registered ones).

    Examples:
        >>> loss_names("retain")
        ('nll', 'kl', 'rmu')
    """
    return tuple(spec.name for spec in registered_losses() if spec.role == role)


def get_loss(role: Literal["forget", "retain"], name: str) -> UnlearningLoss:
    """The registry entry of a `forget_loss` / `retain_loss` name (built-in or registered).

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
    for spec in registered_losses():
        if spec.role == role and spec.name == name:
            return spec
    choices = ", ".join(repr(n) for n in loss_names(role))
    raise ValueError(
        f"`{role}_loss` must be one of {choices}, got {name!r}. To use a loss of your own, register it first with "
        "peft_unlearn.losses.register_loss."
    )


def reference_users(forget_loss: str, retain_loss: str | None) -> list[str]:
    """The chosen losses that need a reference model, as `"forget_loss='npo'"`-style strings (empty: none).

    Examples:
        >>> reference_users("npo", "kl"), reference_users("inverted_hinge", None)
        (["forget_loss='npo'", "retain_loss='kl'"], [])
    """
    chosen = [("forget", forget_loss)] + ([("retain", retain_loss)] if retain_loss is not None else [])
    return [f"{role}_loss={name!r}" for role, name in chosen if get_loss(role, name).needs_reference]


def loss_options() -> dict[str, list[str]]:
    """Each loss-specific config field -> the losses that read it, as `"forget_loss='npo'"`-style strings.

    Examples:
        >>> loss_options()["beta"]
        ["forget_loss='npo'", "forget_loss='simnpo'"]
    """
    users: dict[str, list[str]] = {}
    for spec in registered_losses():
        for option in spec.options:
            users.setdefault(option, []).append(f"{spec.role}_loss={spec.name!r}")
    return users


def loss_table(role: Literal["forget", "retain"]) -> str:
    """The Markdown table of one role's built-in losses, as `docs/concepts/losses.md` shows it (a test keeps them
    equal).

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


FORGET_LOSSES: tuple[str, ...] = tuple(spec.name for spec in LOSS_REGISTRY if spec.role == "forget")
"""Names of the built-in forget-set losses (`idk` is the NLL of "I don't know" answers)."""

RETAIN_LOSSES: tuple[str, ...] = tuple(spec.name for spec in LOSS_REGISTRY if spec.role == "retain")
"""Names of the built-in retain-set losses."""
