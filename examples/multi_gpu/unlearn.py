"""Unlearning with a FILA-initialised LoRA on several GPUs (FSDP2 or DeepSpeed ZeRO-3), via `accelerate launch`.

Not run in CI (needs GPUs). The forget/retain texts default to the demo data in `examples/data/`.

    accelerate launch --config_file examples/multi_gpu/fsdp2.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output-dir out/llama-fila
    accelerate launch --config_file examples/multi_gpu/zero3.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output-dir out/llama-fila-zero3

With `--init fila` the FILA initialisation runs before the trainer shards the model: the Fisher pass in the
low-memory mode (`accumulator_device="cpu"`, optionally `--layers-per-pass`) on each rank's shard of the data
(the statistics are summed over ranks), then `initialize_fila_weights(fisher=...)`. Each GPU holds the whole
bf16 model during this step (16 GB for 8B parameters).
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
    parser.add_argument("--layers-per-pass", type=int, default=None)
    args = parser.parse_args()

    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningConfig, UnlearningTrainer, estimate_fisher, initialize_fila_weights
    from peft_unlearn.trainer import CausalLMCollator, TokenizedDataset, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    state = PartialState()  # rank and world size as `accelerate launch` set them
    device = state.device
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    forget_rows = [{"text": t} for t in read_texts(args.forget)]
    retain_rows = [{"text": t} for t in read_texts(args.retain)]
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=TARGETS,
        init_lora_weights="fila" if args.init == "fila" else True,
    )
    model = get_peft_model(model, lora)
    if args.init == "fila":
        # FILA before the trainer shards the model: the Fisher pass in the low-memory mode (accumulators in host
        # memory, optionally a group of layers per pass) on this rank's shard of the data; the statistics are
        # summed over the ranks, so every rank computes the same init. The trainer then sees an initialised adapter.
        model.to(device)

        def loader(rows: list[dict[str, str]], name: str) -> DataLoader:
            examples = tokenize_dataset(rows, tokenizer, max_length=args.max_length, name=name)
            shard = examples[state.process_index :: state.num_processes]
            return DataLoader(
                TokenizedDataset(shard),
                batch_size=args.batch_size,
                collate_fn=CausalLMCollator(tokenizer.pad_token_id),
            )

        stats = estimate_fisher(
            model,
            loader(forget_rows, "forget"),
            loader(retain_rows, "retain"),
            accumulator_device="cpu",
            layers_per_pass=args.layers_per_pass,
            show_progress=state.is_main_process,
        )
        initialize_fila_weights(model, fisher=stats, show_progress=False)
        del stats
    config = UnlearningConfig(
        output_dir=args.output_dir,
        forget_loss="inverted_hinge",
        retain_loss="nll",
        learning_rate=args.lr,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # lets the script be smoke-tested on a CPU
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    trainer = UnlearningTrainer(
        model=model,
        args=config,
        forget_dataset=Dataset.from_list(forget_rows),
        retain_dataset=Dataset.from_list(retain_rows),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(
            f"adapter saved to {args.output_dir}; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
