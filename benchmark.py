"""Benchmarks the engine against itself and against Hugging Face transformers, in one process.

    python benchmark.py                                  # ~100M random Llama: issue 2 + issue 3 tables
    python benchmark.py --compile --json out.json        # ... with compiled decode / compiled step
    python benchmark.py --late_scales 1,0.3,0.1,0 --draft_layers 3 --speculate_k 4
    python benchmark.py --sweep --plot sweep.png         # + exit layer x k sweep, plotted
    python benchmark.py --late_scales "" --no_hf --sweep # the sweep alone
    python benchmark.py --checkpoint_path checkpoints/demo/model.pth --prompt "Once upon" --sweep

Without --checkpoint_path it builds a Llama-shaped Hugging Face `LlamaForCausalLM` with random
weights, saves it and converts it with convert_hf_checkpoint.convert, so the engine and
transformers run the very same weights. Random weights give drafts that are almost never right,
so each `--late_scales` value s makes a synthetic LayerSkip-like model: the attention output (wo)
and MLP output (w2) projections of layers [E, L) are multiplied by s in both engines, so the late
layers write little into the residual stream and the early exit agrees with the full model more
often (s = 0: always; s = 1: the random model). s sets the acceptance rate.

Every figure is a whole generate() call: prefill of a --prompt_length prompt plus --max_new_tokens
greedy tokens (EOS ignored), tokens/s = new tokens / wall seconds, median of --repeats runs taken
in interleaved rounds after one untimed warm-up run of each case (which compiles, with --compile).
Ratios taken in one run are what to read on a shared machine; the absolute numbers move with load.
"""
import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from convert_hf_checkpoint import convert
from common import DTYPES, check_exit_layer, decode_one_token, fail, generate, weight_bytes
from model import Transformer, load_model
from self_spec import speculative_generate, speculative_step

ROOT = Path(__file__).resolve().parent


# --- the models ------------------------------------------------------------------------------

def build_hf_model(vocab_size: int, dim: int, n_layer: int, n_head: int, n_kv_head: int,
                   intermediate_size: int, context: int, seed: int):
    """A Llama-shaped LlamaForCausalLM with transformers' own random init (normal, std 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=n_layer,
                         num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                         intermediate_size=intermediate_size, max_position_embeddings=context,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens: EOS must not stop it
    hf.generation_config.pad_token_id = 0
    return hf


def write_byte_tokenizer(path: Path) -> None:
    # convert() insists on a tokenizer.model; the benchmark feeds token ids and never decodes, so
    # a tiktoken-format file of the 256 single bytes is enough.
    import base64
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def hf_to_engine(hf, folder: Path, dtype: torch.dtype) -> Transformer:
    """Saves the HF model, converts it with the project's converter and loads it with load_model."""
    hf.save_pretrained(folder)
    write_byte_tokenizer(folder / "tokenizer.model")
    convert(folder)
    return load_model(folder / "model.pth", "cpu", dtype)


def late_projections(model: Transformer, hf) -> list[tuple[Tensor, Optional[Tensor]]]:
    """Per layer: (engine wo, HF o_proj) and (engine w2, HF down_proj) weight pairs."""
    pairs = []
    for i, layer in enumerate(model.layers):
        hf_layer = hf.model.layers[i] if hf is not None else None
        pairs.append((layer.attention.wo.weight, hf_layer.self_attn.o_proj.weight if hf_layer else None))
        pairs.append((layer.feed_forward.w2.weight, hf_layer.mlp.down_proj.weight if hf_layer else None))
    return pairs


def set_late_scale(pairs: list, originals: list[Tensor], exit_layer: int, scale: float) -> None:
    """Synthetic LayerSkip-like model: output projections of layers [E, L) times `scale`, the rest
    restored. In place (copy_), so compiled graphs see the same tensors and do not recompile."""
    with torch.no_grad():
        for i, ((ours, theirs), original) in enumerate(zip(pairs, originals)):
            s = scale if i // 2 >= exit_layer else 1.0
            ours.copy_(original * s)
            if theirs is not None:
                theirs.copy_((original * s).to(theirs.dtype))


# --- timing one case -------------------------------------------------------------------------

def engine_ar(model: Transformer, prompt: Tensor, max_new: int, decode_fn: Callable,
              early_exit: bool = False) -> Callable[[], tuple[list[int], dict]]:
    return lambda: generate(model, prompt, max_new, temperature=0, top_k=None, eos_id=-1,
                            decode_fn=decode_fn, early_exit=early_exit)


def engine_spec(model: Transformer, prompt: Tensor, max_new: int, k: int,
                step_fn: Callable) -> Callable[[], tuple[list[int], dict]]:
    return lambda: speculative_generate(model, prompt, max_new, k, temperature=0, top_k=None,
                                        eos_id=-1, step_fn=step_fn)


def hf_case(hf, prompt: Tensor, max_new: int, early_exit: Optional[int] = None,
            k: int = 0) -> Callable[[], tuple[list[int], dict]]:
    """transformers' generate(do_sample=False), or with assistant_early_exit=E: the model's first
    E layers draft k tokens per step (constant k, no confidence cut-off: the engine's policy)."""
    # The drafting policy is read from the assistant's own generation_config (here the model's),
    # not from generate()'s arguments: its defaults (20 drafts, stop below 0.4 confidence) would
    # silently apply. So set it there, for the duration of the call.
    policy = dict(num_assistant_tokens=k, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    extra = {} if early_exit is None else {"assistant_early_exit": early_exit}

    def run():
        # Verify passes reach the last layer, drafts stop at E: count last-layer calls = steps.
        calls = [0]
        hook = hf.model.layers[-1].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        saved = {key: getattr(hf.generation_config, key) for key in policy}
        if early_exit is not None:
            for key, value in policy.items():
                setattr(hf.generation_config, key, value)
        try:
            out = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]),
                              max_new_tokens=max_new, do_sample=False, **extra)
        finally:
            hook.remove()
            for key, value in saved.items():
                setattr(hf.generation_config, key, value)
        tokens = out[0, prompt.numel():].tolist()
        stats = {"acceptance_rate": None, "tokens_per_step": None}
        if early_exit is not None and calls[0]:
            # No separate prefill here: the first verify pass takes the prompt with the first drafts,
            # and every pass yields accepted drafts + 1 token. Drafted: k per step (fewer only where
            # transformers caps the last step at max_new_tokens), so this is a close lower bound.
            steps = calls[0]
            stats["tokens_per_step"] = len(tokens) / steps
            stats["acceptance_rate"] = (len(tokens) - steps) / (steps * k)
        return tokens, stats
    return run


def time_cases(cases: dict[str, Callable], repeats: int) -> dict[str, dict]:
    """One untimed warm-up run per case (compiles, pages weights in), then `repeats` interleaved
    rounds so that drift in machine load hits every case alike. Median seconds per case."""
    results = {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens, stats = fn()
        results[name] = {"tokens": tokens, **stats, "warmup_s": time.perf_counter() - t0, "times": []}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens, _ = fn()
            results[name]["times"].append(time.perf_counter() - t0)
            assert tokens == results[name]["tokens"], f"{name}: greedy output changed between runs"
    for name, r in results.items():
        r["seconds"] = statistics.median(r["times"])
        r["tokens_per_sec"] = len(r["tokens"]) / r["seconds"]
        print(f"#   {name}: {r['tokens_per_sec']:.1f} tokens/s (warm-up {r['warmup_s']:.1f} s)", file=sys.stderr)
    return results


# --- the cost model --------------------------------------------------------------------------

def ideal_speedup(n_layer: int, exit_layer: int, k: int, acceptance: float) -> float:
    """Issue 3's simple model, in units of one full-model token: a draft costs E/L, the verify
    pass of k + 1 tokens in layers [E, L) costs (L - E)/L (as much as one token would), and a step
    yields 1 + k * acceptance tokens (the mean of accepted drafts + 1)."""
    step_cost = k * exit_layer / n_layer + (n_layer - exit_layer) / n_layer
    return (1 + k * acceptance) / step_cost


def ideal_speedup_bytes(model: Transformer, exit_layer: int, k: int, acceptance: float) -> float:
    """The same idea counted in weight bytes read, as batch-1 decoding is bound by them: a step
    runs k + 1 early passes (the last draft needs its KV and exit state too), k + 1 head reads
    (k drafts + one batched verify) and one late pass; a full token is every layer + the head."""
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    layers = [nbytes(layer) for layer in model.layers]
    head = nbytes(model.norm) + nbytes(model.output)
    early, late = sum(layers[:exit_layer]), sum(layers[exit_layer:])
    step_bytes = (k + 1) * (early + head) + late
    return (1 + k * acceptance) * (early + late + head) / step_bytes


# --- where the time goes ------------------------------------------------------------------------

def median_ms(fn: Callable, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(nbytes: int = 2 ** 28, reps: int = 5) -> float:
    """The device's copy bandwidth, bytes read + written per second (best of reps), the yardstick
    gpt-fast holds the weights' GB/s against."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / (min(median_ms(lambda: dst.copy_(src), 1) for _ in range(reps)) / 1e3) / 1e9


@torch.inference_mode()
def profile_step(model: Transformer, prompt: Tensor, exit_layer: int, k: int, reps: int = 10) -> dict:
    """Times the pieces of one self-speculative step (eager) against one full autoregressive token:
    the early pass (layers [0, E)), the shared head, the late pass on 1 and on k + 1 tokens, and the
    whole step. Shows whether the cost model's assumptions hold on this device."""
    p = prompt.numel()
    model.setup_caches(1, p + k + 2, exit_layer)
    model(prompt.view(1, -1), torch.arange(p)[None])
    x, pos = prompt[-1:].view(1, 1), torch.tensor([p])
    positions = pos[:, None] + torch.arange(k + 1)
    h1 = model.early(x, pos[:, None])
    hk = model.exit_cache[:, positions[0]]
    ms = {"full token (AR decode step)": median_ms(lambda: decode_one_token(model, x, pos, 0, None), reps),
          "early pass, 1 token": median_ms(lambda: model.early(x, pos[:, None]), reps),
          "head (norm + LM head), 1 token": median_ms(lambda: model.head(h1), reps),
          "late pass, 1 token": median_ms(lambda: model.late(h1, pos[:, None]), reps),
          f"late pass, {k + 1} tokens": median_ms(lambda: model.late(hk, positions), reps),
          f"head, {k + 1} tokens": median_ms(lambda: model.head(hk), reps),
          f"whole step (k={k})": median_ms(lambda: speculative_step(model, x, pos, k, 0, None), reps)}
    ms[f"sum of parts: {k + 1} early + {k} heads + late and head on {k + 1}"] = (
        (k + 1) * ms["early pass, 1 token"] + k * ms["head (norm + LM head), 1 token"]
        + ms[f"late pass, {k + 1} tokens"] + ms[f"head, {k + 1} tokens"])
    return ms


# --- memory ----------------------------------------------------------------------------------

def cache_bytes(model: Transformer) -> dict[str, int]:
    kv = sum(layer.attention.kv_cache.k.nbytes + layer.attention.kv_cache.v.nbytes for layer in model.layers)
    return {"kv_cache": kv, "exit_cache": model.exit_cache.nbytes}


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_delta(setup: Callable[[], None], run: Callable) -> Optional[int]:
    """Peak resident memory during setup + run, above the resident memory before it (Linux).

    Freed memory is handed back first (malloc_trim) and the kernel's high-water mark is reset
    (clear_refs 5), so the delta is what the caches and the run's activations add."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = rss_bytes("VmRSS")
    setup()
    with torch.inference_mode():
        run()
    return rss_bytes("VmHWM") - before


def measure_memory(model: Transformer, prompt: Tensor, max_new: int, exit_layer: int, k: int) -> dict:
    """Autoregressive vs self-speculative, each with the cache it needs: prompt + max_new (+1) for
    the former, + k + 1 slack for the latter. (setup_caches always allocates the exit cache; an
    engine without self-speculation would not, so the AR figure below leaves it out.)"""
    length = prompt.numel() + max_new
    out = {}
    for name, cache_length, e, run in (
            ("autoregressive", length + 1, None, engine_ar(model, prompt, max_new, decode_one_token)),
            ("self_speculative", length + k + 1, exit_layer, engine_spec(model, prompt, max_new, k, speculative_step))):
        model.exit_cache = None
        for layer in model.layers:
            layer.attention.kv_cache = None
        delta = peak_rss_delta(lambda: model.setup_caches(1, cache_length, e), run)
        caches = cache_bytes(model)
        if name == "autoregressive":
            caches["exit_cache"] = 0
        out[name] = {**caches, "cache_length": cache_length, "peak_rss_delta": delta}
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in out.values():
        r["weights_and_caches"] = w + r["kv_cache"] + r["exit_cache"]
    ar, spec = out["autoregressive"], out["self_speculative"]
    out["ratio_weights_and_caches"] = spec["weights_and_caches"] / ar["weights_and_caches"]
    if ar["peak_rss_delta"] is not None:
        out["ratio_weights_and_peak_rss_delta"] = (w + spec["peak_rss_delta"]) / (w + ar["peak_rss_delta"])
    return out


# --- one comparison group --------------------------------------------------------------------

def compiled_fns(compile_: bool) -> dict[str, Callable]:
    fns = {"eager": (decode_one_token, speculative_step)}
    if compile_:  # CPU: mode "default" (reduce-overhead is CUDA graphs)
        fns["compiled"] = (torch.compile(decode_one_token, fullgraph=True),
                           torch.compile(speculative_step, fullgraph=True))
    return fns


def engine_rows(model: Transformer, prompt: Tensor, max_new: int, exit_layer: int, ks: list[int],
                fns: dict, repeats: int, early_exit_row: bool = True, hf=None, hf_assist: bool = True,
                label: Optional[dict] = None) -> list[dict]:
    """Times AR, self-speculation at each k and early-exit-only for every mode in fns (+ HF), all
    with the same weights and cache; returns one row per case with speedups and cost-model ideals."""
    model.setup_caches(1, prompt.numel() + max_new + max(ks) + 1, exit_layer)
    n_layer = model.args.n_layer
    cases, meta = {}, {}
    for mode, (decode_fn, step_fn) in fns.items():
        cases[f"ar/{mode}"] = engine_ar(model, prompt, max_new, decode_fn)
        meta[f"ar/{mode}"] = dict(engine="this", mode=mode, method="autoregressive")
        for k in ks:
            cases[f"spec{k}/{mode}"] = engine_spec(model, prompt, max_new, k, step_fn)
            meta[f"spec{k}/{mode}"] = dict(engine="this", mode=mode, method="self-speculative", k=k)
        if early_exit_row:
            cases[f"ee/{mode}"] = engine_ar(model, prompt, max_new, decode_fn, early_exit=True)
            meta[f"ee/{mode}"] = dict(engine="this", mode=mode, method="early-exit only (lossy)")
    if hf is not None:
        cases["hf"] = hf_case(hf, prompt, max_new)
        meta["hf"] = dict(engine="transformers", mode="eager", method="autoregressive")
        if hf_assist:
            for k in ks:
                cases[f"hf_ee{k}"] = hf_case(hf, prompt, max_new, exit_layer, k)
                meta[f"hf_ee{k}"] = dict(engine="transformers", mode="eager",
                                         method="assistant_early_exit", k=k)
    results = time_cases(cases, repeats)
    reference = results["ar/eager"]["tokens"]
    bytes_per_token = weight_bytes(model)
    rows = []
    for name, r in results.items():
        m = meta[name]
        base = results.get(f"ar/{m['mode']}", results["ar/eager"]) if m["engine"] == "this" else results["hf"]
        row = {**(label or {}), **m, "draft_layers": exit_layer if m["method"] != "autoregressive" else None,
               "tokens_per_sec": r["tokens_per_sec"], "seconds": r["seconds"], "warmup_s": r["warmup_s"],
               "new_tokens": len(r["tokens"]), "tokens_equal_ar": r["tokens"] == reference,
               "acceptance_rate": r["acceptance_rate"], "tokens_per_step": r["tokens_per_step"],
               "speedup": r["tokens_per_sec"] / base["tokens_per_sec"]}
        if "hf" in results:
            row["tokens_equal_transformers"] = r["tokens"] == results["hf"]["tokens"]
        if m["method"] == "autoregressive":
            row["gb_per_sec"] = bytes_per_token * r["tokens_per_sec"] / 1e9
        if m["method"] == "early-exit only (lossy)":
            row["agreement_with_ar"] = sum(a == b for a, b in zip(r["tokens"], reference)) / len(reference)
        if m["method"] == "self-speculative" and r["acceptance_rate"] is not None:
            row["ideal"] = ideal_speedup(n_layer, exit_layer, m["k"], r["acceptance_rate"])
            row["efficiency"] = row["speedup"] / row["ideal"]
            row["ideal_bytes"] = ideal_speedup_bytes(model, exit_layer, m["k"], r["acceptance_rate"])
            row["efficiency_bytes"] = row["speedup"] / row["ideal_bytes"]
            hf_name = f"hf_ee{m['k']}"
            if hf_name in results:
                row["vs_hf_assistant_early_exit"] = r["tokens_per_sec"] / results[hf_name]["tokens_per_sec"]
        rows.append(row)
    return rows


# --- reporting -------------------------------------------------------------------------------

def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key), spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


ENGINE_COLUMNS = [("engine", "engine", ""), ("mode", "mode", ""), ("method", "method", ""),
                  ("E", "draft_layers", "d"), ("k", "k", "d"), ("tokens/s", "tokens_per_sec", ".1f"),
                  ("speedup vs AR", "speedup", ".2f"), ("acceptance", "acceptance_rate", ".1%"),
                  ("tokens/step", "tokens_per_step", ".2f"), ("ideal (issue 3)", "ideal", ".2f"),
                  ("efficiency", "efficiency", ".0%"), ("ideal (bytes)", "ideal_bytes", ".2f"),
                  ("eff. (bytes)", "efficiency_bytes", ".0%"), ("vs HF early exit", "vs_hf_assistant_early_exit", ".2f"),
                  ("tokens = AR", "tokens_equal_ar", "")]


def issue2_table(rows: list[dict]) -> str:
    ar = [r for r in rows if r["method"] == "autoregressive"]
    hf = next((r for r in ar if r["engine"] == "transformers"), None)
    for r in ar:
        r["vs_transformers"] = r["tokens_per_sec"] / hf["tokens_per_sec"] if hf else None
    return markdown_table(ar, [("engine", "engine", ""), ("mode", "mode", ""), ("tokens/s", "tokens_per_sec", ".1f"),
                               ("GB/s of weights", "gb_per_sec", ".2f"), ("of copy bandwidth", "bandwidth_fraction", ".0%"),
                               ("vs transformers", "vs_transformers", ".2f"),
                               ("greedy tokens = transformers", "tokens_equal_transformers", ""),
                               ("warm-up s", "warmup_s", ".1f")])


def targets(rows: list[dict], n_layer: int) -> list[str]:
    """Issue 3's targets, judged on the self-speculative rows (and 2x over transformers' early exit)."""
    spec = [r for r in rows if r["method"] == "self-speculative" and r["engine"] == "this"]
    at_quarter = [r for r in spec if r["draft_layers"] == n_layer // 4 and r["acceptance_rate"] >= 0.7]
    lines = []
    if at_quarter:
        worst = min(at_quarter, key=lambda r: r["speedup"])
        ok = worst["speedup"] > 1
        lines.append(f"- faster than AR at acceptance >= 70%, E = L/4 = {n_layer // 4}: {'MET' if ok else 'MISSED'} "
                     f"(slowest such case {worst['speedup']:.2f}x at acceptance {worst['acceptance_rate']:.0%}, "
                     f"k={worst['k']}, {worst['mode']})")
    else:
        lines.append(f"- faster than AR at acceptance >= 70%, E = L/4: no case measured at E = {n_layer // 4} with acceptance >= 70%")
    judged = [r for r in spec if r["acceptance_rate"] >= 0.5]
    if judged:
        worst = min(judged, key=lambda r: r["efficiency"])
        best = max(judged, key=lambda r: r["efficiency"])
        ok = worst["efficiency"] >= 0.85
        lines.append(f"- efficiency >= 85% of the issue's ideal (cases with acceptance >= 50%): {'MET' if ok else 'MISSED'} "
                     f"(range {worst['efficiency']:.0%} .. {best['efficiency']:.0%}; against the bytes model "
                     f"{min(r['efficiency_bytes'] for r in judged):.0%} .. {max(r['efficiency_bytes'] for r in judged):.0%})")
    vs_hf = [r for r in spec if r.get("vs_hf_assistant_early_exit") is not None]
    if vs_hf:
        worst = min(vs_hf, key=lambda r: r["vs_hf_assistant_early_exit"])
        ok = worst["vs_hf_assistant_early_exit"] >= 2
        lines.append(f"- >= 2x transformers' assistant_early_exit: {'MET' if ok else 'MISSED'} "
                     f"(lowest {worst['vs_hf_assistant_early_exit']:.2f}x, {worst['mode']}, "
                     f"acceptance {worst['acceptance_rate']:.0%})")
    return lines


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (e, mode) in sorted({(r["draft_layers"], r["mode"]) for r in rows}):
        sel = sorted((r for r in rows if r["draft_layers"] == e and r["mode"] == mode), key=lambda r: r["k"])
        ks = [r["k"] for r in sel]
        label = f"E={e}" + (f" ({mode})" if len({r['mode'] for r in rows}) > 1 else "")
        ax1.plot(ks, [r["speedup"] for r in sel], "o-", label=label)
        ax2.plot(ks, [r["acceptance_rate"] for r in sel], "o-", label=label)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r["k"] for r in rows}))
    ax1.set(xlabel="k (tokens drafted per step)", ylabel="speedup vs autoregressive", title=title)
    ax2.set(xlabel="k (tokens drafted per step)", ylabel="acceptance rate", ylim=(0, 1.02), title="acceptance")
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict:
    def sh(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    cpu = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name")),
               platform.processor())
    commit = sh("git", "rev-parse", "--short", "HEAD")
    dirty = bool(sh("git", "status", "--porcelain", "--untracked-files=no"))
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit + ("+uncommitted changes" if dirty else ""), "python": platform.python_version()}


# --- the command line ------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail  # one line on stderr for a bad flag too
    p.add_argument("--checkpoint_path", type=Path, help="a converted model.pth: engine-only comparison")
    p.add_argument("--prompt", default="Once upon a time", help="with --checkpoint_path")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_kv_head", type=int, help="default: --n_head")
    p.add_argument("--intermediate_size", type=int, default=2048)
    p.add_argument("--prompt_length", type=int, default=16, help="random prompt, without --checkpoint_path")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--draft_layers", type=int, help="E; default n_layer // 4")
    p.add_argument("--speculate_k", type=int_list, default=[4], help="k, or a comma list")
    p.add_argument("--late_scales", type=float_list, default=[1.0, 0.3, 0.2, 0.1, 0.0],
                   help="synthetic model: scale of layers [E, L) output projections; comma list (empty: none)")
    p.add_argument("--sweep", action="store_true", help="also an exit layer x k sweep")
    p.add_argument("--sweep_layers", type=int_list, help="default: 1, L/4, L/2, 3L/4")
    p.add_argument("--sweep_k", type=int_list, default=[1, 2, 4, 6, 8])
    p.add_argument("--sweep_late_scale", type=float, default=0.1, help="synthetic model of the sweep")
    p.add_argument("--plot", type=Path, default=Path("benchmark_sweep.png"), help="PNG of the sweep")
    p.add_argument("--compile", action="store_true", help="also time the compiled decode / step")
    p.add_argument("--no_hf", action="store_true", help="skip transformers")
    p.add_argument("--no_memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--profile", action="store_true", help="time the pieces of one step (eager)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every measurement to this file")
    args = p.parse_args(argv)
    for name in ("vocab_size", "dim", "n_layer", "n_head", "intermediate_size", "prompt_length",
                 "max_new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    if any(k < 1 for k in args.speculate_k + args.sweep_k) or not args.speculate_k or not args.sweep_k:
        fail("--speculate_k and --sweep_k need values of at least 1")
    if any(s < 0 for s in args.late_scales + [args.sweep_late_scale]):
        fail("--late_scales must not be negative")
    if args.dim % args.n_head:
        fail(f"--dim {args.dim} is not a multiple of --n_head {args.n_head}")
    args.n_kv_head = args.n_kv_head or args.n_head
    if args.n_head % args.n_kv_head:
        fail(f"--n_head {args.n_head} is not a multiple of --n_kv_head {args.n_kv_head}")
    return args


def check_exit_layers(layers: list[int], n_layer: int) -> None:
    for e in layers:
        check_exit_layer("exit layer", e, n_layer)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 256  # every (E, k, cache length) is its own graph
    dtype = DTYPES[args.dtype]
    if args.checkpoint_path is None:  # the model's depth is known: check before building it
        check_exit_layers([1 if args.draft_layers is None else args.draft_layers] + (args.sweep_layers or []), args.n_layer)
    env = environment()
    fns = compiled_fns(args.compile)
    out = {"environment": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report = []
    tmp = tempfile.TemporaryDirectory(prefix="benchmark-")
    try:
        if args.checkpoint_path is not None:
            from tokenizer import load_tokenizer
            try:
                model = load_model(args.checkpoint_path, "cpu", dtype)
                tokenizer = load_tokenizer(args.checkpoint_path.parent / "tokenizer.model")
            except (ValueError, OSError) as e:
                fail(str(e))
            prompt = torch.tensor(tokenizer.encode(args.prompt, bos=True))
            if prompt.numel() + args.max_new_tokens >= model.args.max_seq_length:
                fail(f"prompt + --max_new_tokens exceed the model's context of {model.args.max_seq_length}")
            hf, pairs, originals = None, None, None
            desc = f"checkpoint {args.checkpoint_path}, prompt {args.prompt!r} ({prompt.numel()} tokens)"
        else:
            context = args.prompt_length + args.max_new_tokens + max(args.speculate_k + args.sweep_k) + 2
            print("# building the random model and converting it", file=sys.stderr)
            hf = build_hf_model(args.vocab_size, args.dim, args.n_layer, args.n_head, args.n_kv_head,
                                args.intermediate_size, max(context, 2048), args.seed).to(dtype)
            model = hf_to_engine(hf, Path(tmp.name), dtype)
            if args.no_hf:
                hf = None
            pairs = late_projections(model, hf)
            originals = [ours.detach().clone() for ours, _ in pairs]
            torch.manual_seed(args.seed)
            prompt = torch.randint(3, args.vocab_size, (args.prompt_length,))
            params = sum(p.numel() for p in model.parameters())
            desc = (f"random Llama, {params / 1e6:.0f}M parameters (dim {args.dim}, {args.n_layer} layers, "
                    f"{args.n_head} heads, intermediate {args.intermediate_size}, vocab {args.vocab_size}), "
                    f"{args.dtype}, random prompt of {args.prompt_length} tokens")
        n_layer = model.args.n_layer
        exit_layer = args.draft_layers if args.draft_layers is not None else max(1, n_layer // 4)
        check_exit_layers([exit_layer] + (args.sweep_layers or []), n_layer)
        print(f"# benchmark: {env['cpu']}, torch threads: {env['threads']}, torch {env['torch']}, commit {env['commit']}",
              file=sys.stderr)
        out["copy_bandwidth_gbs"] = bandwidth = copy_bandwidth_gbs()
        out["model"] = desc
        header = (f"{desc}; {args.max_new_tokens} new tokens, greedy; tokens/s = new tokens / wall time of the whole "
                  f"generate() call (prefill included), median of {args.repeats}; torch threads: {env['threads']}")
        report.append(f"**Setup:** {header}\n")

        # --- issues 2 and 3: AR, self-speculation, early exit (and transformers) per late scale ---
        scales = args.late_scales if pairs is not None else [None]
        rows = []
        for s in scales:
            if s is not None:
                set_late_scale(pairs, originals, exit_layer, s)
                print(f"# late_scale {s}", file=sys.stderr)
            rows += engine_rows(model, prompt, args.max_new_tokens, exit_layer, args.speculate_k, fns, args.repeats,
                                hf=hf, label={"late_scale": s})
        out["rows"] = rows
        for r in rows:
            if "gb_per_sec" in r:
                r["bandwidth_fraction"] = r["gb_per_sec"] / bandwidth
        if hf is not None and 1.0 in scales:
            report.append("### Autoregressive decode vs transformers (issue 2; random weights, late_scale 1)\n")
            report.append(f"Copy bandwidth measured in the same run: {bandwidth:.1f} GB/s (read + write).\n")
            report.append(issue2_table([r for r in rows if r["late_scale"] == 1.0]) + "\n")
        if rows:  # --late_scales "" skips this part (e.g. for a sweep alone)
            report.append(f"### Self-speculation (issue 3): E = {exit_layer} of {n_layer} layers\n")
            cols = ([("late_scale", "late_scale", ".2g")] if pairs is not None else []) + ENGINE_COLUMNS
            report.append(markdown_table(rows, cols) + "\n")
            report.append("Targets (issue 3):\n" + "\n".join(targets(rows, n_layer)) + "\n")

        if args.profile:
            k = max(args.speculate_k)
            ms = profile_step(model, prompt, exit_layer, k)
            out["profile_ms"] = ms
            full = ms["full token (AR decode step)"]
            report.append(f"### Where a step's time goes (eager, E = {exit_layer}, k = {k}, median of 10)\n")
            report.append("| piece | ms | in full tokens |\n|---|---|---|\n" + "\n".join(
                f"| {name} | {v:.2f} | {v / full:.2f} |" for name, v in ms.items()) + "\n")

        # --- memory: self-speculation vs autoregressive ---
        if not args.no_memory:
            if pairs is not None:
                set_late_scale(pairs, originals, exit_layer, 1.0)
            k = max(args.speculate_k)
            mem = measure_memory(model, prompt, args.max_new_tokens, exit_layer, k)
            out["memory"] = mem
            mib = 2 ** 20
            lines = ["| | cache length | KV cache MiB | exit cache MiB | weights + caches MiB | "
                     "peak RSS increase during run MiB |", "|---|---|---|---|---|---|"]
            for name, label in (("autoregressive", "autoregressive"),
                                ("self_speculative", f"self-speculative (E={exit_layer}, k={k})")):
                m = mem[name]
                rss = m["peak_rss_delta"] / mib if m["peak_rss_delta"] is not None else None
                lines.append(f"| {label} | {m['cache_length']} | {m['kv_cache'] / mib:.2f} | {m['exit_cache'] / mib:.2f} | "
                             f"{m['weights_and_caches'] / mib:.1f} | {fmt(rss, '.1f')} |")
            report.append("### Memory: self-speculation vs autoregressive\n")
            report.append("\n".join(lines) + "\n")
            ratio = f"self-speculative / autoregressive, weights + caches: {mem['ratio_weights_and_caches']:.4f}"
            if "ratio_weights_and_peak_rss_delta" in mem:
                ratio += f"; weights + peak RSS increase: {mem['ratio_weights_and_peak_rss_delta']:.4f}"
            report.append(ratio + "\n")

        # --- exit layer x k sweep ---
        if args.sweep:
            layers = args.sweep_layers or sorted({max(1, n_layer * i // 4) for i in range(4)})
            check_exit_layers(layers, n_layer)
            sweep = []
            for e in layers:
                if pairs is not None:
                    set_late_scale(pairs, originals, e, args.sweep_late_scale)
                print(f"# sweep: E = {e}", file=sys.stderr)
                sweep += engine_rows(model, prompt, args.max_new_tokens, e, args.sweep_k, fns, args.repeats,
                                     early_exit_row=False, label={"late_scale": args.sweep_late_scale if pairs else None})
            sweep = [r for r in sweep if r["method"] == "self-speculative"]
            out["sweep"] = sweep
            synthetic = f" (synthetic: layers [E, L) scaled by {args.sweep_late_scale})" if pairs is not None else ""
            plot_sweep(sweep, args.plot, f"speedup{synthetic}")
            out["plot"] = str(args.plot)
            report.append(f"### Exit layer x k sweep{synthetic}; plot: {args.plot}\n")
            report.append(markdown_table(sweep, [("E", "draft_layers", "d"), ("k", "k", "d"), ("mode", "mode", ""),
                                                 ("tokens/s", "tokens_per_sec", ".1f"), ("speedup", "speedup", ".2f"),
                                                 ("acceptance", "acceptance_rate", ".1%"),
                                                 ("tokens/step", "tokens_per_step", ".2f"), ("ideal", "ideal", ".2f"),
                                                 ("efficiency", "efficiency", ".0%"),
                                                 ("tokens = AR", "tokens_equal_ar", "")]) + "\n")
    finally:
        tmp.cleanup()
    print("\n".join(report))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
