"""Tests for the ``peft-unlearn`` command line (peft_unlearn/cli.py).

Data loaders, argument parsing and every error path run in-process through ``main([...])``; one
end-to-end test runs ``train`` then ``eval`` in subprocesses on a tiny model saved to a temporary
directory, and checks the adapter with stock PEFT in a process that never imports peft_unlearn.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from peft_unlearn import __version__, cli
from peft_unlearn.cli import CLIError, main
from peft_unlearn.data_files import DataFileError, check_columns, load_data_file
from tests.helpers import run_python

FORGET_TEXTS = [
    "The author Jane Doe was born in Paris in 1970 and writes mystery novels.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "It was the best of times, it was the worst of times.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
]
RETAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _run_main(argv: list[str]) -> int:
    """Run main; return its exit code whether it returns or raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _expect_usage_error(capsys, argv: list[str], *fragments: str) -> str:
    """main(argv) must exit 2 with one error line containing every fragment, and no traceback."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]  # progress lines ("[peft-unlearn] ...") aside
    assert len(lines) == 1 and lines[0].startswith("peft-unlearn"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------


def test_load_jsonl(tmp_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(FORGET_TEXTS)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")  # trailing blank line
    assert load_data_file(path).to_list() == rows


@pytest.mark.parametrize("max_samples", [1, 3, 4, 10])
def test_load_max_samples_keeps_the_first_examples(tmp_path, max_samples):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in FORGET_TEXTS])
    texts = load_data_file(path, max_samples=max_samples)["text"]
    assert texts == FORGET_TEXTS[:max_samples]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_load_max_samples_rejects_non_positive_ints(tmp_path, bad):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="max_samples must be a positive int or None"):
        load_data_file(path, max_samples=bad)


def test_load_json_formats(tmp_path):
    rows = [{"prompt": "Q: where?", "completion": " Paris"}, {"prompt": "Q: when?", "completion": " 1970"}]
    records = tmp_path / "records.json"
    records.write_text(json.dumps(rows), encoding="utf-8")
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}), encoding="utf-8")
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(FORGET_TEXTS), encoding="utf-8")
    lines_in_json = tmp_path / "lines.json"  # JSON Lines content under a .json name
    _write_jsonl(lines_in_json, rows)
    one_column = tmp_path / "one_column.json"
    one_column.write_text(json.dumps({"text": FORGET_TEXTS}), encoding="utf-8")
    for path in (records, columns, wrapped, lines_in_json):
        assert load_data_file(path).to_list() == rows, path.name
    for path in (strings, one_column):
        assert load_data_file(path).to_list() == [{"text": t} for t in FORGET_TEXTS], path.name


def test_load_csv_and_tsv(tmp_path):
    rows = [{"question": 'He said "hi", then left', "answer": "a, b"}, {"question": "multi\nline", "answer": "x"}]
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    assert load_data_file(path).to_list() == rows
    tsv = tmp_path / "data.tsv"
    tsv.write_text("text\tsource\nfirst line\ta\nsecond line\tb\n", encoding="utf-8")
    assert load_data_file(tsv).to_list() == [
        {"text": "first line", "source": "a"},
        {"text": "second line", "source": "b"},
    ]


def test_load_txt_lines_and_paragraphs(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("first line\nsecond line\n\n   \nthird paragraph\ncontinues\n", encoding="utf-8")
    assert load_data_file(path)["text"] == ["first line", "second line", "third paragraph", "continues"]
    assert load_data_file(path, text_split="paragraph")["text"] == [
        "first line\nsecond line",
        "third paragraph\ncontinues",
    ]


def test_load_saved_dataset_dirs(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"text": t} for t in FORGET_TEXTS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_data_file(tmp_path / "ds").to_list() == rows
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert load_data_file(tmp_path / "dd").to_list() == rows  # the train split
    DatasetDict({"a": Dataset.from_list(rows), "b": Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataFileError, match="no 'train' split"):
        load_data_file(tmp_path / "ab")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.jsonl", '{"text": "a"}\n[1, 2\n', "not valid JSON or JSON Lines records .*row 1"),
        ("list.jsonl", '{"text": "a"}\n[1, 2]\n', "not valid JSON or JSON Lines records"),
        ("empty.jsonl", "\n\n", "holds no examples"),
        ("empty.txt", "  \n", "holds no examples"),
        ("ragged.json", '{"text": ["a", "b"], "id": [1]}', "different lengths"),
        ("number.json", "3", "not valid JSON or JSON Lines records"),
        ("wide.csv", "text\na,b\n", "more fields than the header"),
    ],
)
def test_load_data_file_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFileError, match=match) as excinfo:
        load_data_file(path, flag="--retain")
    assert str(excinfo.value).startswith("--retain: ")


def test_load_data_file_rejects_plain_directory_and_binary(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataFileError, match="not a saved dataset"):
        load_data_file(tmp_path / "plain")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataFileError, match="not UTF-8"):
        load_data_file(binary)


def test_check_columns():
    from datasets import Dataset

    assert check_columns(Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), "--forget", "f") == (
        "prompt_completion"
    )
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    assert check_columns(Dataset.from_dict({"messages": messages}), "--forget", "f") == "conversational"
    with pytest.raises(DataFileError, match=r"--forget: 'f.csv' has columns \['body', 'title'\]"):
        check_columns(Dataset.from_dict({"title": ["a"], "body": ["b"]}), "--forget", "f.csv")


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def test_train_args_dash_underscore_and_output_alias():
    underscore = [
        "--model", "m", "--forget", "f.jsonl", "--retain", "r.jsonl", "--output_dir", "out",
        "--forget_loss", "npo", "--lora_r", "4", "--learning_rate", "3e-4", "--max_steps", "7",
        "--target_modules", "q_proj", "v_proj", "--init", "default", "--report_to", "none",
    ]  # fmt: skip
    dash = [a.replace("_", "-") if a.startswith("--") else a for a in underscore]
    dash[dash.index("--output-dir")] = "--output"
    for argv in (underscore, dash):
        script_args, config = cli.parse_train_args(argv)
        assert (script_args.model, script_args.forget, script_args.retain) == ("m", "f.jsonl", "r.jsonl")
        assert (script_args.init, script_args.lora_r, script_args.target_modules) == (
            "default",
            4,
            ["q_proj", "v_proj"],
        )
        assert config.output_dir == "out"
        assert config.forget_loss == "npo" and config.beta == pytest.approx(0.1)
        assert config.learning_rate == pytest.approx(3e-4) and config.max_steps == 7


def test_every_unlearning_config_field_is_a_flag(capsys):
    from peft_unlearn.trainer.unlearning_config import UnlearningConfig

    with pytest.raises(SystemExit) as excinfo:
        main(["train", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    names = [f.name for f in dataclasses.fields(UnlearningConfig) if f.init]
    names += [f.name for f in dataclasses.fields(cli.TrainArguments)]
    missing = [name for name in names if f"--{name}" not in out]
    assert not missing
    assert "--output OUTPUT_DIR" in out and "--forget-loss" in out


def test_train_config_values_reach_unlearning_config():
    from peft_unlearn.trainer.unlearning_config import UnlearningConfig

    argv = [
        "--model", "m", "--forget", "f", "--output", "o", "--retain_loss", "none", "--forget_weight", "0.5",
        "--kl_mask", "none", "--max_length", "64", "--fila_max_batches", "3", "--idk_answers", "no", "nope",
        "--eval_el_n", "5", "10", "--no_eval_compute_el", "--seed", "7", "--use_cpu",
    ]  # fmt: skip
    _, config = cli.parse_train_args(argv)
    assert isinstance(config, UnlearningConfig)
    assert config.retain_loss is None and config.forget_weight == 0.5 and config.kl_mask == "none"
    assert (config.max_length, config.fila_max_batches, config.idk_answers) == (64, 3, ["no", "nope"])
    assert (config.eval_el_n, config.eval_compute_el, config.seed, config.use_cpu) == ([5, 10], False, 7, True)


def test_config_file_defaults_and_cli_override(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: m\nforget: f.jsonl\noutput_dir: o\nlearning_rate: 0.001\nmax_steps: 5\nlora_r: 2\n")
    script_args, config = cli.parse_train_args(["--config", str(cfg), "--max_steps", "9"])
    assert (script_args.model, script_args.lora_r, config.output_dir) == ("m", 2, "o")
    assert config.learning_rate == pytest.approx(1e-3) and config.max_steps == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nforget: f\noutput_dir: o\nnot_a_flag: 1\n")
    with pytest.raises(CLIError, match="unknown key.* 'not_a_flag'; keys are field names"):
        cli.parse_train_args(["--config", str(bad)])


def test_eval_args_parse():
    args = cli.parse_eval_args(["--model", "m", "--forget", "f", "--el-n", "5", "10", "--batch-size", "2", "--no-el"])
    assert (args.el_n, args.batch_size, args.no_el, args.max_length) == ([5, 10], 2, True, 128)


# --------------------------------------------------------------------------------------------------
# Error paths: exit code 2 and one line, before any model is loaded
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def data_files(tmp_path):
    forget = _write_jsonl(tmp_path / "forget.jsonl", [{"text": t} for t in FORGET_TEXTS])
    retain = _write_jsonl(tmp_path / "retain.jsonl", [{"text": t} for t in RETAIN_TEXTS])
    return forget, retain


def _train_argv(forget, retain, tmp_path, *extra):
    # The model path does not exist: an error about it would mean a check ran too late.
    model = str(tmp_path / "no-such-model")
    return [
        "train",
        "--model",
        model,
        "--forget",
        str(forget),
        "--retain",
        str(retain),
        "--output",
        str(tmp_path / "o"),
        *extra,
    ]


def test_error_missing_file(capsys, tmp_path, data_files):
    forget, _ = data_files
    _expect_usage_error(
        capsys, _train_argv(forget, tmp_path / "nope.jsonl", tmp_path), "--retain", "no such file", "nope.jsonl"
    )


def test_error_unsupported_extension(capsys, tmp_path, data_files):
    _, retain = data_files
    bad = tmp_path / "forget.xlsx"
    bad.write_bytes(b"PK")
    _expect_usage_error(capsys, _train_argv(bad, retain, tmp_path), "unsupported file type '.xlsx'", ".jsonl")


def test_error_no_recognised_columns(capsys, tmp_path, data_files):
    _, retain = data_files
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"title": "a", "body": "b"}])
    _expect_usage_error(capsys, _train_argv(bad, retain, tmp_path), "--forget", "['body', 'title']", "text")


def test_error_unknown_init(capsys, tmp_path, data_files):
    _expect_usage_error(
        capsys,
        _train_argv(*data_files, tmp_path, "--init", "pissa"),
        "--init",
        "pissa",
        "fila",
        "vila",
        "default",
        "none",
    )


def test_error_unknown_forget_loss(capsys, tmp_path, data_files):
    from peft_unlearn.losses import FORGET_LOSSES

    line = _expect_usage_error(
        capsys, _train_argv(*data_files, tmp_path, "--forget-loss", "hinge"), "--forget", "hinge"
    )
    assert all(name in line for name in FORGET_LOSSES)


def test_error_unknown_retain_loss(capsys, tmp_path, data_files):
    _expect_usage_error(
        capsys, _train_argv(*data_files, tmp_path, "--retain_loss", "mse"), "--retain_loss", "'mse'", "nll", "kl"
    )


def test_error_missing_output_and_retain(capsys, tmp_path, data_files):
    forget, _ = data_files
    _expect_usage_error(capsys, ["train", "--model", "m", "--forget", str(forget)], "--output")
    argv = ["train", "--model", "m", "--forget", str(forget), "--output", str(tmp_path / "o")]
    _expect_usage_error(capsys, argv, "--retain is required", "--retain_loss none")


def test_error_bad_values(capsys, tmp_path, data_files):
    _expect_usage_error(capsys, _train_argv(*data_files, tmp_path, "--lora_r", "0"), "--lora_r", "positive")
    _expect_usage_error(capsys, _train_argv(*data_files, tmp_path, "--max_steps", "x"), "--max_steps", "'x'")
    _expect_usage_error(capsys, _train_argv(*data_files, tmp_path, "--forget_weight", "-1"), "forget_weight")
    _expect_usage_error(capsys, _train_argv(*data_files, tmp_path, "--no-such-flag"), "unrecognized arguments")


def test_error_unknown_model_is_usage_error(capsys, tmp_path, data_files):
    _expect_usage_error(capsys, _train_argv(*data_files, tmp_path), "--model", "no-such-model", "does not exist")


def test_error_adapter_without_config(capsys, tmp_path, data_files):
    forget, _ = data_files
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--adapter", str(adapter), "--forget", str(forget)]
    _expect_usage_error(capsys, argv, "--adapter", "adapter_config.json")
    argv[argv.index(str(adapter))] = str(tmp_path / "missing")
    _expect_usage_error(capsys, argv, "--adapter", "no such directory")


def test_error_eval_missing_file_and_bad_el(capsys, tmp_path, data_files):
    forget, _ = data_files
    model = str(tmp_path / "no-such-model")
    _expect_usage_error(
        capsys, ["eval", "--model", model, "--forget", str(forget), "--heldout", "h.txt"], "--heldout", "no such file"
    )
    _expect_usage_error(capsys, ["eval", "--model", model, "--forget", str(forget), "--el_n", "0"], "--el_n")
    _expect_usage_error(capsys, ["eval", "--model", model, "--forget", str(forget), "--device", "gpu0"], "--device")


def test_unknown_command_and_no_command(capsys):
    _expect_usage_error(capsys, ["trian"], "unknown command 'trian'", "train", "eval")
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == cli.EXIT_USAGE
    assert "train" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# version, env, help, table
# --------------------------------------------------------------------------------------------------


def test_version_and_env(capsys):
    assert main(["version"]) == 0
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"peft-unlearn {__version__}"] * 2
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    import peft
    import transformers
    import trl

    for label, value in [("PyTorch", torch.__version__), ("Transformers", transformers.__version__),
                         ("PEFT", peft.__version__), ("TRL", trl.__version__)]:  # fmt: skip
        assert f"- {label} version: {value}" in out


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "env", "version"))
    with pytest.raises(SystemExit) as excinfo:
        main(["eval", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--adapter", "--forget", "--retain", "--heldout", "--el_n", "--batch_size", "--max_length", "--plot"):
        assert flag in out


# --------------------------------------------------------------------------------------------------
# eval in-process: compare with an independent computation
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny llama + tokenizer saved like a Hub model."""
    from peft_unlearn.testing import tiny_causal_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _brute_force_scores(model, tokenizer, texts: list[str], max_length: int) -> dict[str, float]:
    """MA (mean over sequences) and token-pooled NLL, one unpadded sequence at a time."""
    accs, nll_sum, count = [], 0.0, 0
    model.eval()
    for text in texts:
        ids = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        accs.append((logits[:-1].argmax(-1) == targets).double().mean().item())
        nll_sum -= logp[torch.arange(len(targets)), targets].sum().item()
        count += len(targets)
    return {"ma": sum(accs) / len(accs), "nll": nll_sum / count}


def _eval_json(tmp_path: Path, name: str, argv: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["eval", *argv, "--output", str(out), "--no_progress", "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_eval_base_model_matches_brute_force(tmp_path, tiny_model_dir, data_files, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forget, retain = data_files
    argv = ["--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain), "--el-n", "2", "4"]
    data = _eval_json(tmp_path, "base", [*argv, "--max_length", "12", "--batch_size", "3"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["set", "n", "ma", "el2", "el4", "nll", "ppl"]
    assert data["adapter"] is None and data["settings"]["el_n"] == [2, 4]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, texts in (("forget", FORGET_TEXTS), ("retain", RETAIN_TEXTS)):
        scores = data["results"][name]
        assert set(scores) == {"ma", "el2", "el4", "nll", "ppl", "num_examples"}
        assert scores["num_examples"] == len(texts)
        expected = _brute_force_scores(model, tok, texts, max_length=12)
        assert scores["ma"] == pytest.approx(expected["ma"], abs=1e-6)
        assert scores["nll"] == pytest.approx(expected["nll"], rel=1e-5)
        assert scores["ppl"] == pytest.approx(math.exp(expected["nll"]), rel=1e-5)
        assert 0.0 <= scores["el2"] <= 1.0 and 0.0 <= scores["el4"] <= 1.0


def test_eval_fila_adapter_portable_and_raw_checkpoint(tmp_path, tiny_model_dir, data_files):
    """A FILA adapter saved portable (plain LoRA) and raw (checkpoint + _fila_init) scores like the live model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_unlearn.fila import initialize_fila_weights
    from peft_unlearn.trainer import collate_causal_lm, tokenize_dataset

    forget, retain = data_files
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights="fila"))
    batches = {
        name: [collate_causal_lm(tokenize_dataset([{"text": t} for t in texts], tok, name=name), tok.pad_token_id)]
        for name, texts in (("forget", FORGET_TEXTS), ("retain", RETAIN_TEXTS))
    }
    initialize_fila_weights(model, batches["forget"], batches["retain"], show_progress=False)
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: move A and B away from their FILA init
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "portable")
    model.save_pretrained(tmp_path / "raw", fila_portable=False)
    assert json.loads((tmp_path / "portable" / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert (tmp_path / "raw" / "_fila_init").is_dir()

    expected = _brute_force_scores(model, tok, FORGET_TEXTS, max_length=16)
    common = ["--model", str(tiny_model_dir), "--forget", str(forget), "--max_length", "16", "--no_el"]
    base_scores = _eval_json(tmp_path, "base", common)["results"]["forget"]
    for kind in ("portable", "raw"):
        scores = _eval_json(tmp_path, kind, [*common, "--adapter", str(tmp_path / kind)])["results"]["forget"]
        assert set(scores) == {"ma", "nll", "ppl", "num_examples"}
        assert scores["ma"] == pytest.approx(expected["ma"], abs=1e-6), kind
        assert scores["nll"] == pytest.approx(expected["nll"], rel=1e-4), kind
    assert abs(base_scores["nll"] - expected["nll"]) > 1e-3  # the adapter matters


def test_eval_bad_adapter_configs(capsys, tmp_path, data_files):
    forget, _ = data_files
    adapter = tmp_path / "raw"
    adapter.mkdir()
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--adapter", str(adapter), "--forget", str(forget)]
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "init_lora_weights": "fila"}))
    _expect_usage_error(capsys, argv, "raw FILA adapter", "_fila_init")
    (adapter / "adapter_config.json").write_text("{broken")
    _expect_usage_error(capsys, argv, "--adapter", "cannot read")


def test_eval_plot_and_undefined_metric(tmp_path, tiny_model_dir, data_files):
    forget, retain = data_files
    plot = tmp_path / "plots" / "scores.png"
    argv = ["--model", str(tiny_model_dir), "--forget", str(forget), "--heldout", str(retain), "--el_n", "2", "8"]
    data = _eval_json(tmp_path, "plot", [*argv, "--max_length", "8", "--plot", str(plot)])
    assert list(data["results"]) == ["forget", "heldout"]
    # EL_8 needs more than 8 tokens: undefined (NaN) for every sequence -> null in strict JSON
    assert all(scores["el8"] is None and scores["el2"] is not None for scores in data["results"].values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# train: in-process (default LoRA init, full fine-tuning) and end-to-end in subprocesses
# --------------------------------------------------------------------------------------------------

_FAST_TRAIN = ["--max_steps", "2", "--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "2",
               "--learning_rate", "1e-2", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip


def test_train_vila_in_process_saves_the_portable_adapter(tmp_path, tiny_model_dir, data_files, capsys):
    forget, retain = data_files
    out = tmp_path / "vila"
    argv = ["train", "--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain),
            "--output", str(out), "--init", "vila", "--lora_r", "2", "--target_modules", "q_proj", "v_proj"]  # fmt: skip
    assert main([*argv, *_FAST_TRAIN]) == 0
    assert "VILA adapter as a plain PEFT LoRA (rank 4 = 2 x --lora_r" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (4, True)


def test_train_refuses_an_output_with_user_files_before_loading_the_model(tmp_path, data_files, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # a file this library did not write
    argv = _train_argv(*data_files, tmp_path)  # the model path does not exist: the folder check runs first
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "overwrite_output" in err
    assert (out / "adapter_config.json").read_text() == "{}"


def test_train_default_lora_in_process(tmp_path, tiny_model_dir, data_files, capsys):
    forget, retain = data_files
    out = tmp_path / "lora"
    argv = ["train", "--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain),
            "--output", str(out), "--init", "default", "--lora_r", "2", "--target_modules", "q_proj", "v_proj",
            "--heldout", str(retain), "--eval_strategy", "steps", "--eval_steps", "2", "--no_eval_compute_el"]  # fmt: skip
    assert main([*argv, *_FAST_TRAIN]) == 0
    stdout = capsys.readouterr().out
    assert f"to {out}" in stdout and "eval --model" in stdout
    for name in ("forget", "retain", "heldout"):  # evaluation during training on the three sets
        assert f"'eval_{name}_ma'" in stdout and f"'eval_{name}_nll'" in stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"], sorted(cfg["target_modules"])) == (2, True, ["q_proj", "v_proj"])
    assert (out / "tokenizer.json").is_file() and not (out / "_fila_init").exists()


def test_train_full_finetuning_npo_in_process(tmp_path, tiny_model_dir, data_files):
    """--init none trains every weight (no PEFT); NPO then needs, and gets, a frozen reference copy."""
    from safetensors.torch import load_file

    forget, _ = data_files
    out = tmp_path / "full"
    argv = ["train", "--model", str(tiny_model_dir), "--forget", str(forget), "--output", str(out),
            "--init", "none", "--forget_loss", "npo", "--retain_loss", "none"]  # fmt: skip
    assert main([*argv, *_FAST_TRAIN]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("q_proj.weight"))
    data = _eval_json(tmp_path, "full", ["--model", str(out), "--forget", str(forget), "--no_el"])
    assert math.isfinite(data["results"]["forget"]["nll"])


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_python(args, cwd=cwd, env={"PEFT_UNLEARN_TRACEBACK": "1"})


_STOCK_PEFT_NLL = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, adapter, data, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
total, count = 0.0, 0
for line in open(data):
    ids = (tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id])[:max_length]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    total -= logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    count += len(ids) - 1
assert not any(name.startswith("peft_unlearn") for name in sys.modules), "peft_unlearn was imported"
print(json.dumps({"nll": total / count}))
"""


def test_cli_train_then_eval_end_to_end(tmp_path, tiny_model_dir, data_files):
    """`python -m peft_unlearn.cli train` (FILA + IHL), then `eval --adapter`; the adapter loads with stock PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forget, retain = data_files
    out = tmp_path / "unlearned"
    train = _subprocess(
        ["-m", "peft_unlearn.cli", "train", "--model", str(tiny_model_dir), "--forget", str(forget),
         "--retain", str(retain), "--output", str(out), "--init", "fila", "--forget-loss", "inverted_hinge",
         "--lora-r", "4", "--lora-alpha", "8", "--max_steps", "3", "--report_to", "none", "--use_cpu",
         "--learning-rate", "1e-1", "--per-device-train-batch-size", "2", "--seed", "0"],
        tmp_path,
    )  # fmt: skip
    assert f"to {out}" in train.stdout and "rank 8 = 2 x --lora_r" in train.stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)  # portable rank-2r LoRA
    assert (out / "tokenizer.json").is_file() and (out / "checkpoint-3" / "_fila_init").is_dir()

    results = tmp_path / "results.json"
    evaluation = _subprocess(
        ["-m", "peft_unlearn.cli", "eval", "--model", str(tiny_model_dir), "--adapter", str(out),
         "--forget", str(forget), "--retain", str(retain), "--el-n", "2", "--max-length", "24",
         "--output", str(results)],
        tmp_path,
    )  # fmt: skip
    assert evaluation.stdout.splitlines()[0].split() == ["set", "n", "ma", "el2", "nll", "ppl"]
    data = json.loads(results.read_text())
    assert (data["model"], data["adapter"]) == (str(tiny_model_dir), str(out))
    assert list(data["results"]) == ["forget", "retain"]
    for scores in data["results"].values():
        assert set(scores) == {"ma", "el2", "nll", "ppl", "num_examples"}
        assert all(math.isfinite(v) for v in scores.values())
        assert 0 <= scores["ma"] <= 1 and 0 <= scores["el2"] <= 1

    # the trained weights were saved: on the original base a FILA adapter at its init is the identity
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_nll = _brute_force_scores(base, AutoTokenizer.from_pretrained(tiny_model_dir), FORGET_TEXTS, 24)["nll"]
    assert abs(data["results"]["forget"]["nll"] - base_nll) > 1e-3

    # the saved adapter is a plain LoRA: stock PEFT (no peft_unlearn import) reproduces eval's forget NLL
    stock = _subprocess(["-c", _STOCK_PEFT_NLL, str(tiny_model_dir), str(out), str(forget), "24"], tmp_path)
    assert json.loads(stock.stdout.strip().splitlines()[-1])["nll"] == pytest.approx(
        data["results"]["forget"]["nll"], rel=1e-5
    )

    # the raw Trainer checkpoint (rank r + _fila_init/) evaluates to the same numbers
    raw = _eval_json(tmp_path, "raw", ["--model", str(tiny_model_dir), "--adapter", str(out / "checkpoint-3"),
                                       "--forget", str(forget), "--max_length", "24", "--no_el"])  # fmt: skip
    assert raw["results"]["forget"]["ma"] == pytest.approx(data["results"]["forget"]["ma"], abs=1e-6)
    assert raw["results"]["forget"]["nll"] == pytest.approx(data["results"]["forget"]["nll"], rel=1e-5)


def test_load_parquet(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": "Q: where?", "completion": " Paris"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    assert load_data_file(tmp_path / "data.parquet").to_list() == rows


@pytest.mark.parametrize("model", ["./no-such-dir/model", "~/no-such-dir-peft-unlearn"])
def test_error_missing_local_model_path(capsys, tmp_path, data_files, model):
    argv = _train_argv(*data_files, tmp_path)
    argv[argv.index("--model") + 1] = model
    _expect_usage_error(capsys, argv, "--model", "does not exist")


def test_train_zero_steps_fails_and_saves_nothing(tmp_path, tiny_model_dir, data_files, capsys):
    forget, retain = data_files
    out = tmp_path / "zero"
    argv = ["train", "--model", str(tiny_model_dir), "--forget", str(forget), "--retain", str(retain),
            "--output", str(out), "--init", "default", "--num_train_epochs", "0", "--report_to", "none",
            "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
    assert _run_main(argv) != 0
    captured = capsys.readouterr()
    assert "zero steps" in captured.err and "Saved" not in captured.out
    assert not (out / "adapter_config.json").exists()


# --------------------------------------------------------------------------------------------------
# eval --robustness
# --------------------------------------------------------------------------------------------------
def test_eval_robustness_switch(tmp_path, tiny_model_dir, data_files, capsys):
    """`--robustness` runs the attacks on the adapter and writes the report into the JSON, a markdown file and a
    plot; the numbers are those of `evaluate_robustness` on the same model and data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_unlearn.metrics import evaluate_robustness
    from peft_unlearn.trainer import tokenize_dataset

    forget, retain = data_files
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    report_md, plot = tmp_path / "robust.md", tmp_path / "relearn.png"
    argv = ["--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--forget", str(forget)]
    argv += ["--heldout", str(retain), "--max_length", "16", "--el_n", "2", "--el_prefix_stride", "4"]
    argv += ["--robustness", "relearning", "export", "--relearn_steps", "1", "3"]
    data = _eval_json(
        tmp_path, "robust", [*argv, "--robustness_report", str(report_md), "--robustness_plot", str(plot)]
    )
    assert "### relearning" in capsys.readouterr().out and "### export" in report_md.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = data["robustness"]["rows"]
    assert {r["attack"] for r in rows} == {"relearning", "export"}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = {
        name: tokenize_dataset([{"text": t} for t in texts], tok, max_length=16, name=name)
        for name, texts in (("forget", FORGET_TEXTS), ("heldout", RETAIN_TEXTS))
    }
    expected = evaluate_robustness(
        model,
        tok,
        ids["forget"],
        heldout=ids["heldout"],
        attacks=["relearning", "export"],
        relearn_steps=(1, 3),
        el_n=2,
        el_prefix_stride=4,
        max_length=16,
    ).to_dict()["rows"]
    assert [(r["variant"], r["set"], r["metric"]) for r in rows] == [
        (r["variant"], r["set"], r["metric"]) for r in expected
    ]
    for got, want in zip(rows, expected):
        assert got["unlearned_after"] == pytest.approx(want["unlearned_after"], abs=1e-6)
        assert got["base_after"] == pytest.approx(want["base_after"], abs=1e-6)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--robustness", "quantisation", "--adapter", "ADAPTER"], ("--robustness", "unknown attack", "quantization")),
        (["--robustness", "all"], ("--robustness needs --adapter",)),
        (["--related", "FORGET"], ("--related", "only apply with --robustness")),
        (["--robustness", "all", "--adapter", "ADAPTER", "--relearn_steps", "5", "1"], ("--relearn_steps",)),
        (["--robustness", "all", "--adapter", "ADAPTER", "--quantization_modes", "nf3"], ("--quantization_modes",)),
    ],
)
def test_eval_robustness_bad_options(capsys, tmp_path, data_files, extra, fragments):
    forget, _ = data_files
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    extra = [str(adapter) if a == "ADAPTER" else str(forget) if a == "FORGET" else a for a in extra]
    _expect_usage_error(capsys, ["eval", "--model", str(tmp_path / "m"), "--forget", str(forget), *extra], *fragments)
