"""TOFU unlearning with IHL + FILA, in the paper's setting (Cha et al. 2025, Section 5.1).

Real run (needs the Hub; the TOFU fine-tuned and retain-only models come from the TOFU authors):

    python examples/tofu_unlearning.py --source hub --split forget10 \
        --model locuslab/tofu_ft_phi-1.5 --retain-model locuslab/tofu_ft_retain90_phi-1.5 \
        --learning_rate 2e-4 --rank 8 --bf16

Offline smoke run (what CI runs, on a tiny random model and the synthetic TOFU-format data shipped
with the package; the numbers only show that the pipeline works):

    python examples/tofu_unlearning.py --tiny --finetune-epochs 20

Every `UnlearningConfig` / `TrainingArguments` field is a flag too (`HfArgumentParser`); the defaults below follow
the paper's protocol.

Protocol (paper, official code): LoRA on all linear layers, r in {4, 8, 16, 32}, alpha = 2r, dropout 0,
FILA init, IHL + retain NLL (1:1), AdamW, weight decay 0.01, 5 epochs, effective batch 32
(per-device 2 x accumulation 16), linear schedule with one epoch of warmup, lr 2e-4 (Phi-1.5) or
1e-4 (Llama-2-7B), seed 42. Evaluation: truth ratio, answer probability and ROUGE-L on forget,
retain, real authors and world facts; forget quality = KS-test p-value of the forget truth ratios
against the retain-only model's; model utility = harmonic mean of the nine retain-side numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset
from transformers import HfArgumentParser

from peft_unlearn import UnlearningConfig

SPLITS = {
    "forget01": ("forget01_perturbed", "retain_perturbed"),
    "forget05": ("forget05_perturbed", "retain_perturbed"),
    "forget10": ("forget10_perturbed", "retain_perturbed"),
}
TRAIN_SPLITS = {
    "forget01": ("forget01", "retain99"),
    "forget05": ("forget05", "retain95"),
    "forget10": ("forget10", "retain90"),
}


def tokenized_qa(rows, tokenizer, max_length: int) -> Dataset:
    """TOFU rows -> pre-tokenized examples (question masked, answer + EOS supervised)."""
    from peft_unlearn.metrics.tofu import format_qa

    items = [format_qa(r["question"], r["answer"], tokenizer, max_length=max_length) for r in rows]
    return Dataset.from_dict({"input_ids": [i["input_ids"] for i in items], "labels": [i["labels"] for i in items]})


def finetune(model, tokenizer, data: Dataset, epochs: float, lr: float, output_dir: str, seed: int):
    """Plain supervised fine-tuning (the TOFU 'full' / retain-only models), used for the offline run."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    return model.eval()


def load_splits(source: str, split: str):
    from peft_unlearn.metrics.tofu import load_tofu

    if source == "synthetic":
        return {name: load_tofu(name) for name in ("forget", "retain", "real_authors", "world_facts", "full")}, {
            "forget": load_tofu("forget"),
            "retain": load_tofu("retain"),
        }
    eval_forget, eval_retain = SPLITS[split]
    train_forget, train_retain = TRAIN_SPLITS[split]
    evals = {
        "forget": load_tofu(eval_forget, "hub"),
        "retain": load_tofu(eval_retain, "hub"),
        "real_authors": load_tofu("real_authors", "hub"),
        "world_facts": load_tofu("world_facts", "hub"),
    }
    return evals, {"forget": load_tofu(train_forget, "hub"), "retain": load_tofu(train_retain, "hub")}


@dataclass
class TofuArguments:
    """Model, data and evaluation options of this script (training options come from `UnlearningConfig`)."""

    model: str | None = field(default=None, metadata={"help": "TOFU fine-tuned model (name or path)."})
    retain_model: str | None = field(default=None, metadata={"help": "Retain-only model for forget quality."})
    tiny: bool = field(default=False, metadata={"help": "Offline: tiny random model + synthetic TOFU data."})
    source: Literal["synthetic", "hub"] = "synthetic"
    split: Literal["forget01", "forget05", "forget10"] = "forget10"
    rank: int = field(default=8, metadata={"help": "LoRA rank r (alpha = 2r)."})
    init: Literal["fila", "default"] = "fila"
    max_new_tokens: int = 200
    eval_max_items: int = 300
    finetune_epochs: float = field(default=0, metadata={"help": "Offline only: first fine-tune the base on TOFU."})
    finetune_lr: float = 1e-3


# The paper's protocol (official code) where it differs from UnlearningConfig's defaults.
PROTOCOL_DEFAULTS = {
    "output_dir": "outputs/tofu",
    "learning_rate": 2e-4,
    "weight_decay": 0.01,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 16,
    "lr_scheduler_type": "linear",
    "max_length": 500,
    "seed": 42,
    "save_strategy": "no",
    "report_to": "none",
    "logging_steps": 1,
    "fila_batch_size": 4,
    "use_cpu": not torch.cuda.is_available(),
}


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((TofuArguments, UnlearningConfig), description=__doc__)
    parser.set_defaults(**PROTOCOL_DEFAULTS)
    args, config = parser.parse_args_into_dataclasses(args=argv)

    from peft import LoraConfig, get_peft_model

    from peft_unlearn import UnlearningTrainer
    from peft_unlearn.metrics.tofu import evaluate_tofu, forget_quality

    torch.manual_seed(config.seed)
    if args.tiny:
        from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, seed=config.seed)
        retain_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, seed=config.seed)
    else:
        if not args.model or not args.retain_model:
            parser.error("--model and --retain_model are required unless --tiny")
        from peft_unlearn.models import load_model_and_tokenizer

        dtype = torch.bfloat16 if config.bf16 else torch.float32
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        retain_model, _ = load_model_and_tokenizer(args.retain_model, dtype=dtype)
    evals, train = load_splits(args.source, args.split)
    forget_ds = tokenized_qa(train["forget"], tokenizer, config.max_length)
    retain_ds = tokenized_qa(train["retain"], tokenizer, config.max_length)
    if args.finetune_epochs:
        full = Dataset.from_dict({k: list(forget_ds[k]) + list(retain_ds[k]) for k in ("input_ids", "labels")})
        tune = (args.finetune_epochs, args.finetune_lr, config.output_dir, config.seed)
        model = finetune(model, tokenizer, full, *tune)
        retain_model = finetune(retain_model, tokenizer, retain_ds, *tune)

    eval_kwargs = dict(max_new_tokens=args.max_new_tokens, max_items=args.eval_max_items, max_length=config.max_length)
    retain_ref = evaluate_tofu(retain_model, tokenizer, forget=evals["forget"], compute_rouge=False, **eval_kwargs)
    del retain_model
    before = evaluate_tofu(
        model, tokenizer, **{k: evals[k] for k in ("forget", "retain", "real_authors", "world_facts")}, **eval_kwargs
    )

    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights="fila" if args.init == "fila" else True,
        ),
    )
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    config.warmup_steps = max(1, len(forget_ds) // per_step)  # one epoch of warmup
    trainer = UnlearningTrainer(
        model=model, args=config, forget_dataset=forget_ds, retain_dataset=retain_ds, processing_class=tokenizer
    )
    trainer.train()
    after = evaluate_tofu(
        trainer.model,
        tokenizer,
        **{k: evals[k] for k in ("forget", "retain", "real_authors", "world_facts")},
        retain_model_truth_ratios=retain_ref["forget_truth_ratios"],
        **eval_kwargs,
    )
    before["forget_quality"] = forget_quality(before["forget_truth_ratios"], retain_ref["forget_truth_ratios"])
    summary = {
        "settings": {**dataclasses.asdict(args), "training": json.loads(config.to_json_string())},
        "before": {k: v for k, v in before.items() if isinstance(v, float)},
        "after": {k: v for k, v in after.items() if isinstance(v, float)},
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tofu_results.json").write_text(json.dumps(summary, indent=2))
    trainer.save_model(str(out / "adapter"))
    print(f"{'metric':<28}{'before':>10}{'after':>10}")
    for key in sorted(summary["after"]):
        b = summary["before"].get(key, math.nan)
        print(f"{key:<28}{b:>10.4f}{summary['after'][key]:>10.4f}")
    return summary


if __name__ == "__main__":
    main()
