"""Unlearning with a FILA-initialised LoRA on several GPUs (FSDP2 or DeepSpeed ZeRO-3), via `accelerate launch`.

Not run in CI (needs GPUs). The forget/retain texts default to the demo data in `examples/data/`.

    accelerate launch --config_file examples/multi_gpu/fsdp2.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output-dir out/llama-fila
    accelerate launch --config_file examples/multi_gpu/zero3.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output-dir out/llama-fila-zero3

`--precompute-fisher` runs the Fisher pass before the trainer wraps the model, with the low-memory mode
(`accumulator_device="cpu"`, optionally `--layers-per-pass`), on each rank's shard of the data (the statistics
are summed over ranks), and hands the statistics to the FILA init through a cache file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--forget", type=Path, default=ROOT / "examples" / "data" / "forget.jsonl")
    parser.add_argument("--retain", type=Path, default=ROOT / "examples" / "data" / "retain.jsonl")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--init", choices=["fila", "default"], default="fila")
    parser.add_argument("--precompute-fisher", action="store_true")
    parser.add_argument("--layers-per-pass", type=int, default=None)
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningConfig, UnlearningTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    forget = Dataset.from_dict({"text": read_texts(args.forget)})
    retain = Dataset.from_dict({"text": read_texts(args.retain)})
    config = UnlearningConfig(
        output_dir=args.output_dir,
        forget_loss="inverted_hinge",
        retain_loss="nll",
        learning_rate=args.lr,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        fila_batch_size=args.batch_size,
        fila_cache=str(Path(args.output_dir) / "fisher.safetensors") if args.precompute_fisher else None,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=TARGETS,
        init_lora_weights="fila" if args.init == "fila" else True,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=config,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        peft_config=lora,
    )
    if args.precompute_fisher and args.init == "fila":
        # Fisher pass in the low-memory mode, before the trainer shards the model; the FILA init then finds the
        # statistics in the cache (its key matches: same weights, targets, data and settings).
        from torch.utils.data import DataLoader

        from peft_unlearn import estimate_fisher
        from peft_unlearn.trainer.data import CausalLMCollator, TokenizedDataset

        device = trainer.args.device
        trainer.model.to(device)
        rank, world = trainer.args.process_index, trainer.args.world_size

        def loader(examples):
            return DataLoader(
                TokenizedDataset(examples[rank::world]),
                batch_size=args.batch_size,
                collate_fn=CausalLMCollator(tokenizer.pad_token_id),
            )

        estimate_fisher(
            trainer.model,
            loader(trainer._forget_examples),
            loader(trainer._retain_examples),
            cache_path=config.fila_cache,
            accumulator_device="cpu",
            layers_per_pass=args.layers_per_pass,
            show_progress=trainer.is_world_process_zero(),
        )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(
            f"adapter saved to {args.output_dir}; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
