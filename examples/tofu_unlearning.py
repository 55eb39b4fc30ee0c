"""TOFU unlearning with IHL + FILA, in the paper's setting (Cha et al. 2025, Section 5.1 of paper-notes).

Real run (needs the Hub; the TOFU fine-tuned and retain-only models come from the TOFU authors):

    python examples/tofu_unlearning.py --source hub --split forget10 \
        --model locuslab/tofu_ft_phi-1.5 --retain-model locuslab/tofu_ft_retain90_phi-1.5 \
        --learning-rate 2e-4 --rank 8 --bf16

Offline smoke run (what CI runs, on a tiny random model and the synthetic TOFU-format data shipped
with the package; the numbers only show that the pipeline works):

    python examples/tofu_unlearning.py --tiny --finetune-epochs 20

Protocol (paper, official code): LoRA on all linear layers, r in {4, 8, 16, 32}, alpha = 2r, dropout 0,
FILA init, IHL + retain NLL (1:1), AdamW, weight decay 0.01, 5 epochs, effective batch 32
(per-device 2 x accumulation 16), linear schedule with one epoch of warmup, lr 2e-4 (Phi-1.5) or
1e-4 (Llama-2-7B), seed 42. Evaluation: truth ratio, answer probability and ROUGE-L on forget,
retain, real authors and world facts; forget quality = KS-test p-value of the forget truth ratios
against the retain-only model's; model utility = harmonic mean of the nine retain-side numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from datasets import Dataset

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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="TOFU fine-tuned model (name or path)")
    p.add_argument("--retain-model", help="retain-only model for forget quality (name or path)")
    p.add_argument("--tiny", action="store_true", help="offline: tiny random model + synthetic TOFU data")
    p.add_argument("--source", choices=["synthetic", "hub"], default="synthetic")
    p.add_argument("--split", choices=list(SPLITS), default="forget10")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--init", choices=["fila", "default"], default="fila")
    p.add_argument("--forget-loss", default="inverted_hinge")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--per-device-batch-size", type=int, default=2)
    p.add_argument("--gradient-accumulation-steps", type=int, default=16)
    p.add_argument("--max-length", type=int, default=500)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--eval-max-items", type=int, default=300)
    p.add_argument("--finetune-epochs", type=float, default=0, help="offline only: first fine-tune the base on TOFU")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="outputs/tofu")
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningConfig, UnlearningTrainer
    from peft_unlearn.metrics.tofu import evaluate_tofu, forget_quality

    torch.manual_seed(args.seed)
    if args.tiny:
        from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, seed=args.seed)
        retain_model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=64, seed=args.seed)
    else:
        if not args.model or not args.retain_model:
            p.error("--model and --retain-model are required unless --tiny")
        from peft_unlearn.models import load_model_and_tokenizer

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        retain_model, _ = load_model_and_tokenizer(args.retain_model, dtype=dtype)
    evals, train = load_splits(args.source, args.split)
    forget_ds = tokenized_qa(train["forget"], tokenizer, args.max_length)
    retain_ds = tokenized_qa(train["retain"], tokenizer, args.max_length)
    if args.finetune_epochs:
        full = Dataset.from_dict({k: list(forget_ds[k]) + list(retain_ds[k]) for k in ("input_ids", "labels")})
        model = finetune(model, tokenizer, full, args.finetune_epochs, args.finetune_lr, args.output_dir, args.seed)
        retain_model = finetune(
            retain_model, tokenizer, retain_ds, args.finetune_epochs, args.finetune_lr, args.output_dir, args.seed
        )

    eval_kwargs = dict(max_new_tokens=args.max_new_tokens, max_items=args.eval_max_items, max_length=args.max_length)
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
    steps_per_epoch = max(1, len(forget_ds) // (args.per_device_batch_size * args.gradient_accumulation_steps))
    config = UnlearningConfig(
        output_dir=args.output_dir,
        forget_loss=args.forget_loss,
        retain_loss="nll",
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr_scheduler_type="linear",
        warmup_steps=steps_per_epoch,
        max_length=args.max_length,
        bf16=args.bf16,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        fila_batch_size=4,
        use_cpu=not torch.cuda.is_available(),
    )
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
        "settings": vars(args),
        "before": {k: v for k, v in before.items() if isinstance(v, float)},
        "after": {k: v for k, v in after.items() if isinstance(v, float)},
    }
    out = Path(args.output_dir)
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
