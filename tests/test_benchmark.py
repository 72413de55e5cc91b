"""benchmark.py end to end on a tiny random model (no compile): the tables come out, the engines
agree token for token, and the synthetic LayerSkip model does what it claims."""
import json

import pytest

import benchmark

TINY = ["--vocab_size", "300", "--dim", "32", "--n_layer", "4", "--n_head", "2", "--n_kv_head", "1",
        "--intermediate_size", "64", "--prompt_length", "5", "--max_new_tokens", "12", "--repeats", "1",
        "--draft_layers", "1", "--speculate_k", "3", "--threads", "1"]


def test_benchmark_end_to_end(tmp_path, capsys):
    out_json, plot = tmp_path / "b.json", tmp_path / "sweep.png"
    result = benchmark.main(TINY + ["--late_scales", "1,0", "--sweep", "--sweep_layers", "1,2", "--sweep_k", "1,2",
                                    "--plot", str(plot), "--json", str(out_json)])
    stdout = capsys.readouterr().out
    assert "### Autoregressive decode vs transformers" in stdout and "### Self-speculation" in stdout
    assert json.loads(out_json.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert plot.stat().st_size > 0

    rows = result["rows"]
    methods = {(r["engine"], r["method"]) for r in rows}
    assert methods == {("this", "autoregressive"), ("this", "self-speculative"), ("this", "early-exit only (lossy)"),
                       ("transformers", "autoregressive"), ("transformers", "assistant_early_exit")}
    for r in rows:
        assert r["tokens_per_sec"] > 0 and r["new_tokens"] == 12
        if r["method"] != "early-exit only (lossy)":  # exact methods: the same greedy tokens everywhere
            assert r["tokens_equal_ar"] and r["tokens_equal_transformers"], r
        if r["acceptance_rate"] is not None:
            assert 0 <= r["acceptance_rate"] <= 1
    silenced = [r for r in rows if r["late_scale"] == 0 and r["method"] == "self-speculative"]
    assert [r["acceptance_rate"] for r in silenced] == [1.0]  # late layers add nothing: every draft right
    assert silenced[0]["tokens_per_step"] > 1 and silenced[0]["ideal"] > 1
    early = next(r for r in rows if r["late_scale"] == 0 and r["method"].startswith("early-exit"))
    assert early["tokens_equal_ar"]  # ... so the early exit alone is exact too

    assert {(r["draft_layers"], r["k"]) for r in result["sweep"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(r["tokens_equal_ar"] for r in result["sweep"])
    mem = result["memory"]
    assert mem["self_speculative"]["kv_cache"] > mem["autoregressive"]["kv_cache"]  # the k + 1 slack
    assert 1 < mem["ratio_weights_and_caches"] < 1.5


def test_ideal_speedup_cost_model():
    # E = L/4, k = 4, every draft right: 5 tokens per step for 4 * 1/4 + 3/4 = 1.75 tokens of work
    assert abs(benchmark.ideal_speedup(12, 3, 4, 1.0) - 5 / 1.75) < 1e-12
    assert benchmark.ideal_speedup(12, 3, 4, 0.0) < 1  # nothing accepted: slower than AR


def test_bad_input_is_one_line(capsys):
    for flags in (["--draft_layers", "4"], ["--speculate_k", "0"], ["--late_scales", "-1"],
                  ["--checkpoint_path", "/nonexistent/model.pth"]):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(TINY + flags)
        err = capsys.readouterr().err
        assert exit_.value.code != 0, flags
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err


def test_checkpoint_mode(checkpoints, capsys):
    path, _ = checkpoints("llama2")
    result = benchmark.main(["--checkpoint_path", str(path), "--prompt", "def add(a, b):", "--max_new_tokens", "10",
                             "--repeats", "1", "--draft_layers", "2", "--speculate_k", "1,3", "--threads", "1",
                             "--no_memory"])
    assert "### Self-speculation" in capsys.readouterr().out
    spec = [r for r in result["rows"] if r["method"] == "self-speculative"]
    assert [r["k"] for r in spec] == [1, 3]
    assert all(r["tokens_equal_ar"] and 0 <= r["acceptance_rate"] <= 1 for r in spec)
