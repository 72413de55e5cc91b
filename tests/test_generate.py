"""The command line: the JSON contract, streaming, and one clear line for each kind of bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import N_LAYER, ROOT


def run_generate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def json_result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_json_contract_and_greedy_tokens_equal_transformers(checkpoints):
    path, hf = checkpoints("llama32")
    proc = run_generate("--checkpoint_path", str(path), "--prompt", "def add(a, b):", "--max_new_tokens", "20",
                        "--temperature", "0", "--num_samples", "2", "--json")
    result = json_result(proc)
    assert len(result["samples"]) == 2
    sample = result["samples"][0]
    prompt = torch.tensor(sample["prompt_tokens"])
    assert prompt[0] == hf.config.bos_token_id
    ref = hf.generate(prompt[None], max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert sample["generated_tokens"] == ref
    assert result["samples"][1]["generated_tokens"] == ref  # greedy: every sample the same
    assert sample["tokens_per_sec"] > 0 and sample["acceptance_rate"] is None
    assert sample["text"] in proc.stdout  # the streamed text is the decoded text


def test_sampling_is_seeded(checkpoints):
    path, _ = checkpoints("llama2")
    flags = ("--checkpoint_path", str(path), "--max_new_tokens", "16", "--temperature", "1.0", "--top_k", "50",
             "--num_samples", "2", "--json")
    first = json_result(run_generate(*flags, "--seed", "1"))["samples"]
    again = json_result(run_generate(*flags, "--seed", "1"))["samples"]
    other = json_result(run_generate(*flags, "--seed", "2"))["samples"]
    tokens = [s["generated_tokens"] for s in first]
    assert tokens == [s["generated_tokens"] for s in again]
    assert tokens[0] != tokens[1] and tokens != [s["generated_tokens"] for s in other]


def bad_checkpoints(path, tmp_path):
    """Folders that each break one thing, named by the case they test."""
    def copy(name):
        folder = tmp_path / name
        shutil.copytree(path.parent, folder)
        return folder

    no_tokenizer = copy("no_tokenizer")
    (no_tokenizer / "tokenizer.model").unlink()
    garbage = copy("garbage")
    (garbage / "model.pth").write_bytes(b"not a checkpoint")
    mismatch = copy("mismatch")
    config = json.loads((mismatch / "model_config.json").read_text())
    (mismatch / "model_config.json").write_text(json.dumps({**config, "dim": 96}))
    no_config = copy("no_config")
    (no_config / "model_config.json").unlink()
    return {"no_tokenizer": no_tokenizer, "garbage": garbage, "mismatch": mismatch, "no_config": no_config}


BAD_INPUT = [
    # (case, extra flags, words the one line must contain)
    ("missing checkpoint", ["--checkpoint_path", "/nonexistent/model.pth"], "checkpoint not found"),
    ("missing tokenizer", ["@no_tokenizer"], "tokenizer file not found"),
    ("unreadable checkpoint", ["@garbage"], "cannot read checkpoint"),
    ("config does not match weights", ["@mismatch"], "does not match model_config.json"),
    ("missing config", ["@no_config"], "cannot read model config"),
    ("prompt longer than context", ["--prompt", "word " * 200], "leaves no room"),
    ("unknown device", ["--device", "tpu"], "unknown device"),
    ("cuda without a GPU", ["--device", "cuda"], "no CUDA device"),
    ("zero samples", ["--num_samples", "0"], "--num_samples"),
    ("negative temperature", ["--temperature", "-1"], "--temperature"),
    ("zero max_new_tokens", ["--max_new_tokens", "0"], "--max_new_tokens"),
    ("non-numeric flag", ["--top_k", "many"], "invalid int value"),
    ("unknown flag", ["--turbo"], "unrecognized arguments"),
    ("draft_layers zero", ["--draft_layers", "0"], "--draft_layers must be between 1 and 5"),
    ("draft_layers = layers", ["--draft_layers", str(N_LAYER)], "--draft_layers must be between 1 and 5"),
    ("early_exit too deep", ["--early_exit", "9"], "--early_exit must be between 1 and 5"),
    ("speculate_k zero", ["--draft_layers", "2", "--speculate_k", "0"], "--speculate_k"),
    ("draft and early exit", ["--draft_layers", "2", "--early_exit", "2"], "exclude each other"),
]


def test_bad_input_gives_one_clear_line(checkpoints, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the 'cuda without a GPU' case needs a machine without CUDA")
    path, _ = checkpoints("llama2")
    broken = bad_checkpoints(path, tmp_path)
    for case, flags, message in BAD_INPUT:
        if flags[0].startswith("@"):
            flags = ["--checkpoint_path", str(broken[flags[0][1:]] / "model.pth")]
        elif "--checkpoint_path" not in flags:
            flags = ["--checkpoint_path", str(path), *flags]
        proc = run_generate(*flags)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0, case
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_interactive_reads_prompts_until_end_of_input(checkpoints):
    path, _ = checkpoints("llama2")
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(path), "--interactive",
                           "--max_new_tokens", "4", "--temperature", "0", "--json"],
                          input="def f(x):\nclass A:", capture_output=True, text=True, timeout=300)
    samples = json_result(proc)["samples"]
    assert len(samples) == 2 and samples[0]["prompt_tokens"] != samples[1]["prompt_tokens"]


def test_show_drafts_colours_accepted_drafts_in_a_terminal(checkpoints, monkeypatch, capsys):
    from generate import TextStream
    from tokenizer import load_tokenizer
    path, _ = checkpoints("llama2")
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    stream = TextStream(tokenizer, [1], enabled=True, show_drafts=True)
    stream(tokenizer.encode("hello world", bos=False), [True, False] * 20)
    out = capsys.readouterr().out
    assert "\033[32m" in out and out.count("\033[32m") == out.count("\033[0m")
    plain = TextStream(tokenizer, [1], enabled=True, show_drafts=False)
    plain(tokenizer.encode("hello world", bos=False), [True, False] * 20)
    assert capsys.readouterr().out == "hello world" == plain.text()
