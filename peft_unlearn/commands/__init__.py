"""The `peft-unlearn` commands, one module each (`train`, `evaluate`) plus what they share (`common`).

`peft_unlearn.cli.main` dispatches to them.

Examples:
    >>> from peft_unlearn.commands.train import TrainArguments
    >>> TrainArguments(model="m", forget="f.jsonl").lora_r
    8
"""
