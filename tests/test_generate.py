"""The command line: the JSON contract, streaming and --show_drafts, prompts files (output, resume,
interruption), and one clear line for each kind of bad input.

Most cases call generate.main in this process (a Python start-up each would cost seconds); the
ones that need a real process - the exit status and stderr of the script, a signal - run it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
from common import generate as generate_tokens
from conftest import N_LAYER, ROOT
from model import load_model
from self_spec import speculative_generate
from tokenizer import load_tokenizer


def run_generate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def json_result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_json(capsys, *args: str) -> dict:
    """generate.main in this process; the JSON object on its last stdout line."""
    capsys.readouterr()
    generate.main([*args, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def greedy_reference(path, prompt_tokens: list[int], max_new: int, eos_id: int = -1) -> list[int]:
    model = load_model(path)
    model.setup_caches(1, len(prompt_tokens) + max_new + 1)
    with torch.inference_mode():
        return generate_tokens(model, torch.tensor(prompt_tokens), max_new, temperature=0, top_k=None, stop_ids={eos_id})[0]


def test_json_contract_and_greedy_tokens_equal_transformers(checkpoints):
    path, hf = checkpoints("llama32")
    t0 = time.perf_counter()
    proc = run_generate("--checkpoint_path", str(path), "--prompt", "def add(a, b):", "--max_new_tokens", "20",
                        "--temperature", "0", "--num_samples", "2", "--json")
    wall = time.perf_counter() - t0
    result = json_result(proc)
    assert len(result["samples"]) == 2
    sample = result["samples"][0]
    prompt = torch.tensor(sample["prompt_tokens"])
    assert prompt[0] == hf.config.bos_token_id
    ref = hf.generate(prompt[None], max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert sample["generated_tokens"] == ref
    assert result["samples"][1]["generated_tokens"] == ref  # greedy: every sample the same
    assert sample["acceptance_rate"] is None and sample["tokens_per_step"] is None
    # the rate is the sample's own tokens over its own time, which the whole process outlasted
    assert sample["tokens_per_sec"] == pytest.approx(len(ref) / sample["seconds"])
    assert 0 < sample["seconds"] < wall
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    text = tokenizer.decode(sample["prompt_tokens"] + ref)[len(tokenizer.decode(sample["prompt_tokens"])):]
    assert sample["text"] == text and text.strip()
    assert proc.stdout.count("def add(a, b):" + text) == 2  # both samples streamed whole


def test_sampling_is_seeded_and_batch_rows_are_samples(checkpoints, capsys):
    path, _ = checkpoints("llama2")
    flags = ("--checkpoint_path", str(path), "--max_new_tokens", "16", "--temperature", "1.0", "--top_k", "50")
    first = main_json(capsys, *flags, "--num_samples", "2", "--seed", "1")["samples"]
    again = main_json(capsys, *flags, "--num_samples", "2", "--seed", "1")["samples"]
    other = main_json(capsys, *flags, "--num_samples", "2", "--seed", "2")["samples"]
    tokens = [s["generated_tokens"] for s in first]
    assert tokens == [s["generated_tokens"] for s in again]
    assert tokens[0] != tokens[1] and tokens != [s["generated_tokens"] for s in other]
    # --batch_size B with one prompt: B samples generated together, each its own draw
    rows = main_json(capsys, *flags, "--batch_size", "3", "--seed", "1")["samples"]
    assert len(rows) == 3 and len({tuple(s["generated_tokens"]) for s in rows}) == 3
    greedy = main_json(capsys, "--checkpoint_path", str(path), "--max_new_tokens", "16", "--temperature", "0",
                       "--batch_size", "3", "--draft_layers", "2", "--speculate_k", "3")["samples"]
    reference = greedy_reference(path, greedy[0]["prompt_tokens"], 16, load_tokenizer(path.parent / "tokenizer.model").eos_id)
    assert [s["generated_tokens"] for s in greedy] == [reference] * 3


def test_interactive_reads_prompts_until_end_of_input(checkpoints, monkeypatch, capsys):
    path, _ = checkpoints("llama2")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("def f(x):\nclass A:"))
    samples = main_json(capsys, "--checkpoint_path", str(path), "--interactive", "--max_new_tokens", "6",
                        "--temperature", "0")["samples"]
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    assert [s["prompt_tokens"] for s in samples] == [tokenizer.encode("def f(x):"), tokenizer.encode("class A:")]
    for s in samples:
        assert s["generated_tokens"] == greedy_reference(path, s["prompt_tokens"], 6, tokenizer.eos_id)


def test_show_drafts_colours_exactly_the_accepted_drafts(checkpoints, monkeypatch, capsys):
    """The loop marks a token as an accepted draft exactly when the exit layer's greedy guess for
    it was right and so were the guesses before it in its step (rebuilt here from the model), and
    the stream colours exactly the text of the marked tokens."""
    path, _ = checkpoints("llama2")
    model = load_model(path)
    exit_layer, k, prompt = 3, 3, [1, 40, 41, 42]
    model.setup_caches(1, 64, exit_layer)
    marked = []
    with torch.inference_mode():
        tokens, _ = speculative_generate(model, torch.tensor(prompt), 30, k, temperature=0, top_k=None, stop_ids=set(),
                                         on_tokens=lambda index, new, drafted: marked.extend(drafted))

        def exit_guess(seq):
            ids = torch.tensor([seq])
            return model.head(model.early(ids, torch.arange(len(seq))[None]))[0, -1].argmax().item()

        expected, i = [False], 1  # the first token comes from the prefill
        while i < len(tokens):
            n = 0
            while n < k and i + n < len(tokens) and exit_guess(prompt + tokens[: i + n]) == tokens[i + n]:
                n += 1
            expected += [True] * n + [False]
            i += n + 1
    expected = expected[: len(tokens)]
    assert marked == expected
    assert True in marked and marked.count(False) > 2  # both kinds occur: the check means something

    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    words = tokenizer.encode("hello world and the lazy dog", bos=False)
    flags = [i % 3 == 1 for i in range(len(words))]
    generate.TextStream(tokenizer, [1], show_drafts=True)(0, words, flags)
    pieces = [tokenizer.decode([1] + words[: i + 1])[len(tokenizer.decode([1] + words[:i])):] for i in range(len(words))]
    assert capsys.readouterr().out == "".join(f"\033[32m{p}\033[0m" if f else p for p, f in zip(pieces, flags))
    generate.TextStream(tokenizer, [1], show_drafts=False)(0, words, flags)
    assert capsys.readouterr().out == "".join(pieces) == "hello world and the lazy dog"


def test_completion_text_keeps_the_space_before_the_first_word(checkpoints):
    tokenizer = load_tokenizer(checkpoints("llama2")[0].parent / "tokenizer.model")  # SentencePiece: "▁word"
    prompt, whole = tokenizer.encode("def"), tokenizer.encode("def add(a, b)")
    assert whole[: len(prompt)] == prompt
    assert generate.completion_text(tokenizer, prompt, whole[len(prompt):]) == " add(a, b)"


def test_threads_default_to_the_faster_of_one_and_all(checkpoints, monkeypatch, capsys):
    """Without --threads on a CPU, a step is timed with one thread and with all; the faster stays."""
    path, _ = checkpoints("llama2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    for fast in (1, 4):
        # a step's seconds as measured with the threads last set: `fast` threads are quicker
        monkeypatch.setattr(generate, "measure_step_seconds",
                            lambda model, steps, batch, repeats=7, fast=fast: {k: 1.0 if chosen[-1] == fast else 2.0 for k in steps})
        chosen.clear()
        main_json(capsys, "--checkpoint_path", str(path), "--max_new_tokens", "2")
        assert chosen[-1] == fast, chosen
    chosen.clear()
    main_json(capsys, "--checkpoint_path", str(path), "--max_new_tokens", "2", "--threads", "3")
    assert chosen == [3]  # given: not measured


# --- prompts files ---------------------------------------------------------------------------

def write_prompts(path, prompts, jsonl=True):
    lines = [json.dumps({"prompt": p, "id": f"p{i}"}) if jsonl else p for i, p in enumerate(prompts)]
    path.write_text("\n".join(lines) + "\n")
    return path


PROMPTS = ["def add(a, b):", "class KVCache:", "The quick brown fox", "for step in range(10):", "import os",
           "result = {", "def greedy(logits):", "Numbers like 3, 14", "She said that", "When the draft is right"]


def read_output(path) -> dict[int, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_index = {r["index"]: r for r in records}
    assert len(by_index) == len(records), "a prompt was written twice"
    return by_index


def test_prompts_file_output_matches_batch_one(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("llama2")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:5])
    out = tmp_path / "out.jsonl"
    summary = main_json(capsys, "--checkpoint_path", str(path), "--prompts_file", str(prompts), "--batch_size", "2",
                        "--max_new_tokens", "12", "--temperature", "0", "--draft_layers", "3", "--speculate_k", "2",
                        "--output", str(out))
    records = read_output(out)
    assert sorted(records) == list(range(5)) and len(summary["samples"]) == 5
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    for i, text in enumerate(PROMPTS[:5]):
        r = records[i]
        assert r["prompt"] == text and r["id"] == f"p{i}"  # the file's own fields are carried
        assert r["prompt_tokens"] == tokenizer.encode(text)
        assert r["generated_tokens"] == greedy_reference(path, r["prompt_tokens"], 12, tokenizer.eos_id)
        assert r["text"] == tokenizer.decode(r["prompt_tokens"] + r["generated_tokens"])[len(tokenizer.decode(r["prompt_tokens"])):]
        assert 0 <= r["acceptance_rate"] <= 1 or len(r["generated_tokens"]) == 1
    # plain text, one prompt per line; a prompt too long for the context is skipped, the run goes on
    plain = write_prompts(tmp_path / "p.txt", ["def add(a, b):", "word " * 200, "import os"], jsonl=False)
    summary = main_json(capsys, "--checkpoint_path", str(path), "--prompts_file", str(plain), "--batch_size", "2",
                        "--max_new_tokens", "5", "--temperature", "0", "--output", str(out))
    records = read_output(out)
    assert sorted(records) == [0, 1, 2] and "leaves no room" in records[1]["skipped"]
    assert records[2]["generated_tokens"] == greedy_reference(path, tokenizer.encode("import os"), 5, tokenizer.eos_id)
    assert len(summary["samples"]) == 2


def test_interrupted_run_keeps_what_it_finished_and_resume_completes_it(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("llama2")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 3)
    flags = ["--checkpoint_path", str(path), "--prompts_file", str(prompts), "--batch_size", "2", "--max_new_tokens",
             "60", "--temperature", "0", "--draft_layers", "3", "--speculate_k", "2"]
    whole = tmp_path / "whole.jsonl"
    capsys.readouterr()
    generate.main([*flags, "--output", str(whole)])
    out = tmp_path / "out.jsonl"
    # Ctrl-C's default action in the child even where this process ignores SIGINT (a shell's
    # background job), which the child would otherwise inherit
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *flags, "--output", str(out), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if out.is_file() and out.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted:")
    finished = read_output(out)
    assert 3 <= len(finished) < len(PROMPTS) * 3
    with open(out, "a") as f:
        f.write('{"index": 29, "prompt": "cut sh')  # a line a harder kill leaves half-written
    generate.main([*flags, "--output", str(out), "--resume"])
    resumed, reference = read_output(out), read_output(whole)
    assert sorted(resumed) == list(range(len(PROMPTS) * 3))
    for i, r in reference.items():
        assert resumed[i]["generated_tokens"] == r["generated_tokens"], i
    for i in finished:  # what the interrupted run wrote is kept as it was
        assert resumed[i] == finished[i]


# --- bad input ---------------------------------------------------------------------------------

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
    ("batch size zero", ["--batch_size", "0"], "--batch_size must be at least 1"),
    ("missing prompts file", ["--prompts_file", "/nonexistent/prompts.jsonl"], "prompts file not found"),
    ("empty prompts file", ["--prompts_file", "@empty.jsonl"], "has no prompts"),
    ("malformed JSONL", ["--prompts_file", "@broken.jsonl"], "line 3: not JSON"),
    ("JSONL without prompt", ["--prompts_file", "@noprompt.jsonl"], 'line 2: a JSON object with a "prompt" string'),
    ("output without prompts file", ["--output", "@out.jsonl"], "--output and --resume need --prompts_file"),
    ("resume with other settings", ["--prompts_file", "@two.jsonl", "--output", "@other.jsonl", "--resume"],
     "was written with different settings (temperature)"),
    ("resume with another prompts file", ["--prompts_file", "@two.jsonl", "--output", "@foreign.jsonl", "--resume",
                                          "--temperature", "0"], "line 1 is not from this prompts file"),
]


def test_bad_input_gives_one_clear_line(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("llama2")
    broken = bad_checkpoints(path, tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    (tmp_path / "noprompt.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    write_prompts(tmp_path / "two.jsonl", ["def f():", "class A:"])
    capsys.readouterr()
    generate.main(["--checkpoint_path", str(path), "--prompts_file", str(tmp_path / "two.jsonl"),
                   "--max_new_tokens", "2", "--temperature", "0.5", "--output", str(tmp_path / "other.jsonl")])
    generate.main(["--checkpoint_path", str(path), "--prompts_file", str(tmp_path / "two.jsonl"),
                   "--max_new_tokens", "2", "--temperature", "0", "--output", str(tmp_path / "foreign.jsonl")])
    foreign = [json.loads(line) for line in (tmp_path / "foreign.jsonl").read_text().splitlines()]
    foreign[0]["prompt"] = "something else"
    (tmp_path / "foreign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    for case, flags, message in BAD_INPUT:
        if case == "cuda without a GPU" and torch.cuda.is_available():
            continue  # the one case that needs a machine without CUDA
        if flags[0].startswith("@"):
            flags = ["--checkpoint_path", str(broken[flags[0][1:]] / "model.pth")]
        flags = [str(tmp_path / f[1:]) if f.startswith("@") else f for f in flags]
        if "--checkpoint_path" not in flags:
            flags = ["--checkpoint_path", str(path), "--max_new_tokens", "2", *flags]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            generate.main(flags)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code != 0, case
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, lines)
    assert (tmp_path / "other.jsonl").read_text().count("\n") == 2  # a refused --resume leaves the file alone


def test_the_script_itself_reports_one_line(tmp_path):
    """As a process: exit status 1, one line on stderr, no traceback, for a bad flag and a bad file."""
    for flags, message in ((["--turbo"], "unrecognized arguments"),
                           (["--checkpoint_path", str(tmp_path / "model.pth")], "checkpoint not found")):
        proc = run_generate(*flags)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
