"""Configuration of `UnlearningTrainer`.

Examples:
    >>> from peft_unlearn import UnlearningConfig
    >>> args = UnlearningConfig(output_dir="out", forget_loss="npo", report_to="none")
    >>> args.beta
    0.1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..losses import FORGET_LOSSES, LOSS_REGISTRY, RETAIN_LOSSES, get_loss, loss_names
from .config_checks import check_finite_fields, warn_ignored_options

__all__ = [
    "ASSISTANT_TURNS",
    "DEFAULT_BETA",
    "FORGET_LOSSES",
    "KL_MASKS",
    "RETAIN_LOSSES",
    "RETAIN_PAIRINGS",
    "UnlearningConfig",
]

RETAIN_PAIRINGS: tuple[str, ...] = ("random", "cycle")
KL_MASKS: tuple[str, ...] = ("labels", "none")
ASSISTANT_TURNS: tuple[str, ...] = ("all", "last")
DEFAULT_BETA: dict[str, float] = {s.name: s.default_beta for s in LOSS_REGISTRY if s.default_beta is not None}


def _check_choice(name: str, value: Any, choices: tuple, extra: str = "") -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}{extra}, got {value!r}.")


def _parse_fused_loss(value: Any) -> bool | str:
    """`fused_loss` as True, False or "auto" (the command line passes strings)."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
        return {"true": True, "false": False, "auto": "auto"}[value.lower()]
    raise ValueError(f"`fused_loss` must be True, False or 'auto', got {value!r}.")


_TRUE_STRINGS = ("true", "yes", "1")
_FALSE_STRINGS = ("false", "no", "0")


def _strict_bool(name: str, value: Any) -> bool:
    """A bool switch that guards user files: bools as they are, only unambiguous strings parsed, all else refused.

    A string such as ``"false"`` (from a YAML file or an environment variable) is truthy in Python, so it would
    silently switch the protection off; it is parsed here instead.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise TypeError(
        f"`{name}` must be a bool (True or False; on the command line or in a string 'true'/'false'), got "
        f"{value!r} of type {type(value).__name__}. Pass {name}=False to keep files peft_unlearn did not write, or "
        f"{name}=True to allow overwriting them."
    )


def _check_paths(output_dir: Any, fila_cache: Any) -> None:
    """Refuse an `output_dir` that is an existing file and a `fila_cache` that is an existing folder."""
    import os

    if isinstance(output_dir, (str, os.PathLike)) and os.path.isfile(output_dir):
        raise NotADirectoryError(
            f"`output_dir` must be a folder, but {str(output_dir)!r} is an existing file; pass a new or existing "
            "folder path (the file is left untouched)."
        )
    if isinstance(fila_cache, (str, os.PathLike)) and os.path.isdir(fila_cache):
        raise IsADirectoryError(
            f"`fila_cache` must be a file path (the Fisher statistics are stored in one safetensors file), but "
            f"{str(fila_cache)!r} is a folder; pass e.g. {os.path.join(str(fila_cache), 'fisher.safetensors')!r}."
        )


@dataclass
class UnlearningConfig(TrainingArguments):
    r"""Configuration for `UnlearningTrainer`.

    Only the unlearning-specific parameters are listed; every
    `TrainingArguments` parameter is accepted too. Works with
    `HfArgumentParser` for command-line use.

    Args:
        forget_loss: Loss on the forget set: `"inverted_hinge"` (IHL, Cha et al. 2025), `"gradient_ascent"` (negated token
            NLL), `"npo"` (needs a reference: a PEFT adapter or `ref_model`), `"simnpo"` (reference free) or `"idk"`
            (NLL of the forget question paired with a random "I don't know" answer; needs prompt/completion or
            conversational data) or `"rmu"` (representation misdirection, Li et al. 2024: steer the hidden states of
            layer `rmu_layer` on forget tokens toward `rmu_steering_coeff * u`, `u` a random unit vector seeded by
            `seed`). The table of every loss is `peft_unlearn.losses.LOSS_REGISTRY`.
            Defaults to `"inverted_hinge"`.
        retain_loss: Loss on the retain set: `"nll"` (token NLL, as in GD/IHL), `"kl"` (KL to the reference model), `"rmu"`
            (MSE of the hidden states of layer `rmu_layer` to the reference model's: RMU's retain term, whose `alpha`
            is `retain_weight`) or `None` (no retain term; a retain dataset is then only used for the FILA Fisher
            estimate).
            Defaults to `"nll"`.
        forget_weight: Weight of the forget loss (the `gamma` of SimNPO). Defaults to `1.0`.
        retain_weight: Weight of the retain loss. Defaults to `1.0`.
        beta: Inverse temperature of NPO/SimNPO. `None` uses `0.1` for NPO and `4.5` for SimNPO.
        simnpo_delta: Margin `delta` of SimNPO. Defaults to `0.0`.
        quantization_margin: A defence against the quantization attack (the idea of QUAIL, arXiv 2601.15538),
            with `forget_loss="inverted_hinge"` only: adds `max(0, z_y - max_{v != y} z_v + m)` per forget token
            (see `peft_unlearn.losses.quantization_margin_loss`), so the forgotten token trails the best other one by
            `m` logits. Its measured effect is in docs/guides/robustness.md. Defaults to `None` (off).
        retain_subspace_weight: Weight `lambda` of the retain-subspace penalty (ROL of ReGLU, arXiv 2604.17396), usable
            with any init: adds `lambda * sum over LoRA layers of ||Q_r^T B||_F^2` to the loss once per optimizer
            step, where `Q_r` are the top `retain_subspace_rank` eigenvectors of the layer's retain output covariance
            (base model, computed by `train()` before the first step from the retain dataset) and `B` the layer's
            `lora_B` (see `peft_unlearn.trainer.retain_subspace`). Logged as `retain_subspace_loss` (unweighted).
            Needs a retain dataset and a PEFT (LoRA) model. The official code uses 0.5. Defaults to `0.0` (off).
        retain_subspace_rank: Size `k` of the retain subspace `Q_r` of each layer, clamped to the layer's output size
            (official: 128). Defaults to `128`.
        kl_mask: Positions of the retain KL: `"labels"` (only positions predicting a supervised token) or `"none"`
            (every position, padding included: parity with the official code; not exact under gradient
            accumulation because padding depends on the micro-batch).
            Defaults to `"labels"`.
        rmu_layer: Decoder layer whose output RMU steers (`forget_loss="rmu"`) and keeps (`retain_loss="rmu"`): hidden
            states `hidden_states[rmu_layer + 1]` of the model's output; negative values count from the last layer.
            `None` uses `num_layers // 4` (WMDP steers layer 7 of Zephyr-7B's 32).
        rmu_steering_coeff: RMU's steering coefficient `c`, the norm of the forget target `c * u`; choose it large compared with the
            layer's activation norms (WMDP: 6.5 for Zephyr-7B). RMU's `alpha` is `retain_weight`.
            Defaults to `6.5`.
        fused_loss: Compute the token-level losses (IHL, NLL, gradient ascent/difference, NPO/SimNPO, KL, IDK, and the
            logged NLL of RMU) with the fused linear + loss path of `peft_unlearn.losses.fused`: the model runs for its
            last hidden states only and the `[tokens, vocab]` logits are processed in chunks of `loss_chunk_size`
            tokens, never materialized (same values and gradients up to rounding). `"auto"` uses it whenever the model
            supports it (a linear output projection, tied or not, optional soft-capping, a forward with
            `logits_to_keep`; LoRA on `lm_head` is not supported), `True` requires it (error otherwise), `False`
            uses the full logits. The same setting drives `evaluate()`: its `eval_{name}_loss` (the token NLL, or
            the unlearning loss of a paired set) and its teacher-forced metrics `_ma`, `_nll` and `_ppl`
            (`evaluate_memorization(fused=...)`: argmax and log-probs of the counted tokens, `loss_chunk_size` at a
            time). The extraction likelihood `_el{n}` is greedy generation, which only ever computes the last
            position's logits, so it needs no chunking. Defaults to `"auto"`.
        loss_chunk_size: Tokens per chunk of the fused path (training and `evaluate()`). `None` picks about 2**24 logits per chunk (64 tokens at a
            262,144-token vocabulary). Larger chunks are faster on GPUs and cost `chunk * vocab * 4` bytes each.
        max_length: Maximum tokenized length; longer sequences are truncated on the right. `None`: no truncation. Defaults to `512`.
        completion_only_loss: For prompt/completion and conversational data, supervise only the completion (assistant) tokens. `False`
            supervises every token.
            Defaults to `True`.
        assistant_turns: For `messages` data with `completion_only_loss=True`: supervise `"all"` assistant turns or only the
            `"last"` one.
            Defaults to `"all"`.
        retain_pairing: How each forget example gets its retain example: `"random"` (drawn per forget example, redrawn every
            epoch, seeded by `data_seed` or `seed`; the paper's protocol) or `"cycle"` (deterministic round robin).
            Defaults to `"random"`.
        idk_answers: Answers for `forget_loss="idk"`. `None` uses a built-in list of about 20 "I don't know" variants.
        eval_el_n: `n` values of the extraction likelihood `EL_n` reported by `evaluate()` (`eval_{name}_el{n}`). Defaults to `[10]`.
        eval_el_prefix_stride: Stride between the prefixes of the extraction likelihood (1 = every prefix, as in the TDEC protocol). Defaults to `1`.
        eval_compute_el: Whether `evaluate()` computes the (expensive) extraction likelihood. Defaults to `True`.
        overwrite_output: Allow saves (`save_model`, checkpoints, Hub pushes) to overwrite files in the target folder
            that peft_unlearn did not write, and to save an adapter into a folder that holds a base model. Without it
            such a save is refused before anything is written. A user's `README.md` is never replaced. Defaults to
            `False`.
        model_init_kwargs: Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is given as a string.
        fila_batch_size: Batch size of the Fisher-estimation pass over the forget and retain sets. Defaults to `4`.
        fila_max_batches: Cap on the number of Fisher batches per set (`None`: the whole set).
        fila_cache: Path where the Fisher statistics are cached and reused.
        fila_accumulator_device: Where the fp32 Fisher accumulators live: `None` (next to each weight) or
            `"cpu"` (host memory, the low-memory mode; identical statistics).
        fila_layers_per_pass: Process the target layers in groups of this many, one data pass per group
            (identical statistics); `None`: one pass.
        fila_seed: Seed of FILA's randomized SVD (used for layers larger than `FilaConfig.exact_svd_max_dim`, which get an
            exact SVD otherwise); None keeps the adapter config's `fila_config.seed` (42 by default). The
            global RNG state is restored afterwards.
            Defaults to `None`.

    Note:
        Defaults that differ from `TrainingArguments`: `learning_rate=1e-3` (instead of 5e-5: the rate the
        library's benchmark found sound for LoRA adapters; full fine-tuning needs a much lower one, e.g. 1e-5),
        `logging_steps=10` (instead of 500),
        `remove_unused_columns=False` (the trainer feeds `forget_*`/`retain_*` columns), and
        `activation_checkpointing_kwargs={"use_reentrant": False}` when activation checkpointing is on.

    Examples:
        >>> args = UnlearningConfig(output_dir="out", forget_loss="simnpo", retain_loss=None, report_to="none")
        >>> (args.beta, args.retain_loss)
        (4.5, None)
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # ---- overridden TrainingArguments defaults ----
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Initial learning rate of the optimizer. 1e-3 (instead of 5e-5) is the rate the library's init "
            "benchmark found sound for LoRA adapters (PEFT's default init, and FILA/VILA/RILA at "
            "factor_scale='stable'): the forget set is forgotten in a few steps without hurting never-seen text. "
            "Full fine-tuning (no adapter) needs a much lower rate, e.g. 1e-5."
        },
    )
    logging_steps: float = field(
        default=10,
        metadata={
            "help": "Log every X update steps. An integer, or a float in [0, 1) read as a ratio of the total steps."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: the trainer feeds `forget_*`/`retain_*` columns that the model signature lacks."
        },
    )

    # ---- objective ----
    forget_loss: str = field(
        default="inverted_hinge",
        metadata={
            "help": "Forget-set loss.",
            "choices": list(FORGET_LOSSES),
        },
    )
    retain_loss: str | None = field(
        default="nll",
        metadata={
            "help": f"Retain-set loss: {', '.join(map(repr, RETAIN_LOSSES))} or None / 'none' (no retain term).",
            "choices": [*RETAIN_LOSSES, "none", "None"],
        },
    )
    forget_weight: float = field(default=1.0, metadata={"help": "Weight of the forget loss."})
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the retain loss."})
    beta: float | None = field(
        default=None,
        metadata={"help": "NPO/SimNPO inverse temperature; None uses 0.1 (NPO) or 4.5 (SimNPO)."},
    )
    simnpo_delta: float = field(default=0.0, metadata={"help": "SimNPO margin delta."})
    rmu_layer: int | None = field(
        default=None,
        metadata={"help": "Decoder layer steered by RMU (forget/retain_loss='rmu'); None uses num_layers // 4."},
    )
    rmu_steering_coeff: float = field(
        default=6.5, metadata={"help": "RMU steering coefficient c: norm of the forget target c * u."}
    )
    quantization_margin: float | None = field(
        default=None,
        metadata={
            "help": "Defence against the quantization attack (QUAIL-style, arXiv 2601.15538), with "
            "forget_loss='inverted_hinge': adds max(0, z_y - max_{v != y} z_v + m) per forget token, so the forgotten "
            "token trails the best other one by m logits. None: off. Measured in docs/guides/robustness.md."
        },
    )
    retain_subspace_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight lambda of the retain-subspace penalty (ReGLU's ROL, arXiv 2604.17396), any init: adds "
            "lambda * sum over LoRA layers of ||Q_r^T B||_F^2, Q_r the top retain_subspace_rank eigenvectors of the "
            "layer's retain output covariance, B its lora_B. Needs retain data. 0: off (official code: 0.5)."
        },
    )
    retain_subspace_rank: int = field(
        default=128,
        metadata={"help": "Size of each layer's retain subspace Q_r (clamped to the output size; official: 128)."},
    )
    kl_mask: str = field(
        default="labels",
        metadata={
            "help": "Positions of the retain KL: 'labels' (supervised positions) or 'none' (all positions).",
            "choices": list(KL_MASKS),
        },
    )

    fused_loss: str = field(
        default="auto",
        metadata={
            "help": "Compute the token-level losses from the last hidden states in chunks, never materializing the "
            "[tokens, vocab] logits: 'auto' (when the model supports it), True (required) or False (full logits). "
            "Also drives evaluate(): its eval loss and its MA / NLL / perplexity (the extraction likelihood is "
            "greedy generation, last-position logits only).",
            "choices": ["auto", "true", "false"],
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the fused loss path (training and evaluate()); None picks about 2**24 "
            "logits per chunk (64 tokens at a 262,144-token vocabulary)."
        },
    )

    # ---- data ----
    max_length: int | None = field(
        default=512,
        metadata={"help": "Maximum tokenized length (right truncation); None disables truncation."},
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Supervise only completion/assistant tokens of prompt-completion and conversational data."},
    )
    assistant_turns: str = field(
        default="all",
        metadata={
            "help": "Supervised assistant turns of `messages` data: 'all' or 'last'.",
            "choices": list(ASSISTANT_TURNS),
        },
    )
    retain_pairing: str = field(
        default="random",
        metadata={
            "help": "Retain example of each forget example: 'random' (redrawn each epoch, seeded) or 'cycle'.",
            "choices": list(RETAIN_PAIRINGS),
        },
    )
    idk_answers: list[str] | None = field(
        default=None,
        metadata={"help": "Answers for forget_loss='idk'; None uses a built-in list of 'I don't know' variants."},
    )

    # ---- evaluation ----
    eval_el_n: list[int] = field(
        default_factory=lambda: [10],
        metadata={"help": "n values of the extraction likelihood EL_n reported by evaluate()."},
    )
    eval_el_prefix_stride: int = field(
        default=1, metadata={"help": "Stride between the prefixes of the extraction likelihood."}
    )
    eval_compute_el: bool = field(
        default=True, metadata={"help": "Whether evaluate() computes the extraction likelihood."}
    )

    # ---- saving ----
    overwrite_output: bool = field(
        default=False,
        metadata={
            "help": "Allow saves to overwrite files in output folders that peft_unlearn did not write (a user's "
            "README.md is kept regardless)."
        },
    )

    # ---- model ----
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when `model` is a string."},
    )

    # ---- FILA ----
    fila_batch_size: int = field(default=4, metadata={"help": "Batch size of the FILA Fisher-estimation pass."})
    fila_max_batches: int | None = field(
        default=None, metadata={"help": "Maximum number of Fisher batches per set (None: whole set)."}
    )
    fila_cache: str | None = field(
        default=None, metadata={"help": "Path where the FILA Fisher statistics are cached and reused."}
    )
    fila_accumulator_device: str | None = field(
        default=None,
        metadata={
            "help": "Where the fp32 Fisher accumulators of the FILA pass live: None (next to each weight) or 'cpu' "
            "(host memory: the low-memory mode, identical statistics; the accelerator then needs no more memory "
            "than one unlearning step)."
        },
    )
    fila_layers_per_pass: int | None = field(
        default=None,
        metadata={
            "help": "Process the FILA target layers in groups of this many, one pass over the data per group "
            "(identical statistics, accumulators for one group at a time). None: all layers in one pass."
        },
    )
    fila_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of FILA's randomized SVD. None keeps the adapter config's `fila_config.seed` "
            "(42, the official value, unless a `FilaLoraConfig` sets another)."
        },
    )

    def __post_init__(self) -> None:
        self.overwrite_output = _strict_bool("overwrite_output", self.overwrite_output)
        _check_paths(self.output_dir, self.fila_cache)
        if isinstance(self.retain_loss, str) and self.retain_loss.lower() == "none":  # command line
            self.retain_loss = None
        get_loss("forget", self.forget_loss)  # built-in or registered with `register_loss`; the error lists them
        _check_choice("retain_loss", self.retain_loss, (*loss_names("retain"), None))
        _check_choice("kl_mask", self.kl_mask, KL_MASKS)
        _check_choice("retain_pairing", self.retain_pairing, RETAIN_PAIRINGS)
        _check_choice("assistant_turns", self.assistant_turns, ASSISTANT_TURNS)
        if self.rmu_layer is not None and (isinstance(self.rmu_layer, bool) or not isinstance(self.rmu_layer, int)):
            raise ValueError(f"`rmu_layer` must be an integer layer index or None, got {self.rmu_layer!r}.")
        if not isinstance(self.rmu_steering_coeff, (int, float)) or not 0 < self.rmu_steering_coeff < float("inf"):
            raise ValueError(f"`rmu_steering_coeff` must be a finite number > 0, got {self.rmu_steering_coeff!r}.")
        check_finite_fields(self)
        self.fused_loss = _parse_fused_loss(self.fused_loss)
        if self.loss_chunk_size is not None and (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(
                f"`loss_chunk_size` must be an integer >= 1 (tokens per chunk) or None (automatic), got "
                f"{self.loss_chunk_size!r}."
            )

        if self.quantization_margin is not None:
            margin = self.quantization_margin
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
                raise ValueError(f"`quantization_margin` must be a finite number > 0 or None, got {margin!r}.")
            if self.forget_loss != "inverted_hinge":
                raise ValueError(
                    f"`quantization_margin` is implemented for forget_loss='inverted_hinge' only, got forget_loss="
                    f"{self.forget_loss!r}; drop quantization_margin or use the inverted hinge loss."
                )
        weight = self.retain_subspace_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(
                f"`retain_subspace_weight` must be a finite number >= 0, got {weight!r}; use 0 to switch the "
                "retain-subspace penalty off (the official ReGLU code uses 0.5)."
            )
        rank = self.retain_subspace_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"`retain_subspace_rank` must be an integer >= 1 (eigenvectors per layer, clamped to its output size), "
                f"got {rank!r}; the official ReGLU code uses 128."
            )
        for name in ("forget_weight", "retain_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}; use 0 to switch a term off.")
        if self.beta is None:
            self.beta = get_loss("forget", self.forget_loss).default_beta
        elif not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"`beta` must be > 0 (or None for the default of the forget loss), got {self.beta!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(
                f"`max_length` must be an integer >= 2 (a token must follow the first one to be supervised) or "
                f"None, got {self.max_length!r}."
            )
        if self.idk_answers is not None:
            if isinstance(self.idk_answers, str) or not all(isinstance(a, str) and a for a in self.idk_answers):
                raise ValueError(
                    f"`idk_answers` must be a list of non-empty strings or None, got {self.idk_answers!r}."
                )
            if len(self.idk_answers) == 0:
                raise ValueError("`idk_answers` is empty; pass at least one answer or None for the built-in list.")
            self.idk_answers = list(self.idk_answers)
        if isinstance(self.eval_el_n, int):
            self.eval_el_n = [self.eval_el_n]
        self.eval_el_n = list(self.eval_el_n)
        if not all(isinstance(n, int) and n >= 1 for n in self.eval_el_n):
            raise ValueError(f"`eval_el_n` must be a list of integers >= 1, got {self.eval_el_n!r}.")
        if not isinstance(self.eval_el_prefix_stride, int) or self.eval_el_prefix_stride < 1:
            raise ValueError(f"`eval_el_prefix_stride` must be an integer >= 1, got {self.eval_el_prefix_stride!r}.")
        if not isinstance(self.fila_batch_size, int) or self.fila_batch_size < 1:
            raise ValueError(f"`fila_batch_size` must be an integer >= 1, got {self.fila_batch_size!r}.")
        if self.fila_layers_per_pass is not None and (
            isinstance(self.fila_layers_per_pass, bool)
            or not isinstance(self.fila_layers_per_pass, int)
            or self.fila_layers_per_pass < 1
        ):
            raise ValueError(
                f"`fila_layers_per_pass` must be an integer >= 1 or None, got {self.fila_layers_per_pass!r}."
            )
        if self.fila_accumulator_device is not None:
            import torch

            try:
                torch.device(self.fila_accumulator_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`fila_accumulator_device` must be None or a torch device such as 'cpu', got "
                    f"{self.fila_accumulator_device!r} ({err})."
                ) from None
        if self.fila_max_batches is not None and (
            not isinstance(self.fila_max_batches, int) or self.fila_max_batches < 1
        ):
            raise ValueError(f"`fila_max_batches` must be an integer >= 1 or None, got {self.fila_max_batches!r}.")

        warn_ignored_options(self)
        super().__post_init__()

        if self.activation_checkpointing and self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
