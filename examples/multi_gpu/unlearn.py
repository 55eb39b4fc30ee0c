"""Unlearning with a FILA-initialised LoRA on several GPUs (FSDP2 or DeepSpeed ZeRO-3), via `accelerate launch`.

The forget/retain texts default to the demo data in `examples/data/`. Every `UnlearningConfig` /
`TrainingArguments` field is a flag (`HfArgumentParser`); the defaults below are a short IHL + retain-NLL run.

    accelerate launch --config_file examples/multi_gpu/fsdp2.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output_dir out/llama-fila
    accelerate launch --config_file examples/multi_gpu/zero3.yaml examples/multi_gpu/unlearn.py \
        --model meta-llama/Llama-3.1-8B --output_dir out/llama-fila-zero3 --learning_rate 2e-4

With `--init fila` the FILA initialisation runs before the trainer shards the model: the Fisher pass in the
low-memory mode (`accumulator_device="cpu"`, optionally `--layers_per_pass`) on each rank's shard of the data
(the statistics are summed over ranks), then `initialize_fila_weights(fisher=...)`. Each GPU holds the whole
bf16 model during this step (16 GB for 8B parameters). Without GPUs the script runs on the CPU in float32 (the
test suite smoke-tests it that way on a tiny model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import HfArgumentParser

from peft_unlearn import UnlearningConfig

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

RUN_DEFAULTS = {
    "forget_loss": "inverted_hinge",
    "retain_loss": "nll",
    "learning_rate": 1e-4,
    "max_steps": 20,
    "per_device_train_batch_size": 2,
    "max_length": 512,
    "bf16": torch.cuda.is_available(),
    "use_cpu": not torch.cuda.is_available(),
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class MultiGPUArguments:
    """Model, data and adapter options of this script (training options come from `UnlearningConfig`)."""

    model: str = field(metadata={"help": "Base model: a Hub id or a local directory."})
    forget: Path = field(
        default=ROOT / "examples" / "data" / "forget.jsonl", metadata={"help": "Forget texts (JSON Lines, `text`)."}
    )
    retain: Path = field(
        default=ROOT / "examples" / "data" / "retain.jsonl", metadata={"help": "Retain texts (JSON Lines, `text`)."}
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r (lora_alpha = 2r)."})
    init: Literal["fila", "default"] = field(default="fila", metadata={"help": "LoRA init: FILA or PEFT's default."})
    layers_per_pass: int | None = field(
        default=None, metadata={"help": "FILA: layers whose Fisher statistics are gathered per pass (default: all)."}
    )


def read_texts(path: Path) -> list[dict[str, str]]:
    return [
        {"text": json.loads(line)["text"]} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((MultiGPUArguments, UnlearningConfig), description=__doc__.split("\n\n")[0])
    parser.set_defaults(**RUN_DEFAULTS)
    args, config = parser.parse_args_into_dataclasses(args=argv)

    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_unlearn  # noqa: F401  (registers init_lora_weights="fila")
    from peft_unlearn import UnlearningTrainer, estimate_fisher, initialize_fila_weights
    from peft_unlearn.trainer import CausalLMCollator, TokenizedDataset, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    state = PartialState()  # rank and world size as `accelerate launch` set them
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    forget_rows, retain_rows = read_texts(args.forget), read_texts(args.retain)
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
        model.to(state.device)

        def loader(rows: list[dict[str, str]], name: str) -> DataLoader:
            examples = tokenize_dataset(rows, tokenizer, max_length=config.max_length, name=name)
            shard = examples[state.process_index :: state.num_processes]
            return DataLoader(
                TokenizedDataset(shard),
                batch_size=config.per_device_train_batch_size,
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
    trainer = UnlearningTrainer(
        model=model,
        args=config,
        forget_dataset=Dataset.from_list(forget_rows),
        retain_dataset=Dataset.from_list(retain_rows),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        print(f"adapter saved to {config.output_dir}; peak GPU memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
