"""Runs EleutherAI's lm-evaluation-harness (`lm-eval`) tasks on this engine.

    pip install torch==2.13.0 -r requirements-eval.txt
    python eval.py --checkpoint_path DIR/model.pth --tasks hellaswag,arc_easy --limit 200 --batch_size 8
    python eval.py ... --tasks gsm8k --draft_layers 4 --compare_ar   # self-speculation (k auto), vs AR
    python eval.py ... --tasks my_task --include_path my_tasks/ --output results.json --log_samples

`EngineLM` is an `lm_eval.api.model.LM` over a loaded `Transformer`: loglikelihood and
loglikelihood_rolling score with the full model (batched, right-padded rows); generate_until runs
the engine's batched loop (`common.generate_batch`), autoregressive or - with --draft_layers -
LayerSkip self-speculative, greedy or sampled as each request's gen_kwargs say. The harness's metrics
table is printed, then for generation tasks tokens/s and the acceptance rate; --compare_ar reruns
the same generation requests autoregressively (opt-in: it doubles the generation time) and reports
the speedup and how many greedy outputs came out identical. Datasets come through the harness
(Hugging Face `datasets`); a task of your own with a local JSONL file needs no network.
"""
import argparse
import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from common import DTYPES, atomic_write, check_device, check_exit_layer, fail, generate_batch
from model import ModelArgs, Transformer, load_model
from self_spec import (AdaptiveK, add_draft_vocab_flags, decoding_functions, draft_vocab_checks, draft_vocab_for,
                       measure_step_seconds, parse_speculate_k, warm_up)
from tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo" / "model.pth"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default when a task names no max_gen_toks
KNOWN_GEN_KWARGS = {"until", "do_sample", "temperature", "top_k", "max_gen_toks", "max_new_tokens", "max_tokens"}
_warned: set[str] = set()  # gen_kwargs already warned about


class RequestError(ValueError):
    """A request the model cannot take (a continuation longer than its context)."""


def lm_base_class() -> type:
    """lm_eval's LM, imported when needed: the package is an optional requirement."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        fail("lm-eval is not installed: pip install -r requirements-eval.txt")
    return LM


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens whose concatenation is the encoding of the whole text.

    Encoding the two apart would tokenise differently from the whole (SentencePiece's word-start
    space, BPE merges across the split), so, as the harness's own adapters do, the whole text is
    encoded and the continuation's tokens are taken from its end. Trailing spaces of the context
    move to the continuation first (the harness's convention: " word" is one token, "word" after
    " " is not). Where the whole's encoding still does not begin with the context's (a token
    spanning the split), the split moves back to the longest common prefix, so that every token
    that covers continuation text is scored once and no context token is scored.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # the harness's empty context: the continuation after BOS alone
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False)
    whole = tokenizer.encode(context + continuation, bos=True)
    context_tokens = tokenizer.encode(context, bos=True)
    common = 0
    while common < min(len(whole), len(context_tokens)) and whole[common] == context_tokens[common]:
        common += 1
    return whole[:common], whole[common:]


def decoding_settings(gen_kwargs: dict) -> dict:
    """A request's gen_kwargs as the engine's settings, following the harness's rules.

    Greedy unless do_sample is true, or do_sample is absent and temperature > 0 (the harness
    treats a temperature of 0 as greedy); sampling with temperature 0 means temperature 1.
    max_gen_toks (or its aliases max_new_tokens, max_tokens) defaults to 256; `until` is a string
    or a list of stop strings (the engine stops at the EOS token itself, so its text is not one).
    """
    unknown = sorted(set(gen_kwargs) - KNOWN_GEN_KWARGS - _warned)
    if unknown:  # e.g. top_p: the engine has no such sampler; say so (once) rather than ignore it silently
        _warned.update(unknown)
        print(f"warning: gen_kwargs {', '.join(unknown)} not supported by the engine, ignored", file=sys.stderr)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = gen_kwargs.get("do_sample")
    sample = temperature > 0 if do_sample is None else bool(do_sample)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                    if gen_kwargs.get(k) is not None), DEFAULT_MAX_GEN_TOKS)
    return {"temperature": (temperature or 1.0) if sample else 0.0,
            "top_k": gen_kwargs.get("top_k") if sample else None,
            "max_gen_toks": int(max_gen), "until": [s for s in until if s]}


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
    return text[:cut]


def make_engine_lm(model: Transformer, tokenizer, *, batch_size: int = 1, draft_layers: Optional[int] = None,
                   speculate_k: Union[int, str] = "auto", compiled: bool = False) -> Any:
    """An lm_eval LM over the engine (the class is built here: lm_eval is imported lazily)."""
    LM = lm_base_class()

    class EngineLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self.draft_layers, self.speculate_k = draft_layers, speculate_k
            self.device_ = model.tok_embeddings.weight.device
            self.max_length = model.args.max_seq_length
            self.compiled, self.warmed = compiled, set()
            self.generation_log: list[dict] = []  # what generate_until ran, for stats and --compare_ar

        # --- scoring ---------------------------------------------------------------------------

        def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(log P(continuation | context), continuation is the greedy one) for token pairs.

            Each row is context + continuation less its last token, cut on the left to the model's
            context; rows are right-padded to the longest of their batch (a query at position p
            sees only cache positions <= p of its own row, so padding changes nothing). Longest
            first: the first batch fixes the cache length, and rows of similar length share a batch.
            """
            results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
            rows = []
            for i, (context, continuation) in enumerate(pairs):
                if not continuation:
                    results[i] = (0.0, True)
                    continue
                if len(continuation) > self.max_length:
                    raise RequestError(f"a continuation of {len(continuation)} tokens is longer than the "
                                     f"model's context of {self.max_length}")
                rows.append((i, (context + continuation)[-(self.max_length + 1):-1], continuation))
            rows.sort(key=lambda row: -len(row[1]))
            if not rows:
                return results
            cache_rows = min(self.batch_size, len(rows))
            self.model.setup_caches(cache_rows, len(rows[0][1]))
            with torch.inference_mode():
                for start in range(0, len(rows), cache_rows):
                    results_batch = self.score_batch(rows[start:start + cache_rows], cache_rows)
                    for (i, _, _), result in zip(rows[start:start + cache_rows], results_batch):
                        results[i] = result
            return results

        def score_batch(self, batch: list[tuple[int, list[int], list[int]]], cache_rows: int) -> list[tuple[float, bool]]:
            length = len(batch[0][1])
            idx = torch.zeros(len(batch), length, dtype=torch.long)
            for r, (_, tokens, _) in enumerate(batch):
                idx[r, :len(tokens)] = torch.tensor(tokens)
            idx = idx.to(self.device_)
            input_pos = torch.arange(length, device=self.device_).expand(len(batch), -1)
            rows = None if len(batch) == cache_rows else torch.arange(len(batch), device=self.device_)
            hidden = self.model.late(self.model.early(idx, input_pos, rows), input_pos, rows)
            # The head (and the log-softmax over the vocabulary) only where a continuation token is
            # predicted: position j predicts token j + 1, so the last len(continuation) positions.
            which_row = torch.tensor([r for r, (_, _, cont) in enumerate(batch) for _ in cont], device=self.device_)
            which_pos = torch.tensor([p for _, tokens, cont in batch for p in range(len(tokens) - len(cont), len(tokens))],
                                     device=self.device_)
            logits = self.model.head(hidden[which_row, which_pos])
            logprobs = F.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor([t for _, _, cont in batch for t in cont], device=self.device_)
            token_logprobs = logprobs.gather(1, targets[:, None])[:, 0].cpu()
            greedy = (logprobs.argmax(-1) == targets).cpu()
            results, at = [], 0
            for _, _, cont in batch:
                results.append((token_logprobs[at:at + len(cont)].sum().item(), bool(greedy[at:at + len(cont)].all())))
                at += len(cont)
            return results

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            results = self.score([encode_pair(self.tokenizer, *request.args[:2]) for request in requests])
            for request, result in zip(requests, results):
                self.cache_hook.add_partial("loglikelihood", request.args, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Every token of each text scored once, in windows of the model's context: the first
            window after BOS, each next one the following tokens (the harness's windows, context_len=1;
            the last window is filled up with earlier tokens as context). All windows of all texts are
            batched together."""
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            windows, owners = [], []
            for i, request in enumerate(requests):
                tokens = self.tokenizer.encode(request.args[0], bos=False)
                for window in get_rolling_token_windows(tokens, prefix_token=self.tokenizer.bos_id,
                                                        max_seq_len=self.max_length, context_len=1):
                    windows.append(make_disjoint_window(window))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owners, self.score(windows)):
                totals[i] += logprob
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        # --- generation --------------------------------------------------------------------------

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if not requests:
                return []
            jobs = []
            for request in requests:
                context, gen_kwargs = request.args[:2]
                settings = decoding_settings(gen_kwargs or {})
                jobs.append({"prompt": self.prompt_tokens(context, settings["max_gen_toks"]), **settings})
            texts, record = self.run_generation(jobs, speculative=self.draft_layers is not None)
            self.generation_log.append({"jobs": jobs, **record})
            for request, text in zip(requests, texts):
                self.cache_hook.add_partial("generate_until", request.args, text)
            return texts

        def prompt_tokens(self, context: str, max_gen: int) -> list[int]:
            """The context's tokens, cut on the left so that max_gen tokens fit in the model's
            context (as the harness's HF adapter does), but never below half of it: a task asking
            for more tokens than the context holds gets fewer, not an empty prompt."""
            tokens = self.tokenizer.encode(context, bos=True)
            keep = max(self.max_length - max_gen, self.max_length // 2)
            return tokens[-keep:]

        def run_generation(self, jobs: list[dict], speculative: bool) -> tuple[list[str], dict]:
            """Generates every job, one generate_batch run per sampling setting; returns the texts
            (cut at the first stop string) and what was measured."""
            speculate_k = self.speculate_k if speculative else None
            cache_rows = min(self.batch_size, len(jobs))
            context = self.max_length
            # Caches sized once for every job (so a compiled step keeps its shapes): the longest
            # prompt + its tokens within the context, + the k + 1 positions a step may write past it.
            slack = max(decoding_functions(0.0, None, speculate_k)[1]) + 1
            length = max(min(len(job["prompt"]) + job["max_gen_toks"], context) for job in jobs) + slack
            self.model.setup_caches(cache_rows, length, self.draft_layers if speculative else None)
            groups: dict[tuple, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault((job["temperature"], job["top_k"]), []).append(i)
            outputs: list[Optional[dict]] = [None] * len(jobs)
            seconds = 0.0
            for (temperature, top_k), members in groups.items():
                prefill_fn, steps = decoding_functions(temperature, top_k, speculate_k, compile=self.compiled,
                                                       device=self.device_.type)
                key = (speculative, cache_rows, length, temperature, top_k)
                if self.compiled and key not in self.warmed:  # compile before anything is timed
                    self.warmed.add(key)
                    warm_up(self.model, prefill_fn, steps, cache_rows)
                policy = AdaptiveK(measure_step_seconds(self.model, steps, cache_rows)) if len(steps) > 1 else None
                prompts = [jobs[i]["prompt"] for i in members]
                prompt_texts = [self.tokenizer.decode(p) for p in prompts]

                def stop(index: int, tokens: list[int]) -> bool:
                    """A row ends at its own token budget or once a stop string is in its text
                    (generate_batch's budget is the largest of the group's)."""
                    job = jobs[members[index]]
                    if len(tokens) >= job["max_gen_toks"]:
                        return True
                    text = self.tokenizer.decode(prompts[index] + tokens)[len(prompt_texts[index]):]
                    return any(s in text for s in job["until"])

                t0 = time.perf_counter()
                with torch.inference_mode():
                    results = generate_batch(
                        self.model, prompts, max(jobs[i]["max_gen_toks"] for i in members), prefill_fn=prefill_fn,
                        steps=steps, stop_ids=self.tokenizer.stop_ids, batch_size=cache_rows, stop=stop, policy=policy)
                if self.device_.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                for i, result in zip(members, results):
                    outputs[i] = result
            texts, tokens = [], 0
            for job, result in zip(jobs, outputs):
                generated = result["generated_tokens"][:job["max_gen_toks"]]  # a step may overshoot
                tokens += len(generated)
                if generated and generated[-1] in self.tokenizer.stop_ids:
                    generated = generated[:-1]  # EOS ends the text; its own text (if any) is not output
                prompt_text = self.tokenizer.decode(job["prompt"])
                text = self.tokenizer.decode(job["prompt"] + generated)[len(prompt_text):]
                texts.append(cut_at_stop(text, job["until"]))
            rates = [r["acceptance_rate"] for r in outputs if r["acceptance_rate"] is not None]
            per_step = [r["tokens_per_step"] for r in outputs if r["tokens_per_step"] is not None]
            record = {"texts": texts, "tokens": tokens, "seconds": seconds,
                      "acceptance_rate": sum(rates) / len(rates) if rates else None,
                      "tokens_per_step": sum(per_step) / len(per_step) if per_step else None}
            return texts, record

        def generation_stats(self, compare_ar: bool = False) -> Optional[dict]:
            """tokens/s and acceptance over every generate_until call; with compare_ar, the same
            jobs rerun autoregressively: its tokens/s, the speedup, identical greedy outputs."""
            if not self.generation_log:
                return None
            tokens = sum(r["tokens"] for r in self.generation_log)
            seconds = sum(r["seconds"] for r in self.generation_log)
            rates = [r["acceptance_rate"] for r in self.generation_log if r["acceptance_rate"] is not None]
            per_step = [r["tokens_per_step"] for r in self.generation_log if r["tokens_per_step"] is not None]
            stats = {"requests": sum(len(r["jobs"]) for r in self.generation_log), "generated_tokens": tokens,
                     "seconds": seconds, "tokens_per_sec": tokens / seconds if seconds else None,
                     "self_speculative": self.draft_layers is not None,
                     "acceptance_rate": sum(rates) / len(rates) if rates else None,
                     "tokens_per_step": sum(per_step) / len(per_step) if per_step else None}
            if compare_ar and self.draft_layers is not None:
                ar_tokens, ar_seconds, greedy, same = 0, 0.0, 0, 0
                for run in self.generation_log:
                    texts, record = self.run_generation(run["jobs"], speculative=False)
                    ar_tokens += record["tokens"]
                    ar_seconds += record["seconds"]
                    for job, text, spec_text in zip(run["jobs"], texts, run["texts"]):
                        if job["temperature"] == 0:
                            greedy += 1
                            same += text == spec_text
                ar_rate = ar_tokens / ar_seconds if ar_seconds else None
                stats["autoregressive"] = {"generated_tokens": ar_tokens, "seconds": ar_seconds, "tokens_per_sec": ar_rate,
                                           "greedy_requests": greedy, "identical_greedy_outputs": same}
                stats["speedup"] = stats["tokens_per_sec"] / ar_rate if ar_rate and stats["tokens_per_sec"] else None
            return stats

    return EngineLM()


def format_stats(stats: dict) -> str:
    kind = "self-speculative" if stats["self_speculative"] else "autoregressive"
    line = (f"generate_until ({kind}): {stats['requests']} requests, {stats['generated_tokens']} tokens in "
            f"{stats['seconds']:.2f} s: {stats['tokens_per_sec'] or 0:.2f} tokens/s")
    if stats["acceptance_rate"] is not None:
        line += f", acceptance {stats['acceptance_rate']:.1%}, {stats['tokens_per_step']:.2f} tokens/step"
    ar = stats.get("autoregressive")
    if ar:
        line += (f"\nautoregressive, same requests: {ar['generated_tokens']} tokens in {ar['seconds']:.2f} s: "
                 f"{ar['tokens_per_sec'] or 0:.2f} tokens/s; speedup {stats['speedup'] or 0:.2f}x; "
                 f"identical greedy outputs {ar['identical_greedy_outputs']}/{ar['greedy_requests']}")
    return line


# --- tasks -----------------------------------------------------------------------------------------

def load_tasks(names: list[str], include_path: Optional[Path]) -> tuple[Any, list]:
    """The harness's TaskManager and the requested tasks and groups, built (datasets loaded) before
    the model is; one line on stderr for a name the harness does not know or a task whose dataset
    cannot be loaded.

    With --include_path, an index of that folder alone is tried first: indexing the harness's own
    tasks (thousands of YAML files) takes seconds, and a local task does not need it."""
    from lm_eval.tasks import TaskManager

    def known(manager, name: str) -> bool:  # a name or glob pattern, as the harness's CLI, or a YAML file
        return bool(manager.match_tasks([name])) or (name.endswith((".yaml", ".yml")) and Path(name).is_file())

    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if manager is None or not all(known(manager, name) for name in names):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if not known(manager, name)]
    if unknown:
        hints = [f"{name!r} (did you mean {', '.join(close)}?)"
                 if (close := difflib.get_close_matches(name, manager.all_tasks, 3)) else repr(name) for name in unknown]
        fail(f"unknown task {', '.join(hints)}: `lm-eval ls tasks` lists them; --include_path adds your own")
    resolved = []
    for name in names:
        matches = manager.match_tasks([name]) or [name]
        resolved += [m for m in matches if m not in resolved]
    try:
        loaded = manager.load(resolved)
    except Exception as e:  # a dataset that cannot be fetched, a broken YAML: many kinds of error
        fail(f"cannot load task {', '.join(resolved)}: {type(e).__name__}: {first_line(e)}")
    # simple_evaluate takes built tasks and groups as they are: hand it the top-level ones, so that
    # nothing is built twice and groups still aggregate their subtasks.
    groups = list(loaded["groups"].values())
    nested = {id(sub) for group in groups for sub in group.get_all_groups()}
    top = [group for group in groups if id(group) not in nested]
    grouped = {id(task) for group in top for task in group.get_all_tasks()}
    top += [task for task in loaded["tasks"].values() if id(task) not in grouped]
    return manager, top


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


# --- command line --------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail  # one line on stderr for a bad flag too
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--tasks", required=True, help="comma-separated harness task names (or glob patterns)")
    p.add_argument("--include_path", type=Path, help="a folder of your own task YAML files")
    p.add_argument("--limit", type=float, help="examples per task, the first ones (a fraction of them if below 1)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch_size", type=int, default=1, help="rows scored or generated at once")
    p.add_argument("--draft_layers", type=int, help="generation: self-speculation drafting with layers [0, E)")
    p.add_argument("--speculate_k", type=parse_speculate_k, default="auto", help="tokens drafted per step, or auto (as generate.py)")
    add_draft_vocab_flags(p)
    p.add_argument("--compare_ar", action="store_true",
                   help="with --draft_layers: rerun the generation requests autoregressively, report the speedup")
    p.add_argument("--compile", action="store_true", help="compile the generation step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="activations: default float32 on CPU (bfloat16 for a quantized file), bfloat16 on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    p.add_argument("--seed", type=int, default=1234, help="torch seed (sampled generation)")
    p.add_argument("--output", type=Path, help="write the results (metrics, engine stats) here as JSON")
    p.add_argument("--log_samples", action="store_true", help="with --output: every request and response too")
    args = p.parse_args(argv)
    check_device(args.device)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    checks = [
        (not args.tasks, "--tasks names no task"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.limit is not None and args.limit <= 0, "--limit must be positive"),
        (args.num_fewshot is not None and args.num_fewshot < 0, "--num_fewshot must be 0 or more"),
        (args.threads is not None and args.threads < 1, "--threads must be at least 1"),
        (args.compare_ar and args.draft_layers is None, "--compare_ar needs --draft_layers"),
        *draft_vocab_checks(args),
        (args.log_samples and args.output is None, "--log_samples needs --output"),
        (args.include_path is not None and not args.include_path.is_dir(), f"--include_path is not a folder: {args.include_path}"),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)  # the harness reads a float as a fraction
    args.dtype = DTYPES[args.dtype] if args.dtype else None  # None: load_model's default for the file
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Runs the tasks; prints the metrics table and the generation stats; returns the results."""
    args = parse_args(argv)
    lm_base_class()  # lm-eval installed? (before anything slow)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.checkpoint_path.is_file():
        fail(f"checkpoint not found: {args.checkpoint_path}")
    try:  # the config alone, to check the flags against it before tasks and weights are loaded
        config = ModelArgs.load(args.checkpoint_path.parent / "model_config.json")
    except ValueError as e:
        fail(str(e))
    if args.draft_layers is not None:
        check_exit_layer("--draft_layers", args.draft_layers, config.n_layer)
    # `datasets` pings a download counter on the network for every dataset it loads, its packaged
    # local loaders ("json", "csv") included; a local task should touch no network (set it to 1 to
    # count). Set before `datasets` is first imported, which reads it then.
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    task_manager, tasks = load_tasks(args.tasks, args.include_path)
    try:
        model = load_model(args.checkpoint_path, args.device, args.dtype, draft_ids=draft_vocab_for(args, args.checkpoint_path))
        tokenizer = load_tokenizer(args.checkpoint_path.parent)
    except (ValueError, OSError) as e:
        fail(str(e))
    if model.args.vocab_size < tokenizer.vocab_size:
        fail(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    lm = make_engine_lm(model, tokenizer, batch_size=args.batch_size, draft_layers=args.draft_layers,
                        speculate_k=args.speculate_k, compiled=args.compile)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=task_manager, limit=args.limit, num_fewshot=args.num_fewshot,
            batch_size=args.batch_size, device=args.device, log_samples=args.log_samples,
            torch_random_seed=args.seed)  # the harness's other seeds keep its defaults (few-shot choice)
    except RequestError as e:
        fail(str(e))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    stats = lm.generation_stats(compare_ar=args.compare_ar)
    if stats:
        print(format_stats(stats))
    results["engine"] = {"checkpoint": str(args.checkpoint_path), "device": args.device,
                         "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "batch_size": args.batch_size,
                         "draft_layers": args.draft_layers,
                         "speculate_k": args.speculate_k if args.draft_layers is not None else None,
                         "draft_vocab": args.draft_vocab, "compile": args.compile, "generation": stats}
    if args.output is not None:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
        atomic_write(args.output, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
