"""`UnlearningTrainer`: a Hugging Face `Trainer` for LLM unlearning (IHL, GA, NPO, SimNPO, IDK + NLL/KL retain).

Each training item is one forget example paired with one retain example (see
[`PairedUnlearningDataset`][peft_unlearn.trainer.pairing.PairedUnlearningDataset]). The loss of a step is

    forget_weight * forget_loss(forget batch) + retain_weight * retain_loss(retain batch)

with separate forward passes for the two parts. Under gradient accumulation the token (or sequence) means are
taken over the whole accumulated batch, across processes, so ``batch 4 x accumulation 1`` and ``batch 2 x
accumulation 2`` give the same update.

Examples:
    >>> from datasets import Dataset  # doctest: +SKIP
    >>> from peft import LoraConfig  # doctest: +SKIP
    >>> trainer = UnlearningTrainer(  # doctest: +SKIP
    ...     model="google/gemma-3-270m",
    ...     args=UnlearningConfig(output_dir="out", forget_loss="inverted_hinge", retain_loss="nll"),
    ...     forget_dataset=Dataset.from_list([{"text": "Jane Doe was born in Paris."}]),
    ...     retain_dataset=Dataset.from_list([{"text": "The quick brown fox."}]),
    ...     peft_config=LoraConfig(r=8, target_modules="all-linear"),
    ... )
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .. import losses as L
from ..utils import is_peft_model
from .adapter_init import init_metrics, initialize_pending_adapters
from .collators import CausalLMCollator, UnlearningDataCollator
from .evaluation import causal_lm_dataloader, causal_lm_nll, memorization_metrics, tokenize_eval_sets
from .finite_guard import FiniteGuard
from .formats import ensure_pad_token, tokenize_dataset, tokenize_idk_dataset
from .item_counts import UnlearningItemCounts, count_items
from .model_card import PAPER_CITATION
from .pairing import PairedUnlearningDataset, PairingEpochCallback, TokenizedDataset
from .reference import check_reference, reference_forward
from .retain_subspace import RetainSubspace, compute_retain_subspace
from .run_checks import (
    check_causal_lm,
    check_liger_kernel,
    check_reference_vocab,
    check_resume_checkpoint,
    check_sequence_lengths,
    check_token_ids,
    check_tokenizer_fits,
    check_trained_some_steps,
    check_trainer_options,
    check_trains_some_steps,
    embedding_size,
    load_causal_lm,
    max_positions,
    warn_full_finetune_learning_rate,
    warn_ignored_run_options,
)
from .saving import UnlearningSavingMixin, is_data_driven_peft_model
from .unlearning_config import UnlearningConfig

__all__ = ["UnlearningItemCounts", "UnlearningTrainer"]

logger = logging.getLogger(__name__)

_BATCH_PREFIXES = ("forget", "retain", "idk")


class UnlearningTrainer(UnlearningSavingMixin, Trainer):
    """Trainer for knowledge unlearning with forget/retain objectives, PEFT and FILA support.

    Args:
        model: A causal LM, a PeftModel, or a Hub id / local path (loaded with ``AutoModelForCausalLM`` and
            ``args.model_init_kwargs``).
        args: An [`UnlearningConfig`][peft_unlearn.trainer.unlearning_config.UnlearningConfig] (a plain ``TrainingArguments`` is upcast). Default:
            ``UnlearningConfig(output_dir="<model name>-Unlearning")``.
        forget_dataset: Data to forget, in any format of [`peft_unlearn.trainer.formats`][peft_unlearn.trainer.formats].
        retain_dataset: Data to retain (needed by ``retain_loss``; also used by FILA's Fisher estimate).
        processing_class: Tokenizer (or a processor with a ``tokenizer``); loaded from the model when None.
            Without a pad token, EOS is used for padding (with a warning).
        data_collator: Collator of the paired items; default [`UnlearningDataCollator`][peft_unlearn.trainer.collators.UnlearningDataCollator].
        eval_dataset: A dataset (named ``"forget"``) or a dict name -> dataset, any supported format;
            `evaluate` logs ``eval_{name}_loss``, ``_ma``, ``_el{n}``, ``_nll``, ``_ppl``.
        callbacks: Extra callbacks.
        peft_config: A ``peft.PeftConfig`` to wrap ``model`` with (not allowed when ``model`` already is a
            PeftModel).
        ref_model: Reference model for NPO / KL (frozen, eval mode). Without it, PEFT models use the model with
            adapters disabled (the starting model for fresh default-LoRA, FILA and VILA adapters), so no second
            model is loaded (see `peft_unlearn.trainer.reference`).
        optimizers: ``(optimizer, scheduler)`` as for ``Trainer``.
        optimizer_cls_and_kwargs: As for ``Trainer``.

    Examples:
        >>> trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain,  # doctest: +SKIP
        ...                             processing_class=tokenizer, peft_config=LoraConfig(r=8))
        >>> trainer.train()  # doctest: +SKIP
    """

    _tag_names = ["unlearning", "peft-unlearn"]
    _name = "Unlearning"
    _paper = {
        "title": "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs",
        "id": "2408.06621",
        "citation": PAPER_CITATION,
    }
    # compute_loss divides by the token/sequence counts of the whole accumulated batch (see get_batch_samples)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        args: TrainingArguments | None = None,
        forget_dataset: Any = None,
        retain_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        eval_dataset: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        peft_config: Any = None,
        ref_model: nn.Module | str | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
    ):
        # construction: resolve every input into the objects the run uses; `validate` then checks them all
        args = _as_unlearning_config(args, model)
        model = _as_model(model, args)
        processing_class, tokenizer = _as_tokenizer(processing_class, model)
        pad_token_id = ensure_pad_token(tokenizer)
        model = _with_peft(model, peft_config, args)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, args.model_init_kwargs, arg="ref_model")
        self._needs_reference = bool(L.reference_users(args.forget_loss, args.retain_loss))
        # the fused linear + loss path: resolved before any data work, so an unsupported fused_loss=True fails fast
        self._fused_loss = L.use_fused_loss(args.fused_loss, model, ref_model)
        self._tokenizer = tokenizer
        self._pad_token_id = pad_token_id
        self._model_for_checks = model
        tok_kwargs = {
            "max_length": args.max_length,
            "completion_only_loss": args.completion_only_loss,
            "assistant_turns": args.assistant_turns,
        }
        self._forget_examples = (
            tokenize_dataset(forget_dataset, tokenizer, name="forget", **tok_kwargs)
            if forget_dataset is not None
            else None
        )
        self._retain_examples = (
            tokenize_dataset(retain_dataset, tokenizer, name="retain", **tok_kwargs)
            if retain_dataset is not None
            else None
        )

        self.validate(model=model, args=args, ref_model=ref_model)
        if ref_model is not None and not self._needs_reference:
            logger.warning(
                "`ref_model` is unused: neither forget_loss=%r nor retain_loss=%r needs it.",
                args.forget_loss,
                args.retain_loss,
            )
            ref_model = None

        idk = None
        if args.forget_loss == "idk":
            idk = tokenize_idk_dataset(forget_dataset, tokenizer, args.idk_answers, max_length=args.max_length)
        seed = args.data_seed if args.data_seed is not None else args.seed
        train_dataset = PairedUnlearningDataset(
            self._forget_examples,
            self._retain_examples if args.retain_loss is not None else None,
            pairing=args.retain_pairing,
            seed=seed,
            idk=idk,
        )
        self._eval_sets = self._tokenize_eval_sets(eval_dataset, args) if eval_dataset is not None else None
        self._memorization_target: list[dict[str, list[int]]] | None = None
        self._in_checkpoint_save = False
        self._finite_guard = FiniteGuard()
        self._num_params: int | None = None
        self.fila_stats: dict[str, Any] = {}
        self._retain_subspace: RetainSubspace | None = None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._dataset_sizes = {"forget": len(self._forget_examples)}
        if self._retain_examples is not None:
            self._dataset_sizes["retain"] = len(self._retain_examples)
        if data_collator is None:
            data_collator = UnlearningDataCollator(pad_token_id)
        if is_peft_model(model) and args.activation_checkpointing:
            model.enable_input_require_grads()

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        self.add_callback(PairingEpochCallback(train_dataset))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

        self.ref_model = None
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------------------------

    def validate(
        self,
        model: nn.Module | None = None,
        args: UnlearningConfig | None = None,
        ref_model: nn.Module | None = None,
    ) -> None:
        """Check the run's inputs together: every check of the trainer, in one place (`__init__` calls it once).

        The model is a causal LM whose vocabulary and positions fit the tokenizer and the data, the losses have the
        reference and the data they need, the options work together (warnings for options the run ignores). Called
        again after construction (no arguments: the trainer's own model, args and reference) it re-checks them, e.g.
        after changing `args`.

        Args:
            model: The trained model (default: the trainer's).
            args: The run's config (default: the trainer's).
            ref_model: The separate reference model, if any (default: the trainer's).

        Raises:
            ValueError / TypeError: Naming the argument, what was expected and how to fix it.
        """
        constructed = model is None
        model = self.accelerator.unwrap_model(self.model) if constructed else model
        args = self.args if args is None else args
        if constructed and ref_model is None:
            ref_model = self.ref_model
        check_causal_lm(model)
        check_tokenizer_fits(self._tokenizer, model)
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "`ref_model` must not be the trained model itself; pass a separate (frozen) copy or None."
            )
        reference_users = L.reference_users(args.forget_loss, args.retain_loss)
        if reference_users:
            check_reference(model, ref_model, " and ".join(reference_users))
        check_liger_kernel(args, self._fused_loss)
        if self._forget_examples is None:
            raise ValueError("`forget_dataset` is required: the data to unlearn.")
        if args.retain_loss is not None and self._retain_examples is None:
            raise ValueError(
                f"retain_loss={args.retain_loss!r} needs a `retain_dataset`; pass one, or set retain_loss=None to "
                "train on the forget loss alone."
            )
        if args.retain_subspace_weight > 0 and (self._retain_examples is None or not is_peft_model(model)):
            raise ValueError(
                f"retain_subspace_weight={args.retain_subspace_weight!r} penalises the LoRA weights inside the retain "
                "subspace, so it needs a `retain_dataset` and a PEFT (LoRA) model (pass `peft_config` or a PeftModel); "
                "set retain_subspace_weight=0 otherwise."
            )
        self._check_examples("forget", self._forget_examples, args, model)
        if self._retain_examples is not None:
            self._check_examples("retain", self._retain_examples, args, model)
        check_reference_vocab(model, ref_model)
        is_data_driven = is_data_driven_peft_model(model)
        warn_ignored_run_options(args, has_retain_data=args.retain_loss is not None, is_fila=is_data_driven)
        check_trainer_options(args, is_fila=is_data_driven)
        warn_full_finetune_learning_rate(args, has_adapter=is_peft_model(model))

    # ------------------------------------------------------------------------------------------------------------
    # data helpers
    # ------------------------------------------------------------------------------------------------------------

    def _check_examples(
        self, name: str, examples: list, args: UnlearningConfig, model: nn.Module | None = None
    ) -> None:
        """Token ids inside the vocabulary, lengths inside the model's positions (clear errors, not IndexError)."""
        model = self._model_for_checks if model is None else model
        check_token_ids(examples, embedding_size(model), name)
        check_sequence_lengths(examples, max_positions(model), name, args.max_length)

    def _tokenize_eval_sets(self, eval_dataset: Any, args: UnlearningConfig | None = None) -> dict[str, list]:
        args = args or self.args
        return tokenize_eval_sets(
            eval_dataset, self._tokenizer, args, lambda name, ex: self._check_examples(name, ex, args)
        )

    def _causal_lm_dataloader(self, examples: list, batch_size: int, shard: bool = False) -> DataLoader:
        shards = (self.args.process_index, self.args.world_size) if shard else None
        return causal_lm_dataloader(examples, batch_size, self._pad_token_id, shard=shards)

    # Private override (as TRL's trainers do): Trainer drops every batch column the model's forward does not take,
    # and the paired batch's prefixed columns are inputs of compute_loss, not of the model; this is the only place
    # Trainer reads the kept columns from (remove_unused_columns=False would also keep a user's extra columns).
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            keys = ("input_ids", "attention_mask", "labels")
            self._signature_columns = [f"{p}_{k}" for p in _BATCH_PREFIXES for k in keys] + list(keys)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        if isinstance(eval_dataset, TokenizedDataset):
            loader = DataLoader(
                eval_dataset,
                batch_size=self.args.eval_batch_size,
                shuffle=False,
                collate_fn=CausalLMCollator(self._pad_token_id),
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            return self.accelerator.prepare(loader)
        return super().get_eval_dataloader(eval_dataset)

    # ------------------------------------------------------------------------------------------------------------
    # reference model
    # ------------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reference_model(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Context manager yielding a module that computes the reference (starting) model, in eval mode, no grad.

        With ``ref_model`` that model; otherwise ``model`` (default: the trained model) with its adapters disabled
        (`peft_unlearn.trainer.reference.reference_forward`). Train mode and ``requires_grad`` flags are restored.

        Args:
            model: The (possibly wrapped) trained model.

        Examples:
            >>> with trainer.reference_model() as ref:  # doctest: +SKIP
            ...     ref_logits = ref(input_ids=ids).logits
        """
        model = self.model if model is None else model
        with reference_forward(model, self.ref_model, unwrapped=self.accelerator.unwrap_model(self.model)) as ref:
            yield ref

    # ------------------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _logits(model: nn.Module, inputs: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
        return model(
            input_ids=inputs[f"{prefix}_input_ids"],
            attention_mask=inputs[f"{prefix}_attention_mask"],
            use_cache=False,
        ).logits

    def _loss_specs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, L.UnlearningLoss]:
        """Registry entries of the forget loss and, when the batch has retain data, the retain loss."""
        specs = {"forget": L.get_loss("forget", self.args.forget_loss)}
        if self.args.retain_loss is not None and "retain_input_ids" in batch:
            specs["retain"] = L.get_loss("retain", self.args.retain_loss)
        return specs

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, UnlearningItemCounts | None]:
        """Fetch the micro-batches of one optimizer step and count their forget/retain items (all processes)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or "forget_input_ids" not in batch_samples[0]:
            return batch_samples, None
        counts = count_items(batch_samples, self._loss_specs(batch_samples[0]), self.args, device, self.accelerator)
        return batch_samples, counts

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted forget + retain loss of a paired batch.

        With ``num_items_in_batch`` an [`UnlearningItemCounts`][peft_unlearn.trainer.item_counts.UnlearningItemCounts] (training), the sums are divided by the
        counts of the whole accumulated batch; otherwise (evaluation, direct calls) by the counts of this batch.
        """
        args = self.args
        counts = num_items_in_batch if isinstance(num_items_in_batch, UnlearningItemCounts) else None
        mode = "train" if model.training else "eval"
        batch = L.LossBatch(inputs, args, fused=self._fused_loss)
        specs = self._loss_specs(inputs)

        # Reference passes first: disabling adapters changes `requires_grad` flags, which must not happen while a
        # graph through the trained adapter is alive.
        references: dict[str, Any] = {}
        if any(spec.reference is not None for spec in specs.values()):
            with self.reference_model(model) as ref:
                references = {
                    role: spec.reference(batch, ref) for role, spec in specs.items() if spec.reference is not None
                }

        # One forward pass (or two, for IDK's logged NLL) per part, in order, so only one part's logits are alive.
        terms = {role: spec.term(batch, model, references.get(role)) for role, spec in specs.items()}

        # ---- normalise and combine; metrics are per micro-batch means ----
        loss = 0.0
        values: dict[str, torch.Tensor] = {}
        weights = {"forget": args.forget_weight, "retain": args.retain_weight}
        for role, term in terms.items():
            global_count = getattr(counts, role, None) if counts is not None else None
            denominator = term.count if global_count is None else global_count
            loss = loss + weights[role] * (term.total / denominator.clamp_min(1).to(term.total.dtype))
            values[f"{role}_loss"] = term.total.detach() / term.count.clamp_min(1)
            values[f"{role}_nll"] = term.nll.detach()
        if counts is not None:
            loss = loss * counts.loss_scale
        loss = loss + self._retain_subspace_term(values, training=counts is not None)
        self._record_metrics(mode, values)

        if return_outputs:
            return loss, {k: v for k, v in values.items()}
        return loss

    def _retain_subspace_term(self, values: dict[str, torch.Tensor], training: bool) -> torch.Tensor | float:
        """``retain_subspace_weight * sum ||Q_r^T B||_F^2``, once per optimizer step (see `trainer.retain_subspace`).

        The penalty is the same on every process (DDP averages its gradient) and is split over the micro-batches of
        a step, so gradient accumulation does not change it. Logged unweighted as ``retain_subspace_loss``.
        """
        if self._retain_subspace is None:
            return 0.0
        penalty = self._retain_subspace.penalty()
        values["retain_subspace_loss"] = penalty.detach()
        micro_batches = getattr(self, "current_gradient_accumulation_steps", 1) if training else 1
        return self.args.retain_subspace_weight * penalty / max(int(micro_batches), 1)

    def _maybe_compute_retain_subspace(self) -> RetainSubspace | None:
        """Compute the retain subspaces ``Q_r`` of the trained adapter(s) when ``retain_subspace_weight > 0``."""
        if self.args.retain_subspace_weight <= 0 or self._retain_subspace is not None:
            return self._retain_subspace
        model = self.accelerator.unwrap_model(self.model)
        adapters = list(getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")])
        options = {
            "accumulator_device": self.args.fila_accumulator_device,
            "layers_per_pass": self.args.fila_layers_per_pass,
        }
        self._retain_subspace = compute_retain_subspace(
            model,
            self._fila_loaders()[1],
            self.args.retain_subspace_rank,
            adapters,
            max_batches=self.args.fila_max_batches,
            covariance_options={k: v for k, v in options.items() if v is not None},
            show_progress=not self.args.disable_tqdm and self.is_world_process_zero(),
        )
        self._metrics["train"]["retain_subspace_seconds"].append(self._retain_subspace.seconds)
        return self._retain_subspace

    def _record_metrics(self, mode: str, values: Mapping[str, torch.Tensor]) -> None:
        names = list(values)
        stacked = torch.stack([values[n].float().reshape(()) for n in names])
        if self.args.world_size > 1:
            stacked = self.accelerator.gather(stacked.unsqueeze(0)).reshape(-1, len(names)).mean(0)
        for name, value in zip(names, stacked.tolist()):
            self._metrics[mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged ``forget_loss``, ``retain_loss``, ``forget_nll``, ``retain_nll`` to the logs."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Loss of an evaluation batch: token NLL of a plain causal-LM batch, the unlearning loss of a paired one."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if "forget_input_ids" in inputs:
                loss = self.compute_loss(model, inputs)
            else:
                loss = causal_lm_nll(model, inputs, fused=self._fused_loss, chunk_rows=self.args.loss_chunk_size)
        return loss.detach(), None, None

    def _guard_settings(self) -> dict[str, Any]:
        names = ("learning_rate", "forget_loss", "forget_weight", "max_grad_norm", "fp16", "bf16")
        return {name: getattr(self.args, name, None) for name in names}

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """`Trainer.training_step`, then stop the run if the loss is NaN/inf (see `finite_guard`)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._finite_guard.check_loss(loss, self.state.global_step + 1, self._guard_settings())
        return loss

    # Private override: the gradient norm Trainer computes before each optimizer step is visible only here (the
    # on_pre_optimizer_step callback gets no norm, and computing it again would cost a pass over every gradient,
    # with collectives under FSDP/DeepSpeed); the guard stops the run before a NaN/inf gradient is applied.
    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._finite_guard.check_grad_norm(grad_norm, self.state.global_step + 1, self._guard_settings())
        return grad_norm

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """``6 * tokens * parameters`` over the forget, retain and IDK parts of the batch."""
        if self._num_params is None:
            model = self.accelerator.unwrap_model(self.model)
            self._num_params = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
        tokens = sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v))
        return 6 * tokens * self._num_params

    # ------------------------------------------------------------------------------------------------------------
    # training entry point and FILA
    # ------------------------------------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """Initialise pending FILA/VILA/RILA adapters (and the retain subspaces of ``retain_subspace_weight``), then
        run ``Trainer.train``.

        On resume the frozen initial factors are re-attached from the checkpoint's ``_fila_init/`` (the init is not
        re-run), so a fresh process (original base + ``get_peft_model(..., LoraConfig(init_lora_weights="fila"))``)
        continues exactly where the checkpoint left off.
        """
        resume_from_checkpoint = check_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        check_trains_some_steps(self.args)
        self.check_output_dir()
        self._maybe_initialize_fila(resume_from_checkpoint)
        self._maybe_compute_retain_subspace()
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )
        check_trained_some_steps(self.state.global_step, self.args)
        return output

    def _maybe_initialize_fila(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, Any] | None:
        """Initialise pending FILA/VILA adapters (or re-attach them on resume); see `trainer.adapter_init`.

        Args:
            resume_from_checkpoint: The checkpoint folder being resumed (`True`: the last one in `output_dir`).

        Returns:
            The statistics of the initialisation per adapter (also in `fila_stats`), or None when nothing was
            computed.
        """
        stats = initialize_pending_adapters(
            self.accelerator.unwrap_model(self.model),
            self.args,
            resume_from_checkpoint,
            loaders=self._fila_loaders,
            show_progress=not self.args.disable_tqdm and self.is_world_process_zero(),
        )
        if stats is None:
            return None
        self.fila_stats = stats
        for key, value in init_metrics(stats).items():
            self._metrics["train"][key].append(value)
        return stats

    def _fila_loaders(self) -> tuple[DataLoader, DataLoader | None]:
        batch_size = self.args.fila_batch_size
        forget = self._causal_lm_dataloader(self._forget_examples, batch_size, shard=True)
        retain = self._retain_examples
        return forget, None if retain is None else self._causal_lm_dataloader(retain, batch_size, shard=True)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Loss and memorization metrics of each evaluation set.

        Args:
            eval_dataset: A dataset (named ``"forget"``) or a dict name -> dataset in any supported format;
                default: the trainer's ``eval_dataset``.
            ignore_keys: Passed to ``Trainer.evaluate``.
            metric_key_prefix: Prefix of the metric names.

        Returns:
            Per set ``name``: ``{prefix}_{name}_loss`` (token NLL, mean of batch means), ``_ma``, ``_el{n}``,
            ``_nll`` (token-pooled), ``_ppl`` (from [`evaluate_memorization`][peft_unlearn.metrics.memorization.evaluate_memorization]) and the
            usual runtime entries.
        """
        if eval_dataset is None:
            if self._eval_sets is None:
                raise ValueError("evaluate() needs an `eval_dataset` (pass one here or to the trainer).")
            sets = self._eval_sets
        else:
            sets = self._tokenize_eval_sets(eval_dataset)
        metrics: dict[str, float] = {}
        for name, examples in sets.items():
            self._memorization_target = examples
            try:
                metrics.update(
                    super().evaluate(
                        TokenizedDataset(examples),
                        ignore_keys=ignore_keys,
                        metric_key_prefix=f"{metric_key_prefix}_{name}",
                    )
                )
            finally:
                self._memorization_target = None
        return metrics

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        if self._memorization_target is not None:
            output.metrics.update(self._memorization_metrics(self._memorization_target, metric_key_prefix))
        return output

    def _memorization_metrics(self, examples: list, prefix: str) -> dict[str, float]:
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        return memorization_metrics(self.model, examples, prefix, self.args, self._pad_token_id, sharded)


def _as_unlearning_config(args: TrainingArguments | None, model: nn.Module | str) -> UnlearningConfig:
    """The run's `UnlearningConfig`: the default one, `args` itself, or a `TrainingArguments` upcast."""
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        return UnlearningConfig(output_dir=f"{Path(str(name or 'model')).name}-Unlearning")
    if isinstance(args, UnlearningConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"`args` must be an UnlearningConfig or TrainingArguments, got {type(args).__name__}.")
    dict_args = args.to_dict()
    dict_args["hub_token"] = args.hub_token  # to_dict hides it
    return UnlearningConfig(**dict_args)


def _as_model(model: nn.Module | str, args: UnlearningConfig) -> nn.Module:
    """The model itself, or the causal LM loaded from a Hub id / local path with `args.model_init_kwargs`."""
    if isinstance(model, str):
        model = load_causal_lm(model, args.model_init_kwargs, arg="model")
    elif args.model_init_kwargs:
        logger.warning("`model_init_kwargs` is ignored because `model` is already instantiated.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module or a model id/path, got {type(model).__name__}.")
    return model


def _as_tokenizer(processing_class: Any, model: nn.Module) -> tuple[Any, Any]:
    """``(processing_class, tokenizer)``: the one given (a processor's ``tokenizer``), or loaded from the model."""
    if processing_class is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name_or_path:
            raise ValueError("`processing_class` is required: the model has no `name_or_path` to load it from.")
        processing_class = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer = processing_class
    if not isinstance(tokenizer, PreTrainedTokenizerBase) and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer
    if not callable(tokenizer):
        raise TypeError(f"`processing_class` must be a tokenizer, got {type(processing_class).__name__}.")
    return processing_class, tokenizer


def _with_peft(model: nn.Module, peft_config: Any, args: UnlearningConfig) -> nn.Module:
    """`model` wrapped with ``get_peft_model(model, peft_config)`` (seeded with `args.seed`), or as it is."""
    if peft_config is None:
        return model
    from peft import PeftConfig, get_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"`peft_config` must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}."
        )
    if is_peft_model(model):
        raise ValueError(
            "You passed a PeftModel together with `peft_config`. Either pass the PeftModel alone (its active "
            "adapter is trained) or pass the base model with `peft_config`."
        )
    set_seed(args.seed)
    return get_peft_model(model, peft_config)
