"""Self-speculative decoding returns exactly what the full model would, token for token under greedy
decoding (the distribution under sampling: test_batch.py), and compiles to one graph."""
import json
import os
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch

from common import generate, generate_batch, prefill
from conftest import N_LAYER, ROOT, stand_in_model, write_task
from model import ModelArgs, Transformer, load_model
from self_spec import (AUTO_K, AdaptiveK, best_k, decoding_functions, speculative_generate, speculative_step,
                       speculative_steps, warm_up)
from tokenizer import load_tokenizer

MAX_NEW = 37  # a multiple of none of k + 1 = 2, 4, 9


def greedy(model, prompt, exit_layer=None, k=0, stop_ids=frozenset(), max_new=MAX_NEW):
    model.setup_caches(1, len(prompt) + max_new + (max(AUTO_K) if k == "auto" else k) + 1, exit_layer)
    with torch.inference_mode():
        if k:
            return speculative_generate(model, prompt, max_new, k, temperature=0, top_k=None, stop_ids=stop_ids)
        return generate(model, prompt, max_new, temperature=0, top_k=None, stop_ids=stop_ids)


@pytest.mark.parametrize("style", ["llama2", "llama32"])
def test_greedy_equals_autoregressive_over_a_grid(checkpoints, style):
    model = load_model(checkpoints(style)[0])
    prompt_lengths = [1, 2, 9, 23, 40]
    torch.manual_seed(0)
    prompts = {n: torch.randint(3, 300, (n,)) for n in prompt_lengths}
    reference = {n: greedy(model, prompts[n])[0] for n in prompt_lengths}
    runs = 0
    for exit_layer in (1, N_LAYER // 2, N_LAYER - 1):
        for k in (1, 3, 8):
            for n in prompt_lengths[runs % 2::2]:  # every prompt length, spread over the grid
                tokens, stats = greedy(model, prompts[n], exit_layer, k)
                assert tokens == reference[n], (exit_layer, k, n)
                assert 0 <= stats["acceptance_rate"] <= 1
            runs += 1


def late_layers_silenced(model: Transformer, exit_layer: int) -> Transformer:
    """Layers [E, L) add nothing to the residual stream: every draft is right."""
    for layer in model.layers[exit_layer:]:
        layer.attention.wo.weight.data.zero_()
        layer.feed_forward.w2.weight.data.zero_()
    return model


def test_eos_inside_a_step_and_max_new_tokens(checkpoints):
    model = late_layers_silenced(load_model(checkpoints("llama2")[0]), N_LAYER - 2)
    prompt = torch.tensor([1, 40, 41, 42])
    reference, _ = greedy(model, prompt)
    tokens, stats = greedy(model, prompt, N_LAYER - 2, k=3)
    assert tokens == reference and stats["acceptance_rate"] == 1.0  # steps of 4: 1 + 9 * 4 = 37
    for stop in (2, 5, 7):  # positions inside steps 1 and 2 (step boundaries are at 4, 8, ...)
        eos_id = reference[stop]
        first = reference.index(eos_id)
        tokens, _ = greedy(model, prompt, N_LAYER - 2, k=3, stop_ids={eos_id})
        assert tokens == reference[: first + 1]
    for max_new in (1, 2, 6):
        tokens, _ = greedy(model, prompt, N_LAYER - 2, k=3, max_new=max_new)
        assert tokens == reference[:max_new]


# --- compiled: one graph, no host sync, no recompiles -----------------------------------------

def test_documented_combinations_compile_on_two_threads_one_graph_each_and_exact(checkpoints, tmp_path):
    """The command lines as a user runs them, compiled, with two threads available and (but for one
    run) no --threads, so that generate.py chooses the thread count itself: auto's five drafting k
    and an autoregressive step, a fixed k, --num_samples, --interactive with a prompt that makes the
    caches grow, --prompts_file with --batch_size (drafting over 200 of the 320 tokens: --draft_vocab),
    --early_exit, a quantized file, benchmark.py and eval.py. None may end with a traceback or a non-zero exit. --compile compiles each step with
    fullgraph=True, so any .item(), .tolist() or branch on a tensor value inside it fails; and a
    step must replay without recompiling: across steps, rows at different positions, refills and
    samples. Greedy outputs equal eager decoding's.
    The runs go in parallel: most of their time is compilation, one core each."""
    from quantize import main as quantize_main
    path, _ = checkpoints("llama2")
    texts = ["def add(a, b):", "class A:", "for i in range(3):"]
    long_text = " ".join(texts * 2)  # longer than texts[1]: the interactive run's caches must grow
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    model = load_model(path)
    encoded = [torch.tensor(tokenizer.encode(t)) for t in texts + [long_text]]
    reference = [greedy(model, p, stop_ids=tokenizer.stop_ids)[0] for p in encoded]
    model.setup_caches(1, len(encoded[0]) + MAX_NEW + 1, 2)  # --early_exit 2: layers [0, 2) and the head alone
    with torch.inference_mode():
        early = generate(model, encoded[0], MAX_NEW, temperature=0, top_k=None, stop_ids=tokenizer.stop_ids, early_exit=True)[0]
    quantize_main(["--checkpoint_path", str(path), "--mode", "int8", "--output", str(tmp_path / "model_int8.pth")])
    shutil.copy(path.parent / "model_config.json", tmp_path)
    shutil.copy(path.parent / "tokenizer.model", tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    write_task(tmp_path, "tiny_gen", [{"prompt": t, "target": t} for t in texts],
               "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
               "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    # One draft layer: the steps' graphs are smallest, and compiling them is most of the test's time.
    common = ["--checkpoint_path", str(path), "--max_new_tokens", str(MAX_NEW), "--temperature", "0", "--compile"]
    scripts = {
        "auto": ("generate.py", *common, "--prompt", texts[0], "--draft_layers", "1", "--num_samples", "2", "--json"),
        "interactive": ("generate.py", *common, "--interactive", "--draft_layers", "1", "--speculate_k", "3", "--json"),
        "batch": ("generate.py", *common, "--draft_layers", "1", "--speculate_k", "3", "--prompts_file", str(prompts),
                  "--batch_size", "2", "--output", str(tmp_path / "out.jsonl"), "--draft_vocab", "200"),
        "early_exit": ("generate.py", *common, "--prompt", texts[0], "--early_exit", "2", "--json"),
        "quantized": ("generate.py", "--checkpoint_path", str(tmp_path / "model_int8.pth"), "--max_new_tokens", "8",
                      "--temperature", "0", "--compile", "--prompt", texts[1], "--draft_layers", "1", "--speculate_k", "3",
                      "--threads", "2"),
        "benchmark": ("benchmark.py", "--checkpoint_path", str(path), "--dataset", f"jsonl:{prompts}", "--compile",
                      "--draft_layers", "1", "--speculate_k", "3", "--max_new_tokens", "8", "--repeats", "1"),
        "eval": ("eval.py", "--checkpoint_path", str(path), "--tasks", "tiny_gen", "--include_path", str(tmp_path),
                 "--compile", "--draft_layers", "1", "--speculate_k", "3", "--output", str(tmp_path / "eval.json")),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCH_LOGS": "recompiles", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    running = {name: subprocess.Popen([sys.executable, str(ROOT / script), *flags], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for name, (script, *flags) in scripts.items()}
    stdin = {"interactive": f"{texts[1]}\n{long_text}\n\n"}
    done = {name: (proc.communicate(stdin.get(name), timeout=1200), proc.returncode) for name, proc in running.items()}
    for name, ((stdout, stderr), returncode) in done.items():
        assert returncode == 0 and "Traceback" not in stderr, (name, stderr[-3000:])
        # auto's k are one function compiled five times, and the interactive run's caches grow: both
        # compile before "compilation (not timed)", never after it
        assert "recompil" not in stderr.rpartition("compilation (not timed)")[2].lower(), (name, stderr[-3000:])
    assert "threads:" in done["auto"][0][1] and "compilation (not timed)" in done["auto"][0][1]
    auto = json.loads(done["auto"][0][0].strip().splitlines()[-1])["samples"]
    assert [s["generated_tokens"] for s in auto] == [reference[0]] * 2
    assert sum(sum(s["k_steps"].values()) for s in auto) > 0
    interactive = json.loads(done["interactive"][0][0].strip().splitlines()[-1])["samples"]
    assert [s["generated_tokens"] for s in interactive] == [reference[1], reference[3]]
    records = sorted((json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()),
                     key=lambda r: r["index"])
    assert [r["generated_tokens"] for r in records] == reference[:3]
    assert json.loads(done["early_exit"][0][0].strip().splitlines()[-1])["samples"][0]["generated_tokens"] == early
    assert json.loads((tmp_path / "eval.json").read_text())["engine"]["generation"]["generated_tokens"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_steps_write_a_rows_cache_with_the_same_bits_whatever_rows_come_with_it(dtype):
    """A late layer's cache entry for a token at one position, from a compiled autoregressive step
    alone, beside another row, and from a verify pass over k + 1 rows: the same bits. Two threads
    and a norm over 2048 columns, where inductor would split a one-row norm's sum between the
    threads (4 of 10 prompts differed in float32); in bfloat16 the verify pass starts from hidden
    states rounded into the exit cache, which inductor's fused kernels would not round. Every layer
    holds more than Linear.FUSED_ONE_ROW_MAX weights: the engine's kernel takes one row and k + 1
    alike (a small float32 layer's one row is inductor's reduction, whose bits differ)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=256, dim=2048, n_layer=2, n_head=8, n_kv_head=4, head_dim=256,
                                  intermediate_size=1024, max_seq_length=64)).eval().to(dtype)
    _, ar = decoding_functions(0, None, compile=True)
    _, spec = decoding_functions(0, None, speculate_k=3, compile=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for _ in range(6):
                prompts = torch.randint(0, 256, (2, 6))
                entries = []
                for steps, k, rows in ((ar, 0, 1), (spec, 3, 1), (ar, 0, 2)):
                    model.setup_caches(rows, 32, 1)
                    first = prefill(model, prompts[:rows], torch.full((rows,), 6), torch.arange(rows), 0, None)
                    steps[k](model, first.view(rows, 1), torch.full((rows,), 6))
                    cache = model.layers[1].attention.kv_cache
                    entries.append(torch.cat([cache.k[0, :, 6], cache.v[0, :, 6]]))
                assert [torch.equal(entries[0], e) for e in entries[1:]] == [True, True]
    finally:
        torch.set_num_threads(threads)


def test_compiled_bfloat16_self_speculation_gives_the_compiled_autoregressive_tokens():
    """A bfloat16 model, compiled: greedy self-speculation gives the autoregressive tokens, prompt
    by prompt and in a batch with refills. Eager rounds every op's result to 16 bits; inductor,
    fusing ops, would keep float32 between them, and a verify pass, whose late layers start from
    hidden states rounded into the exit cache, would then drift from the autoregressive step (2 of
    these 20 prompts within 40 tokens, and 10 of 80 over this seed and three others)."""
    torch.manual_seed(2)
    model = Transformer(ModelArgs(vocab_size=320, dim=64, n_layer=6, n_head=4, n_kv_head=2, head_dim=16,
                                  intermediate_size=160, max_seq_length=128)).eval().to(torch.bfloat16)
    prompts = [torch.randint(3, 300, (4 + 3 * i,)).tolist() for i in range(20)]
    prefill_fn, steps = decoding_functions(0, None, speculate_k=3, compile=True)
    _, ar_steps = decoding_functions(0, None, compile=True)
    runs = {}
    with torch.inference_mode():
        for batch_size in (1, 4):
            model.setup_caches(batch_size, 61 + 40 + 4, 2)  # the longest prompt, its tokens, k + 1
            for name, run_steps in (("ar", ar_steps), ("spec", steps)):
                results = generate_batch(model, prompts, 40, prefill_fn=prefill_fn, steps=run_steps, stop_ids=set(),
                                         batch_size=batch_size)
                runs[name, batch_size] = [r["generated_tokens"] for r in results]
    assert all(len(tokens) == 40 for tokens in runs["ar", 1])
    assert runs["spec", 1] == runs["ar", 1]
    assert runs["spec", 4] == runs["ar", 4] == runs["ar", 1]


# --- --speculate_k auto ---------------------------------------------------------------------------

COSTS = {0: 1.0, 1: 1.4, 2: 1.7, 4: 2.3, 6: 2.9, 8: 3.5}  # seconds of a step at each k (0: autoregressive)


@pytest.mark.parametrize("acceptance, k", [
    (0.0, 0), (0.39, 0),  # k = 1 breaks even at (1 + a) / 1.4 = 1, a = 0.4: below it no k pays
    (0.41, 1), (0.5, 1),  # 1.5 / 1.4 = 1.07 tokens per unit, against 1.75 / 1.7 = 1.03 for k = 2
    (0.9, 6),  # 5.22 / 2.9 = 1.80, against 4.10 / 2.3 = 1.78 (k = 4) and 6.13 / 3.5 = 1.75 (k = 8)
    (1.0, 8),  # 9 / 3.5 = 2.57, against 7 / 2.9 = 2.41
])
def test_policy_picks_the_k_with_the_most_expected_tokens_per_second(acceptance, k):
    """With one acceptance rate a at every draft position, drafts 1..j all pass with chance a^j."""
    assert best_k([acceptance ** j for j in range(9)], COSTS) == k


def test_acceptance_in_runs_favours_longer_steps():
    """Drafts that are right in runs: the first is accepted half the time, every next one 95%.
    One rate for all positions (0.5 at best) would pick k = 1 (1.07 tokens per unit against 1.0
    for AR); the runs make k = 6 worth 3.65 / 2.9 = 1.26 (k = 4: 1.24, k = 8: 1.25)."""
    survival = [1.0] + [0.5 * 0.95 ** (j - 1) for j in range(1, 9)]
    assert best_k([0.5 ** j for j in range(9)], COSTS) == 1
    assert best_k(survival, COSTS) == 6
    policy = AdaptiveK(COSTS)
    for _ in range(30):  # each step: half the rows refuse the first draft, the other half accept all
        policy.observe(8, [0, 8])
    assert policy.survival()[1] == pytest.approx(0.5, abs=0.02) and policy.survival()[8] > 0.4
    assert policy.choose() == 8


def simulate(policy: AdaptiveK, accepted_of, steps: int) -> list[int]:
    """The k of each step when a step with k drafts gets accepted_of(k) of them accepted."""
    chosen = []
    for _ in range(steps):
        k = policy.choose()
        chosen.append(k)
        policy.observe(k, [accepted_of(k)] if k else [])
    return chosen


def test_adaptive_k_climbs_when_drafts_are_right_and_probes_ever_less_often_when_not():
    chosen = simulate(AdaptiveK(COSTS), lambda k: k, 40)
    assert chosen[-30:] == [8] * 30
    chosen = simulate(AdaptiveK(COSTS), lambda k: 0, 200)
    drafting = [i for i, k in enumerate(chosen) if k]  # the first by choice (the prior's), then probes
    assert {chosen[i] for i in drafting[1:]} == {2}  # probes draft two: the fewest that show a run
    gaps = [b - a - 1 for a, b in zip(drafting, drafting[1:])]  # autoregressive steps between them
    assert gaps[:5] == [4, 8, 16, 32, 64] and set(gaps[5:]) == {64}
    # With no evidence and autoregressive decoding the best guess, the very first step probes.
    assert simulate(AdaptiveK({0: 1.0, 1: 3.0, 2: 5.0, 4: 9.0, 6: 13.0, 8: 17.0}), lambda k: 0, 1) == [2]
    # the probe is the second-smallest drafting k, whichever they are (an AR step is not one of them)
    assert simulate(AdaptiveK({0: 1.0, 4: 3.0, 6: 5.0, 8: 7.0}), lambda k: 0, 1) == [6]
    assert simulate(AdaptiveK({0: 1.0, 6: 5.0}), lambda k: 0, 1) == [6]
    # the text turns easy again: the next probe is accepted and drafting takes over
    policy = AdaptiveK(COSTS)
    simulate(policy, lambda k: 0, 30)
    assert simulate(policy, lambda k: k, 60)[-20:] == [8] * 20


def auto_greedy(model, prompt, exit_layer, costs, max_new=60):
    """Greedy generation with the adaptive policy, step costs given rather than measured (timings
    on a shared machine jump; what is tested here is how it follows the model's real acceptance)."""
    model.setup_caches(1, len(prompt) + max_new + max(AUTO_K) + 1, exit_layer)
    with torch.inference_mode():
        result = generate_batch(model, [prompt.tolist()], max_new, prefill_fn=partial(prefill, temperature=0, top_k=None),
                                steps=speculative_steps(AUTO_K, 0, None), stop_ids=set(), policy=AdaptiveK(costs))[0]
    return result["generated_tokens"], result


def test_auto_is_exact_and_follows_the_acceptance(checkpoints):
    """Greedy output with auto equals AR: on a tiny checkpoint (costs measured on this machine),
    on a model whose late layers are silenced (every draft right: the policy climbs to the largest
    k) and on a random model (drafts almost never right: it falls back to autoregressive steps)."""
    model = load_model(checkpoints("llama32")[0])
    prompt = torch.tensor([1, 40, 41, 42, 43])
    reference, _ = greedy(model, prompt, max_new=60)
    assert greedy(model, prompt, 3, "auto", max_new=60)[0] == reference

    silenced = late_layers_silenced(load_model(checkpoints("llama2")[0]), 2)
    reference, _ = greedy(silenced, prompt, max_new=120)
    tokens, stats = auto_greedy(silenced, prompt, 2, COSTS, max_new=120)
    assert tokens == reference and stats["acceptance_rate"] == 1.0
    assert stats["k_steps"][max(AUTO_K)] >= 0.7 * sum(stats["k_steps"].values()), stats["k_steps"]

    random_model = load_model(checkpoints("llama2")[0])  # random weights: layer 1 rarely guesses right
    reference, _ = greedy(random_model, prompt, max_new=60)
    tokens, stats = auto_greedy(random_model, prompt, 1, COSTS)
    assert tokens == reference and stats["acceptance_rate"] < 0.1
    assert stats["k_steps"][0] >= 0.7 * sum(stats["k_steps"].values()) and stats["k_steps"][2] >= 2, stats["k_steps"]


# --- found by mutation testing (setup.cfg) ---------------------------------------------------------

def test_parse_speculate_k_takes_positive_integers_and_auto():
    import argparse
    from self_spec import parse_speculate_k
    assert parse_speculate_k("1") == 1 and parse_speculate_k("12") == 12 and parse_speculate_k("auto") == "auto"
    for text in ("0", "-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"positive integer or auto, got {text!r}"):
            parse_speculate_k(text)


def test_decoding_functions_bind_the_settings_and_compile_what_the_device_needs(monkeypatch):
    """Which functions a run decodes with, with which settings bound and compiled how: torch.compile
    is replaced by a recorder (nothing is compiled)."""
    from types import SimpleNamespace
    from common import decode_one_token
    from self_spec import decoding_functions, speculative_step
    compiled = []

    def fake_compile(fn, **options):
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        wrapper.original, wrapper.options = fn, options
        compiled.append(wrapper)
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    # the inductor flags the compiled steps set, on a stand-in (importing torch._inductor takes seconds)
    inductor = SimpleNamespace(coordinate_descent_tuning=False, emulate_precision_casts=False,
                               cpp=SimpleNamespace(min_chunk_size=512))
    monkeypatch.setitem(vars(torch), "_inductor", SimpleNamespace(config=inductor))  # setattr would import it

    def bound(fn):  # what a partial calls and with which keywords
        return getattr(fn.func, "original", fn.func), fn.keywords

    prefill_fn, steps = decoding_functions(0.7, 5)  # defaults: autoregressive, full model, not compiled
    assert bound(prefill_fn) == (prefill, dict(early_exit=False, temperature=0.7, top_k=5))
    assert {k: bound(s) for k, s in steps.items()} == {0: (decode_one_token, dict(early_exit=False, temperature=0.7, top_k=5))}
    prefill_fn, steps = decoding_functions(0.7, 5, early_exit=True)
    assert bound(prefill_fn)[1]["early_exit"] is True and bound(steps[0])[1]["early_exit"] is True
    _, steps = decoding_functions(0.7, 5, 3)
    assert {k: bound(s) for k, s in steps.items()} == {3: (speculative_step, dict(k=3, temperature=0.7, top_k=5))}
    _, steps = decoding_functions(0, None, "auto")
    assert {k: bound(s) for k, s in steps.items()} == {
        k: (speculative_step, dict(k=k, temperature=0, top_k=None)) if k else (decode_one_token, dict(temperature=0, top_k=None))
        for k in AUTO_K}
    assert compiled == [] and not inductor.coordinate_descent_tuning and not inductor.emulate_precision_casts
    assert inductor.cpp.min_chunk_size == 512

    _, steps = decoding_functions(0.7, 5, "auto", compile=True)  # on the CPU: the default mode, prefill eager
    assert [(c.original, c.options) for c in compiled] == [(decode_one_token, dict(mode="default", fullgraph=True)),
                                                           (speculative_step, dict(mode="default", fullgraph=True))]
    assert steps[0].func is compiled[0] and steps[4].func is compiled[1]
    assert not inductor.coordinate_descent_tuning
    assert inductor.emulate_precision_casts is True and inductor.cpp.min_chunk_size == 16384
    compiled.clear()
    prefill_fn, steps = decoding_functions(0.7, 5, compile=True, device="cuda:1", compile_prefill=True)
    assert [(c.original, c.options) for c in compiled] == [
        (decode_one_token, dict(mode="reduce-overhead", fullgraph=True)),
        (speculative_step, dict(mode="reduce-overhead", fullgraph=True)),
        (prefill, dict(fullgraph=True, dynamic=True))]
    assert prefill_fn.func is compiled[2] and steps[0].func is compiled[0]
    # CUDA too: coordinate-descent tuning would sum a lone row's product in another order than a
    # verify pass's (tests/test_quantize.py checks the bits on a GPU)
    assert not inductor.coordinate_descent_tuning and inductor.emulate_precision_casts is True


def test_measure_step_seconds_is_the_median_of_each_ks_timed_passes(monkeypatch):
    """A fake clock that each step advances by a scripted duration: each k's passes run in a row,
    the first not timed, the others give the median (index repeats // 2 of the sorted times); every
    pass runs in inference mode on (batch, 1) placeholder tokens on the model's device and reads
    back the accepted counts."""
    import self_spec
    clock = [0.0]
    monkeypatch.setattr(self_spec.time, "perf_counter", lambda: clock[0])
    durations = {0: iter([100.0, 5.0, 1.0, 3.0, 2.0]), 2: iter([100.0, 9.0, 7.0, 8.0, 50.0])}
    calls = []

    class Accepted:  # records the read back
        def tolist(self):
            calls.append("tolist")
            return [0]

    def step(k):
        def run(model, token, pos):
            assert torch.is_inference_mode_enabled()
            assert token.shape == (3, 1) and token.dtype == torch.long and token.device.type == "meta"
            assert pos.shape == (3,) and pos.dtype == torch.long and pos.device.type == "meta"
            calls.append(k)
            clock[0] += next(durations[k])
            return None, Accepted()
        return run

    from model import ModelArgs
    with torch.device("meta"):  # the placeholders go where the model is
        model = Transformer(ModelArgs(vocab_size=8, dim=8, n_layer=1, n_head=1, n_kv_head=1, head_dim=8, intermediate_size=8))
    seconds = self_spec.measure_step_seconds(model, {0: step(0), 2: step(2)}, 3, repeats=4)
    assert seconds == {0: 3.0, 2: 9.0}  # sorted: [1, 2, 3, 5] and [7, 8, 9, 50]
    assert calls == [0, "tolist"] * 5 + [2, "tolist"] * 5  # each k's passes in a row
    durations = {0: iter([100.0, 6, 1, 5, 2, 4, 3, 7]), 2: iter([0.0] * 8)}  # the default: 7 timed passes
    assert self_spec.measure_step_seconds(model, {0: step(0), 2: step(2)}, 3) == {0: 4.0, 2: 0.0}


def test_speculative_generate_binds_the_sampling_the_step_and_the_policy(checkpoints, monkeypatch):
    """top_k = 1 samples the argmax at any temperature, so at a temperature that makes every token
    about equally likely the output is the greedy one only if top_k reaches the prefill and every
    step; the step given is the one used, with k bound; a fixed k measures nothing, "auto" measures
    the steps of AUTO_K once at batch size 1 and lets the policy choose (here every draft is right:
    it climbs to the largest k)."""
    import self_spec
    from self_spec import speculative_step
    model = late_layers_silenced(load_model(checkpoints("llama2")[0]), 2)
    prompt = torch.tensor([1, 40, 41, 42])
    reference, _ = greedy(model, prompt, max_new=40)
    measured = []

    def measure(model_, steps, batch_size):
        measured.append((model_, sorted(steps), batch_size))
        return dict(COSTS)

    monkeypatch.setattr(self_spec, "measure_step_seconds", measure)
    ks = []

    def step(*args, **kwargs):
        ks.append(kwargs["k"])
        return speculative_step(*args, **kwargs)

    model.setup_caches(1, len(prompt) + 40 + max(AUTO_K) + 1, 2)
    with torch.inference_mode():
        tokens, stats = speculative_generate(model, prompt, 40, 3, temperature=1e4, top_k=1, stop_ids=set(), step_fn=step)
        assert tokens == reference and set(ks) == {3} and stats["k_steps"] == {3: len(ks)} and measured == []
        assert stats["acceptance_rate"] == 1.0  # the drafts too are sampled with top_k = 1
        tokens, stats = speculative_generate(model, prompt, 40, "auto", temperature=0, top_k=None, stop_ids=set())
    assert tokens == reference and measured == [(model, sorted(AUTO_K), 1)]
    assert stats["acceptance_rate"] == 1.0 and stats["k_steps"][max(AUTO_K)] >= 3, stats


def test_adaptive_k_waits_first_wait_again_once_a_probe_brings_drafting_back():
    """Hard text (probes ever further apart), then easy text (a probe is accepted: drafting takes
    over), then hard again: the first probe comes after first_wait autoregressive steps, not after
    the long wait the earlier failures built up. survival() has one entry per draft position."""
    policy = AdaptiveK(COSTS)
    assert len(policy.survival()) == max(COSTS) + 1
    simulate(policy, lambda k: 0, 60)
    assert policy.wait >= 32
    assert simulate(policy, lambda k: k, 100)[-10:] == [8] * 10
    chosen = simulate(policy, lambda k: 0, 40)
    first_ar = chosen.index(0)
    assert chosen[first_ar: first_ar + 5] == [0] * 4 + [policy.probe] and policy.probe > 0, chosen  # 4 = first_wait
    assert len(policy.survival()) == max(COSTS) + 1


def test_uniform_draws_at_the_ends_of_the_interval(checkpoints, monkeypatch):
    """Greedy rows through the sampling rule (per-row settings: one-hot distributions, rejection
    sampling) with every uniform draw pinned: at 0 a draft the full model gives probability 0 is
    still refused (accept when u q < p, not u q <= p); at 1 (u < 1 is all that accepts a draft with
    p = q) every draft is refused even where p = q exactly (late layers silenced), which leaves no
    residual mass: the token then comes from p itself. Either way the tokens are the
    autoregressive ones."""
    def by_the_rule(model, token, pos, k, temperature, top_k):
        rows = token.shape[0]
        return speculative_step(model, token, pos, k, torch.zeros(rows), torch.zeros(rows, dtype=torch.long),
                                torch.ones(rows))

    def pinned(model, exit_layer):
        model.setup_caches(1, len(prompt) + 20 + 4, exit_layer)
        with torch.inference_mode():
            return speculative_generate(model, prompt, 20, 3, temperature=0, top_k=None, stop_ids=frozenset(),
                                        step_fn=by_the_rule)

    prompt = torch.tensor([1, 40, 41, 42])
    model = load_model(checkpoints("llama2")[0])
    reference, _ = greedy(model, prompt, max_new=20)
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *shape, device=None: torch.zeros(*shape, device=device))
    tokens, stats = pinned(model, 2)
    assert tokens == reference and stats["acceptance_rate"] < 0.9
    silenced = late_layers_silenced(model, 2)
    reference, _ = greedy(silenced, prompt, max_new=20)
    monkeypatch.setattr(torch, "rand", lambda *shape, device=None: torch.ones(*shape, device=device))
    tokens, stats = pinned(silenced, 2)
    assert tokens == reference and stats["acceptance_rate"] == 0 and len(set(tokens)) > 3
    monkeypatch.setattr(torch, "rand", rand)


def test_warm_up_runs_the_prefill_and_every_step_once_on_the_device():
    """Before anything is timed, warm_up runs (so compiles) the prefill on a two-token placeholder
    and each step once on batch-size rows at position 0, all in inference mode and on the model's
    device (meta standing in for a GPU); it returns the seconds that took."""
    import time
    for device in ("cpu", "meta"):
        model, calls = stand_in_model(16, device), []

        def record(name, model_, *tensors):
            assert model_ is model and torch.is_inference_mode_enabled()
            calls.append((name, [(t.device.type, t.dtype, tuple(t.shape), t.tolist() if device == "cpu" else None)
                                 for t in tensors]))

        start = time.perf_counter()
        seconds = warm_up(model, partial(record, "prefill"), {0: partial(record, 0), 3: partial(record, 3)}, batch_size=4)
        assert 0 <= seconds <= time.perf_counter() - start
        values = (lambda v: v) if device == "cpu" else (lambda v: None)
        step = [(device, torch.long, (4, 1), values([[0]] * 4)), (device, torch.long, (4,), values([0] * 4))]
        assert calls == [("prefill", [(device, torch.long, (1, 2), values([[0, 0]])), (device, torch.long, (1,), values([2])),
                                      (device, torch.long, (1,), values([0]))]),
                         (0, step), (3, step)], device


def test_warm_up_lets_dynamo_compile_as_many_graphs_as_it_asks_for(monkeypatch):
    """Each warm_up compiles one more graph of every step (a new batch size, cache length or sampling
    setting): auto's six steps at a second cache length are twelve graphs, past dynamo's default
    limit of 8, which under fullgraph=True fails. The limit follows what was asked for, no further."""
    import self_spec
    monkeypatch.setattr(self_spec, "_warmed_graphs", 0)
    model, steps = stand_in_model(16), {k: lambda model, token, pos: None for k in AUTO_K}
    with torch._dynamo.config.patch(recompile_limit=8):  # restored afterwards (monkeypatch would delete it)
        warm_up(model, lambda *args: None, steps, batch_size=1)
        assert torch._dynamo.config.recompile_limit == 8
        warm_up(model, lambda *args: None, steps, batch_size=2)
        assert torch._dynamo.config.recompile_limit == 2 * len(AUTO_K) == 12


def test_per_row_k_gives_seeded_rows_their_own_choice_and_the_others_one():
    """PerRowK (a server's auto): an `own` row's limit is what an AdaptiveK hearing only that row
    would choose at the full batch's costs; the other rows share one AdaptiveK, hearing all of
    them, at the costs of the rows the step runs on; the step's k is the largest. Counts reach the
    rows they belong to, in row order, and a row that ended in the step is left out."""
    from self_spec import PerRowK
    full = {0: 1.0, 1: 1.1, 2: 1.2, 4: 1.4, 6: 1.6, 8: 1.8}
    one_row = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 6: 1.3, 8: 1.4}  # drafting is cheaper on one row
    limit = torch.zeros(5, dtype=torch.long)
    policy = PerRowK({1: one_row, 8: full}, limit, step_rows=lambda: 1)
    own, shared = {1: AdaptiveK(full), 3: AdaptiveK(full)}, AdaptiveK(one_row)
    policy.start(3, own=True)
    policy.start(1, own=True)
    policy.start(2, own=False)
    policy.start(4, own=False)
    for _ in range(12):  # row 1's drafts are always right, row 3's never; rows 2 and 4: half of them
        k = policy.choose()
        expected = {row: p.choose() for row, p in own.items()}
        shared_k = shared.choose()
        assert limit.tolist() == [0, expected[1], shared_k, expected[3], shared_k]
        assert k == max(*expected.values(), shared_k)
        counts = [expected[1], shared_k // 2, 0, shared_k - shared_k // 2]
        policy.observe(k, counts)
        own[1].observe(expected[1], [counts[0]])
        own[3].observe(expected[3], [0])
        shared.observe(shared_k, [counts[1], counts[3]])
    assert limit[1] >= 4 and limit[3] <= 1  # they went their own ways
    k = policy.choose()
    policy.end(1)  # row 1 ends inside this step: its count goes nowhere
    policy.observe(k, [0, 0, 0, 0])
    expected_3, shared_k = own[3].choose(), shared.choose()
    own[3].observe(expected_3, [0])
    shared.observe(shared_k, [0, 0])
    assert policy.choose() == max(own[3].choose(), shared.choose()) and limit[1] == 0
