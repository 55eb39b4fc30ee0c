"""`UnlearningTrainer`: a Hugging Face `Trainer` for LLM unlearning (IHL, GA, NPO, SimNPO, IDK + NLL/KL retain).

Each training item is one forget example paired with one retain example (see
:class:`~peft_unlearn.trainer.data.PairedUnlearningDataset`). The loss of a step is

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
import dataclasses
import logging
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import losses as L
from ..fila.config import get_fila_config
from ..fila.dispatch import initialize_adapter_weights
from ..fila.saving import INIT_DIR, is_fila_model, pending_fila_adapters, portable_lora_config, restore_fila_state
from ..fila.state import init_name
from .data import (
    CausalLMCollator,
    PairedUnlearningDataset,
    TokenizedDataset,
    UnlearningDataCollator,
    ensure_pad_token,
    tokenize_dataset,
    tokenize_idk_dataset,
)
from .model_card import PAPER_CITATION
from .reference import check_reference, reference_forward
from .reference import is_peft_model as _is_peft_model
from .unlearning_config import UnlearningConfig

__all__ = ["UnlearningItemCounts", "UnlearningTrainer"]

logger = logging.getLogger(__name__)

_TRAINING_ARGS_NAME = "training_args.bin"
_BATCH_PREFIXES = ("forget", "retain", "idk")


@dataclass
class UnlearningItemCounts:
    """Normalisers of one optimizer step, passed to ``compute_loss`` as ``num_items_in_batch``.

    Attributes:
        forget: Supervised forget tokens (IHL, GA, IDK tokens) or forget sequences (NPO, SimNPO) of the whole
            accumulated batch, summed over processes.
        retain: Supervised retain tokens (NLL, KL with ``kl_mask="labels"``) or retain positions (KL with
            ``kl_mask="none"``), or None without retain loss.
        loss_scale: Factor compensating the gradient averaging of data parallelism (the number of processes).
    """

    forget: torch.Tensor
    retain: torch.Tensor | None = None
    loss_scale: float = 1.0


class _PairingEpochCallback(TrainerCallback):
    """Selects the forget/retain pairing of the epoch that starts (`set_epoch` on the paired dataset)."""

    def __init__(self, dataset: PairedUnlearningDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


def _causal_lm_class_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def _check_causal_lm(model: Any) -> None:
    base = model.get_base_model() if _is_peft_model(model) else model
    name = type(base).__name__
    if name in _causal_lm_class_names() or name.endswith(("ForCausalLM", "LMHeadModel")):
        return
    raise ValueError(
        f"`model` must be a causal language model (a `*ForCausalLM`, e.g. loaded with "
        f"`AutoModelForCausalLM.from_pretrained`), got {name}. Unlearning needs next-token logits over the "
        "vocabulary; load the checkpoint with AutoModelForCausalLM instead."
    )


def _is_fila_model(model: Any) -> bool:
    return _is_peft_model(model) and is_fila_model(model)


def _shifted_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()


class UnlearningTrainer(Trainer):
    """Trainer for knowledge unlearning with forget/retain objectives, PEFT and FILA support.

    Args:
        model: A causal LM, a PeftModel, or a Hub id / local path (loaded with ``AutoModelForCausalLM`` and
            ``args.model_init_kwargs``).
        args: An :class:`UnlearningConfig` (a plain ``TrainingArguments`` is upcast). Default:
            ``UnlearningConfig(output_dir="<model name>-Unlearning")``.
        forget_dataset: Data to forget, in any format of :mod:`peft_unlearn.trainer.data`.
        retain_dataset: Data to retain (needed by ``retain_loss``; also used by FILA's Fisher estimate).
        processing_class: Tokenizer (or a processor with a ``tokenizer``); loaded from the model when None.
            Without a pad token, EOS is used for padding (with a warning).
        data_collator: Collator of the paired items; default :class:`UnlearningDataCollator`.
        eval_dataset: A dataset (named ``"forget"``) or a dict name -> dataset, any supported format;
            :meth:`evaluate` logs ``eval_{name}_loss``, ``_ma``, ``_el{n}``, ``_nll``, ``_ppl``.
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
        # ---- args ----
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = UnlearningConfig(output_dir=f"{Path(str(name or 'model')).name}-Unlearning")
        elif not isinstance(args, UnlearningConfig):
            if not isinstance(args, TrainingArguments):
                raise TypeError(f"`args` must be an UnlearningConfig or TrainingArguments, got {type(args).__name__}.")
            dict_args = args.to_dict()
            dict_args["hub_token"] = args.hub_token  # to_dict hides it
            args = UnlearningConfig(**dict_args)

        # ---- model ----
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        elif args.model_init_kwargs:
            logger.warning("`model_init_kwargs` is ignored because `model` is already instantiated.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module or a model id/path, got {type(model).__name__}.")
        _check_causal_lm(model)

        # ---- tokenizer ----
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
        pad_token_id = ensure_pad_token(tokenizer)

        # ---- PEFT ----
        if peft_config is not None:
            from peft import PeftConfig, get_peft_model

            if not isinstance(peft_config, PeftConfig):
                raise TypeError(
                    f"`peft_config` must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}."
                )
            if _is_peft_model(model):
                raise ValueError(
                    "You passed a PeftModel together with `peft_config`. Either pass the PeftModel alone (its active "
                    "adapter is trained) or pass the base model with `peft_config`."
                )
            set_seed(args.seed)
            model = get_peft_model(model, peft_config)

        # ---- reference model ----
        self._needs_reference = args.forget_loss == "npo" or args.retain_loss == "kl"
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, **(args.model_init_kwargs or {}))
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "`ref_model` must not be the trained model itself; pass a separate (frozen) copy or None."
            )
        if self._needs_reference:
            check_reference(model, ref_model, "forget_loss='npo'" if args.forget_loss == "npo" else "retain_loss='kl'")
        if ref_model is not None and not self._needs_reference:
            logger.warning("`ref_model` is unused: neither forget_loss='npo' nor retain_loss='kl' needs it.")
            ref_model = None

        # ---- data ----
        if forget_dataset is None:
            raise ValueError("`forget_dataset` is required: the data to unlearn.")
        if args.retain_loss is not None and retain_dataset is None:
            raise ValueError(
                f"retain_loss={args.retain_loss!r} needs a `retain_dataset`; pass one, or set retain_loss=None to "
                "train on the forget loss alone."
            )
        tok_kwargs = {
            "max_length": args.max_length,
            "completion_only_loss": args.completion_only_loss,
            "assistant_turns": args.assistant_turns,
        }
        self._forget_examples = tokenize_dataset(forget_dataset, tokenizer, name="forget", **tok_kwargs)
        self._retain_examples = (
            tokenize_dataset(retain_dataset, tokenizer, name="retain", **tok_kwargs)
            if retain_dataset is not None
            else None
        )
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
        self._tokenizer = tokenizer
        self._pad_token_id = pad_token_id
        self._eval_sets = self._tokenize_eval_sets(eval_dataset, args) if eval_dataset is not None else None
        self._memorization_target: list[dict[str, list[int]]] | None = None
        self._in_checkpoint_save = False
        self._num_params: int | None = None
        self.fila_stats: dict[str, Any] = {}
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._dataset_sizes = {"forget": len(self._forget_examples)}
        if self._retain_examples is not None:
            self._dataset_sizes["retain"] = len(self._retain_examples)

        if args.load_best_model_at_end and args.metric_for_best_model in ("loss", "eval_loss"):
            raise ValueError(
                "UnlearningTrainer logs per-set metrics (eval_forget_loss, eval_forget_ma, ...) but no `eval_loss`; "
                "set `metric_for_best_model`, e.g. metric_for_best_model='eval_forget_ma' with "
                "greater_is_better=False."
            )

        hub_strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
        if _is_fila_model(model) and args.push_to_hub and hub_strategy in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"hub_strategy={hub_strategy!r} uploads raw FILA checkpoints as the model; use "
                "hub_strategy='every_save' or 'end', which push the portable plain-LoRA adapter."
            )

        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0 and args.retain_pairing == "random":
            logger.warning(
                "dataloader_persistent_workers=True keeps the workers' copy of the paired dataset, so the random "
                "forget/retain pairing is not redrawn after the first epoch; set it to False to redraw it."
            )

        if data_collator is None:
            data_collator = UnlearningDataCollator(pad_token_id)

        if _is_peft_model(model) and args.activation_checkpointing:
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
        self.add_callback(_PairingEpochCallback(train_dataset))
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

        self.ref_model = None
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------------------------
    # data helpers
    # ------------------------------------------------------------------------------------------------------------

    def _tokenize_eval_sets(self, eval_dataset: Any, args: UnlearningConfig | None = None) -> dict[str, list]:
        args = args or self.args
        sets = eval_dataset if isinstance(eval_dataset, Mapping) else {"forget": eval_dataset}
        kwargs = {
            "max_length": args.max_length,
            "completion_only_loss": args.completion_only_loss,
            "assistant_turns": args.assistant_turns,
        }
        return {
            str(name): tokenize_dataset(ds, self._tokenizer, name=f"eval {name!r}", **kwargs)
            for name, ds in sets.items()
        }

    def _causal_lm_dataloader(self, examples: list, batch_size: int, shard: bool = False) -> DataLoader:
        if shard and self.args.world_size > 1:
            examples = examples[self.args.process_index :: self.args.world_size]
        return DataLoader(
            TokenizedDataset(examples),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=CausalLMCollator(self._pad_token_id),
        )

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

    def _forget_prefix(self) -> str:
        return "idk" if self.args.forget_loss == "idk" else "forget"

    def _forget_count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.args.forget_loss in ("npo", "simnpo"):
            return torch.tensor(batch["forget_input_ids"].shape[0], device=batch["forget_input_ids"].device)
        return _shifted_count(batch[f"{self._forget_prefix()}_labels"])

    def _retain_count(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.args.retain_loss == "kl" and self.args.kl_mask == "none":
            return torch.tensor(batch["retain_input_ids"].numel(), device=batch["retain_input_ids"].device)
        return _shifted_count(batch["retain_labels"])

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, UnlearningItemCounts | None]:
        """Fetch the micro-batches of one optimizer step and count their forget/retain items (all processes)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or "forget_input_ids" not in batch_samples[0]:
            return batch_samples, None
        has_retain = self.args.retain_loss is not None and "retain_input_ids" in batch_samples[0]
        forget = sum(self._forget_count(b).to(device) for b in batch_samples)
        retain = (
            sum(self._retain_count(b).to(device) for b in batch_samples)
            if has_retain
            else torch.zeros((), device=device)
        )
        counts = torch.stack([torch.as_tensor(forget, device=device), torch.as_tensor(retain, device=device)]).long()
        scale = 1.0
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)
            scale = float(self.accelerator.num_processes)
        return batch_samples, UnlearningItemCounts(
            forget=counts[0], retain=counts[1] if has_retain else None, loss_scale=scale
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted forget + retain loss of a paired batch.

        With ``num_items_in_batch`` an :class:`UnlearningItemCounts` (training), the sums are divided by the
        counts of the whole accumulated batch; otherwise (evaluation, direct calls) by the counts of this batch.
        """
        args = self.args
        counts = num_items_in_batch if isinstance(num_items_in_batch, UnlearningItemCounts) else None
        has_retain = args.retain_loss is not None and "retain_input_ids" in inputs
        mode = "train" if model.training else "eval"

        # Reference passes first: disabling adapters changes `requires_grad` flags, which must not happen while a
        # graph through the trained adapter is alive.
        ref_logps = ref_retain_logits = None
        if args.forget_loss == "npo" or (has_retain and args.retain_loss == "kl"):
            with self.reference_model(model) as ref:
                if args.forget_loss == "npo":
                    ref_logps, _ = L.sequence_log_probs(self._logits(ref, inputs, "forget"), inputs["forget_labels"])
                if has_retain and args.retain_loss == "kl":
                    ref_retain_logits = self._logits(ref, inputs, "retain")

        # ---- forget ----
        forget_prefix = self._forget_prefix()
        logits = self._logits(model, inputs, forget_prefix)
        labels = inputs[f"{forget_prefix}_labels"]
        forget_nll = None
        if args.forget_loss in ("npo", "simnpo"):
            logps, num_tokens = L.sequence_log_probs(logits, labels)
            if args.forget_loss == "npo":
                forget_sum = L.npo_loss(logps, ref_logps, beta=args.beta, reduction="sum")
            else:
                forget_sum = L.simnpo_loss(logps, num_tokens, beta=args.beta, delta=args.simnpo_delta, reduction="sum")
            local_forget = torch.tensor(labels.shape[0], device=logits.device)
            forget_nll = -logps.detach().sum() / num_tokens.sum().clamp_min(1)
        else:
            loss_fn = {
                "inverted_hinge": L.inverted_hinge_loss,
                "gradient_ascent": L.gradient_ascent_loss,
                "idk": L.nll_loss,
            }[args.forget_loss]
            forget_sum = loss_fn(logits, labels, reduction="sum")
            local_forget = _shifted_count(labels)
            if args.forget_loss == "gradient_ascent":
                forget_nll = -forget_sum.detach() / local_forget.clamp_min(1)
            elif args.forget_loss == "inverted_hinge":
                forget_nll = L.nll_loss(logits.detach(), labels)
        if forget_nll is None:  # IDK: the likelihood of the original forget answers
            with torch.no_grad():
                forget_nll = L.nll_loss(self._logits(model, inputs, "forget"), inputs["forget_labels"])
        del logits

        # ---- retain ----
        retain_sum = local_retain = retain_nll = None
        if has_retain:
            retain_logits = self._logits(model, inputs, "retain")
            retain_labels = inputs["retain_labels"]
            if args.retain_loss == "nll":
                retain_sum = L.nll_loss(retain_logits, retain_labels, reduction="sum")
                local_retain = _shifted_count(retain_labels)
                retain_nll = retain_sum.detach() / local_retain.clamp_min(1)
            else:
                kl_labels = retain_labels if args.kl_mask == "labels" else None
                retain_sum = L.kl_loss(retain_logits, ref_retain_logits, labels=kl_labels, reduction="sum")
                local_retain = (
                    _shifted_count(retain_labels) if kl_labels is not None else torch.tensor(retain_labels.numel())
                ).to(retain_sum.device)
                retain_nll = L.nll_loss(retain_logits.detach(), retain_labels)
            del retain_logits

        # ---- normalise and combine ----
        forget_den = counts.forget if counts is not None else local_forget
        forget_term = forget_sum / forget_den.clamp_min(1).to(forget_sum.dtype)
        loss = args.forget_weight * forget_term
        if retain_sum is not None:
            retain_den = counts.retain if counts is not None and counts.retain is not None else local_retain
            loss = loss + args.retain_weight * (retain_sum / retain_den.clamp_min(1).to(retain_sum.dtype))
        if counts is not None:
            loss = loss * counts.loss_scale

        # ---- metrics (per micro-batch means) ----
        values = {
            "forget_loss": forget_sum.detach() / local_forget.clamp_min(1),
            "forget_nll": forget_nll.detach(),
        }
        if retain_sum is not None:
            values["retain_loss"] = retain_sum.detach() / local_retain.clamp_min(1)
            values["retain_nll"] = retain_nll.detach()
        self._record_metrics(mode, values)

        if return_outputs:
            return loss, {k: v for k, v in values.items()}
        return loss

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
                logits = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
                ).logits
                loss = L.nll_loss(logits, inputs["labels"])
        return loss.detach(), None, None

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
        """Initialise pending FILA/VILA adapters, then run ``Trainer.train``.

        On resume the frozen initial factors are re-attached from the checkpoint's ``_fila_init/`` (the init is not
        re-run), so a fresh process (original base + ``get_peft_model(..., LoraConfig(init_lora_weights="fila"))``)
        continues exactly where the checkpoint left off.
        """
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            last = get_last_checkpoint(self.args.output_dir)
            if last is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            resume_from_checkpoint = last
        self._maybe_initialize_fila(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def _maybe_initialize_fila(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, Any] | None:
        """Compute the weights of pending data-driven adapters (FILA, VILA) from the forget/retain data.

        When resuming, the frozen initial factors are re-attached from ``<checkpoint>/_fila_init`` instead; a pending
        adapter with a checkpoint lacking that folder is an error, because re-running the init would not reproduce
        the checkpoint's initial factors in general.

        Args:
            resume_from_checkpoint: The checkpoint folder being resumed (``True``: the last one in ``output_dir``).

        Returns:
            The statistics of the initialisation per adapter, or None when nothing was computed.

        Raises:
            ValueError: If a pending adapter is resumed from a checkpoint without ``_fila_init/``.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not _is_peft_model(model) or not is_fila_model(model):
            return None
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:
            if (Path(checkpoint) / INIT_DIR).is_dir():
                restore_fila_state(model, checkpoint)
            elif pending_fila_adapters(model):
                raise ValueError(
                    f"Cannot resume the adapter(s) {pending_fila_adapters(model)} from {str(checkpoint)!r}: the "
                    f"checkpoint has no `{INIT_DIR}/` folder with the initial factors A0/B0 (re-running the init would "
                    "not reproduce them). Resume from a checkpoint written by UnlearningTrainer (or "
                    "save_pretrained(..., fila_portable=False)), or start a new run without `resume_from_checkpoint`."
                )
        pending = pending_fila_adapters(model)
        if not pending:
            return None
        forget_dl = self._causal_lm_dataloader(self._forget_examples, self.args.fila_batch_size, shard=True)
        retain_dl = (
            self._causal_lm_dataloader(self._retain_examples, self.args.fila_batch_size, shard=True)
            if self._retain_examples is not None
            else None
        )
        stats: dict[str, Any] = {}
        show_progress = not self.args.disable_tqdm and self.is_world_process_zero()
        for adapter_name in pending:
            config = model.peft_config[adapter_name]
            kwargs: dict[str, Any] = {"max_batches": self.args.fila_max_batches, "show_progress": show_progress}
            if init_name(config.init_lora_weights) == "fila":
                fila_config = get_fila_config(config)
                if self.args.fila_seed is not None:
                    fila_config = dataclasses.replace(fila_config, seed=self.args.fila_seed)
                kwargs.update(cache_path=self.args.fila_cache, fila_config=fila_config)
            stats[adapter_name] = initialize_adapter_weights(
                model, forget_dl, retain_dl, adapter_name=adapter_name, **kwargs
            )
        self.fila_stats = stats
        for adapter_name, adapter_stats in stats.items():
            logger.info("FILA initialisation of adapter %r: %s", adapter_name, adapter_stats)
            suffix = "" if len(stats) == 1 else f"_{adapter_name}"
            for key, value in (adapter_stats or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._metrics["train"][f"fila_{key}{suffix}"].append(float(value))
        return stats

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
            ``_nll`` (token-pooled), ``_ppl`` (from :func:`peft_unlearn.metrics.evaluate_memorization`) and the
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
        from peft_unlearn.metrics import evaluate_memorization

        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        result = evaluate_memorization(
            self.model,
            examples,
            batch_size=self.args.per_device_eval_batch_size,
            el_n=tuple(self.args.eval_el_n),
            el_prefix_stride=self.args.eval_el_prefix_stride,
            pad_token_id=self._pad_token_id,
            compute_el=self.args.eval_compute_el,
            distributed="none" if sharded else "shard",
        )
        return {f"{prefix}_{key}": float(value) for key, value in result.items()}

    # ------------------------------------------------------------------------------------------------------------
    # saving and model card
    # ------------------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.args.hub_model_id is None:
            model_name = Path(self.args.output_dir).name
        else:
            model_name = self.args.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name)
        self._in_checkpoint_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint_save = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call:
            self.create_model_card(output_dir=output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the adapter(s); FILA/VILA models save the raw format in checkpoints and the portable one otherwise."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_peft_model(model):
            return super()._save(output_dir, state_dict)
        is_fila = _is_fila_model(model)
        if not is_fila:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        kwargs: dict[str, Any] = {"is_main_process": True}
        if state_dict is not None:
            kwargs["state_dict"] = state_dict
        checkpoint = self._in_checkpoint_save or Path(output_dir).name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        kwargs["fila_portable"] = not checkpoint
        model.save_pretrained(output_dir, **kwargs)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))
        return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push to the Hub; for FILA models the pushed model files are the portable adapter, not the raw checkpoint.

        ``Trainer._push_from_checkpoint`` copies the adapter files of the folder it gets into ``output_dir`` and
        uploads ``output_dir`` (without ``_*`` and ``checkpoint-*``); for a FILA model it gets a temporary folder
        holding the portable rank-2r export instead of the raw rank-r checkpoint.
        """
        model = self.accelerator.unwrap_model(self.model)
        if not _is_fila_model(model):
            return super()._push_from_checkpoint(checkpoint_folder)
        # the early exits of Trainer._push_from_checkpoint, checked before paying for the export
        hub_strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or hub_strategy == "end":
            return None
        if hub_strategy in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"hub_strategy={hub_strategy!r} uploads raw FILA checkpoints as the model; use "
                "hub_strategy='every_save' or 'end', which push the portable plain-LoRA adapter."
            )
        push_in_progress = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and push_in_progress is not None and not push_in_progress.is_done():
            return None
        with tempfile.TemporaryDirectory(prefix="fila_portable_") as portable:
            model.save_pretrained(portable, fila_portable=True)
            return super()._push_from_checkpoint(portable)

    def _final_metrics(self) -> dict[str, float]:
        """Latest logged train/forget/retain losses and NLLs, and every evaluation metric, for the model card."""
        keep = ("train_loss", "forget_loss", "forget_nll", "retain_loss", "retain_nll")
        latest: dict[str, float] = {}
        for entry in self.state.log_history:
            for key, value in entry.items():
                wanted = key in keep or (key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")))
                if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                    latest[key] = float(value)
        return latest

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | list[str] | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``README.md`` (objective, data sizes, adapter and hyper-parameters, citation) on the main process.

        Args:
            model_name: Title of the card (default: the output folder name).
            dataset_name: Hub dataset id(s) for the metadata.
            tags: Extra tags.
            output_dir: Folder of the card (default ``args.output_dir``).
            **kwargs: Accepted for compatibility with ``Trainer.push_to_hub`` (``tags`` among them is used).
        """
        if not self.is_world_process_zero():
            return
        from .model_card import build_model_card

        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        is_peft = _is_peft_model(model)
        base = model.get_base_model() if is_peft else model
        base_model = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        if base_model and os.path.isdir(base_model):
            base_model = None
        adapter = None
        is_fila = False
        if is_peft:
            config = model.peft_config[model.active_adapter]
            adapter = {
                "peft_type": getattr(getattr(config, "peft_type", None), "value", None),
                "r": getattr(config, "r", None),
                "lora_alpha": getattr(config, "lora_alpha", None),
                "target_modules": sorted(config.target_modules)
                if isinstance(getattr(config, "target_modules", None), (set, list))
                else getattr(config, "target_modules", None),
                "init_lora_weights": getattr(config, "init_lora_weights", None),
            }
            is_fila = init_name(getattr(config, "init_lora_weights", None)) is not None
            if is_fila:  # r / lora_alpha above are the adapter's; the published plain LoRA has twice the rank
                portable = portable_lora_config(config)
                adapter["published_r"] = portable.r
                adapter["published_lora_alpha"] = portable.lora_alpha
        args = self.args
        hyper = {
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
            "max_steps": args.max_steps if args.max_steps > 0 else None,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_length": args.max_length,
            "retain_pairing": args.retain_pairing,
            "seed": args.seed,
        }
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        card = build_model_card(
            base_model=base_model,
            model_name=model_name or Path(output_dir).name,
            hub_model_id=getattr(self, "hub_model_id", None),
            forget_loss=args.forget_loss,
            retain_loss=args.retain_loss,
            forget_weight=args.forget_weight,
            retain_weight=args.retain_weight,
            beta=args.beta,
            datasets=self._dataset_sizes,
            dataset_name=dataset_name,
            hyperparameters=hyper,
            adapter=adapter,
            fila=is_fila,
            metrics=self._final_metrics(),
            tags=extra_tags,
            library_name="peft" if is_peft else "transformers",
        )
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "README.md").write_text(card, encoding="utf-8")
