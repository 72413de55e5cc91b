"""Generates text from a converted checkpoint: autoregressive, self-speculative or early-exit.

    python generate.py --checkpoint_path DIR/model.pth --prompt "def fib(n):" --compile
    python generate.py ... --draft_layers 8                     # LayerSkip self-speculation, k auto
    python generate.py ... --draft_layers 8 --speculate_k 6     # ... with k fixed
    python generate.py ... --prompts_file prompts.jsonl --batch_size 8 --output out.jsonl
    python generate.py ... --chat --system "Be brief." --prompt "What is a cache?"   # an instruct model

Loading is lazy (meta device, memory-mapped weights assigned in place), the KV cache is static,
and with --compile the decode step (or the self-speculative step) is compiled once and replayed
(as a CUDA graph on a GPU). One prompt streams its text to stdout and reports tokens/s,
bandwidth and peak memory; a prompts file runs --batch_size rows at once, refilling each row as
its prompt ends, and appends every finished prompt to --output as one JSON line. With --json the
last stdout line is a JSON object with every sample. With --chat each prompt is a user message in
the checkpoint's chat template (--interactive --chat keeps the conversation).
"""
import argparse
import json
import os
import resource
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

import tp
from common import (DTYPES, cache_length, check_device, check_exit_layer, completion_text, fail, generate_batch,
                    read_prompts_file, weight_bytes)
from model import Transformer, load_model
from self_spec import (AUTO_K, AdaptiveK, add_draft_vocab_flags, decoding_functions, draft_vocab_checks, draft_vocab_for,
                       measure_step_seconds, parse_speculate_k, warm_up)
from tokenizer import load_tokenizer, render_chat

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo" / "model.pth"


class TextStream:
    """Prints the text as tokens arrive. It decodes prompt + generated tokens each time and prints
    what is new: decoding pieces alone would lose SentencePiece's word-start spaces and split
    multi-byte characters. With show_drafts in a terminal, accepted drafts print in green."""

    def __init__(self, tokenizer, prompt_tokens: list[int], show_drafts: bool):
        self.tokenizer = tokenizer
        self.colour = show_drafts and sys.stdout.isatty()
        self.tokens = list(prompt_tokens)
        self.printed = tokenizer.decode(self.tokens)

    def __call__(self, index: int, new_tokens: list[int], drafted: list[bool]) -> None:
        for token, from_draft in zip(new_tokens, drafted):
            if token in self.tokenizer.stop_ids:  # the end of the reply, not a part of it (e.g. "<|eot_id|>")
                continue
            self.tokens.append(token)
            text = self.tokenizer.decode(self.tokens)
            if text.endswith("\ufffd"):  # wait for the rest of the character
                continue
            piece, self.printed = text[len(self.printed):], text
            if self.colour and from_draft:
                piece = f"\033[32m{piece}\033[0m"
            print(piece, end="", flush=True)


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def read_prompts():
    """Prompts from stdin until an empty line or end of input."""
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            line = ""
        if not line:
            print()  # end the prompt's line: a --json object must stand on a line of its own
            return
        yield line


def read_finished(output: Path, settings: dict, entries: list[dict]) -> set[int]:
    """The prompts an earlier run with the same settings already wrote to `output` (for --resume).
    A last line cut short by an interruption is dropped from the file."""
    if not output.is_file():
        return set()
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    done = set()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the run was killed while writing it: rewrite without it
                output.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ValueError(f"--resume: {output}, line {number} is not JSON") from None
        if record.get("settings") != settings:
            differ = sorted(key for key in settings if (record.get("settings") or {}).get(key) != settings[key])
            raise ValueError(f"--resume: {output} was written with different settings ({', '.join(differ)})")
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < len(entries) or entries[index]["prompt"] != record.get("prompt"):
            raise ValueError(f"--resume: {output}, line {number} is not from this prompts file")
        done.add(index)
    return done


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail  # one line on stderr for a bad flag too, not usage + message
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message in the checkpoint's chat template (an instruct model); "
                        "with --interactive the conversation is kept")
    p.add_argument("--system", help="with --chat: the system message")
    p.add_argument("--prompts_file", type=Path, help='JSONL with a "prompt" field per line, or one prompt per line')
    p.add_argument("--batch_size", type=int, default=1,
                   help="rows generated at once: prompts of --prompts_file, or samples of --prompt")
    p.add_argument("--output", type=Path, help="with --prompts_file: append each finished prompt here (JSONL)")
    p.add_argument("--resume", action="store_true", help="skip the prompts --output already has")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (argmax)")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="activations: default float32 on CPU (bfloat16 for a quantized file), bfloat16 on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads; default: one or all, whichever runs a step faster")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="compile the prefill too")
    p.add_argument("--draft_layers", type=int, help="self-speculation: draft with layers [0, E)")
    p.add_argument("--speculate_k", type=parse_speculate_k, default="auto",
                   help="tokens drafted per step, or auto: chosen before each step from "
                        f"{', '.join(map(str, AUTO_K[1:]))} (or an autoregressive step) by measured cost and acceptance")
    add_draft_vocab_flags(p)
    p.add_argument("--early_exit", type=int, help="generate with layers [0, E) alone (lossy)")
    p.add_argument("--show_drafts", action="store_true", help="colour accepted drafts in a terminal")
    p.add_argument("--json", action="store_true", help="last stdout line: JSON with every sample")
    args = p.parse_args(argv)
    check_device(args.device)
    checks = [
        (args.num_samples < 1, "--num_samples must be at least 1"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
        (args.temperature < 0, "--temperature must be 0 (greedy) or positive"),
        (args.top_k is not None and args.top_k < 1, "--top_k must be at least 1"),
        (args.threads is not None and args.threads < 1, "--threads must be at least 1"),
        (args.draft_layers is not None and args.early_exit is not None, "--draft_layers and --early_exit exclude each other"),
        (args.interactive and args.prompts_file is not None, "--interactive and --prompts_file exclude each other"),
        ((args.output is not None or args.resume) and args.prompts_file is None, "--output and --resume need --prompts_file"),
        (args.resume and args.output is None, "--resume needs --output"),
        (args.system is not None and not args.chat, "--system needs --chat"),
        *draft_vocab_checks(args),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    if args.prompts_file is not None and not args.prompts_file.is_file():
        fail(f"prompts file not found: {args.prompts_file}")
    args.dtype = DTYPES[args.dtype] if args.dtype else None  # None: load_model's default for the file
    return args


def fastest_threads(model: Transformer, step: Callable, batch_size: int) -> int:
    """One thread or all of them, whichever runs this model's step faster here, and set: a small
    model spends a step in many small operations, where threads mostly wait for each other. The
    step is timed uncompiled: a compiled graph is specialised to the thread count, so timing
    compiled steps at two counts would compile every step twice."""
    every, seconds = torch.get_num_threads(), {}
    for threads in (1, every):
        torch.set_num_threads(threads)
        seconds[threads] = measure_step_seconds(model, {0: step}, batch_size, repeats=3)[0]
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    print(f"threads: {best} (an uncompiled step took {seconds[1] * 1e3:.1f} ms with one thread, "
          f"{seconds[every] * 1e3:.1f} ms with {every}; --threads sets it)", file=sys.stderr)
    return best


def decoding_settings(args: argparse.Namespace) -> dict:
    """What decoding_functions needs from the command line, but whether and how to compile."""
    return dict(temperature=args.temperature, top_k=args.top_k, early_exit=args.early_exit is not None,
                speculate_k=args.speculate_k if args.draft_layers else None)


def prepare_run(args: argparse.Namespace, model: Transformer, prefill_fn: Callable, steps: dict[int, Callable],
                length: int, exit_layer: Optional[int]) -> Optional[AdaptiveK]:
    """Caches for batch_size rows of `length` positions; on a CPU without --threads, the faster of
    one thread and all (chosen once, before anything is compiled); with --compile every step
    compiled before anything is timed; with several steps to choose from (--speculate_k auto), the
    policy that chooses, starting from what each step measures here."""
    with torch.device(args.device):
        model.setup_caches(args.batch_size, length, exit_layer)
    if args.threads is None and args.device == "cpu" and torch.get_num_threads() > 1:
        uncompiled = decoding_functions(**decoding_settings(args))[1]
        args.threads = fastest_threads(model, uncompiled[min(uncompiled)], args.batch_size)
    if args.compile:
        print(f"compilation (not timed): {warm_up(model, prefill_fn, steps, args.batch_size):.1f} s", file=sys.stderr)
    return AdaptiveK(measure_step_seconds(model, steps, args.batch_size)) if len(steps) > 1 else None


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rank, world, device = tp.setup(args.device)  # under torchrun: this process's share of the model
    except ValueError as e:
        fail(str(e))
    if rank:  # rank 0 alone speaks: text, reports, --json, errors (every rank exits alike)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    if world > 1 and args.interactive:
        fail("--interactive reads stdin in one process: run it without torchrun")
    if world > 1 and args.draft_vocab is not None:
        fail("--draft_vocab runs in one process: run it without torchrun (each rank holds a share of the head)")
    args.device = device
    try:
        draft_ids = draft_vocab_for(args, args.checkpoint_path)
        model = load_model(args.checkpoint_path, device, args.dtype, shard=tp.shard(rank, world) if world > 1 else None,
                           draft_ids=draft_ids)
        if world > 1:
            tp.add_collectives(model)
        tokenizer = load_tokenizer(args.checkpoint_path.parent)
        entries = read_prompts_file(args.prompts_file) if args.prompts_file else None
    except (ValueError, OSError) as e:
        fail(str(e))
    exit_layer = args.draft_layers if args.draft_layers is not None else args.early_exit
    if exit_layer is not None:
        flag = "--draft_layers" if args.draft_layers is not None else "--early_exit"
        check_exit_layer(flag, exit_layer, model.args.n_layer)
    if model.args.vocab_size < tokenizer.vocab_size:
        fail(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    if args.chat and tokenizer.chat_template is None:
        fail(f"--chat: {args.checkpoint_path.parent} has no chat template (chat_template.jinja or tokenizer_config.json's)")

    torch.manual_seed(args.seed)
    prefill_fn, steps = decoding_functions(**decoding_settings(args), compile=args.compile, device=args.device,
                                           compile_prefill=args.compile_prefill)
    slack = max(steps) + 1
    context = model.args.max_seq_length
    generate_run = partial(generate_batch, model, prefill_fn=prefill_fn, steps=steps, stop_ids=tokenizer.stop_ids,
                           batch_size=args.batch_size)
    info = {"checkpoint": str(args.checkpoint_path), "device": args.device,
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "compile": args.compile,
            "draft_layers": args.draft_layers, "speculate_k": args.speculate_k if args.draft_layers else None,
            "draft_vocab": args.draft_vocab, "early_exit": args.early_exit,
            "batch_size": args.batch_size, "weight_bytes": weight_bytes(model)}
    if entries is not None:
        run_prompts_file(args, model, tokenizer, entries, generate_run, prefill_fn, steps, exit_layer, info)
        return

    results, allocated, policy = [], 0, None
    history = []  # --chat: the conversation's earlier turns
    for prompt_text in read_prompts() if args.interactive else [args.prompt]:
        prompt_tokens = encode_prompt(args, tokenizer, prompt_text, history)
        if len(prompt_tokens) >= context:
            fail(f"prompt is {len(prompt_tokens)} tokens; the model's context of {context} leaves no room")
        needed = cache_length([len(prompt_tokens)], args.max_new_tokens, context, slack)
        if needed > allocated:  # grows for a longer prompt, at least doubling: each size compiles anew
            allocated = min(max(needed, 2 * allocated), context + slack)
            policy = prepare_run(args, model, prefill_fn, steps, allocated, exit_layer)
        for _ in range(args.num_samples):
            stream = None
            if args.batch_size == 1:
                print("" if args.chat else prompt_text, end="", flush=True)  # a chat shows the reply alone
                stream = TextStream(tokenizer, prompt_tokens, show_drafts=args.show_drafts)
            t0 = time.perf_counter()
            with torch.inference_mode():
                samples = generate_run([prompt_tokens] * args.batch_size, args.max_new_tokens, on_tokens=stream,
                                       policy=policy)
            seconds = time.perf_counter() - t0
            for sample in samples:
                sample.pop("index")
                sample["text"] = completion_text(tokenizer, prompt_tokens, sample["generated_tokens"])
                if stream is None:
                    print(f"{'' if args.chat else prompt_text}{sample['text']}\n")
            results += samples
            report(samples, seconds, info["weight_bytes"], args.device)
        if args.chat:  # the conversation goes on from the first sample's reply
            reply = samples[0]["generated_tokens"]
            reply = reply[:-1] if reply[-1] in tokenizer.stop_ids else reply
            history += [{"role": "user", "content": prompt_text},
                        {"role": "assistant", "content": completion_text(tokenizer, prompt_tokens, reply)}]
    if args.json:
        print(json.dumps({"samples": results, **info, "peak_memory_gb": peak_memory_gb(args.device)}))


def encode_prompt(args: argparse.Namespace, tokenizer, prompt: str, history: list[dict] = ()) -> list[int]:
    """A plain prompt after BOS; with --chat the user message `prompt` after --system and the
    conversation so far, rendered in the chat template, its special tokens as their ids."""
    if not args.chat:
        return tokenizer.encode(prompt, bos=True)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = system + list(history) + [{"role": "user", "content": prompt}]
    try:
        return tokenizer.encode(render_chat(tokenizer, messages), bos=False, special=True)
    except ValueError as e:
        fail(str(e))


def report(samples: list[dict], seconds: float, bytes_per_token: int, device: str) -> None:
    """tokens/s of a run of one prompt (one sample, or batch_size samples generated together)."""
    tokens = sum(len(s["generated_tokens"]) for s in samples)
    line = f"\n\n{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.2f} tokens/s"
    if len(samples) == 1:  # one row: every weight is read once per token
        line += f", {bytes_per_token * tokens / seconds / 1e9:.2f} GB/s of weights"
    else:
        line += f" over {len(samples)} rows"
    drafted = [s for s in samples if s["acceptance_rate"] is not None]
    if drafted:
        acceptance = sum(s["acceptance_rate"] for s in drafted) / len(drafted)
        per_step = sum(s["tokens_per_step"] for s in drafted) / len(drafted)
        line += f", acceptance {acceptance:.1%}, {per_step:.2f} tokens/step"
        k_steps = {}
        for s in drafted:
            for k, n in s["k_steps"].items():
                k_steps[k] = k_steps.get(k, 0) + n
        if len(k_steps) > 1:  # --speculate_k auto: how often each k (0: autoregressive) was chosen
            line += ", steps by k: " + " ".join(f"{k}:{n}" for k, n in sorted(k_steps.items()))
            line += f" ({k_steps.get(0, 0) / sum(k_steps.values()):.0%} autoregressive)"
    print(line + f", peak memory {peak_memory_gb(device):.2f} GB", flush=True)


def run_prompts_file(args: argparse.Namespace, model: Transformer, tokenizer, entries: list[dict],
                     generate_run: Callable, prefill_fn: Callable, steps: dict[int, Callable],
                     exit_layer: Optional[int], info: dict) -> None:
    """Every prompt of the file, batch_size at a time; each finished prompt is appended to --output
    (or printed as a JSON line) at once, so an interrupted run keeps what it finished."""
    from tqdm import tqdm

    settings = {key: info[key] for key in ("checkpoint", "dtype", "draft_layers", "speculate_k", "draft_vocab", "early_exit")}
    settings.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                    chat=args.chat, system=args.system)
    rank_0 = not dist.is_initialized() or dist.get_rank() == 0  # under torchrun only rank 0 touches --output
    try:
        done = read_finished(args.output, settings, entries) if args.resume and rank_0 else set()
    except (ValueError, OSError) as e:
        fail(str(e))
    done = tp.broadcast(done)
    if args.output is not None and not args.resume and rank_0:
        args.output.write_text("")  # a fresh run starts a fresh file
    out = open(args.output, "a", encoding="utf-8") if args.output is not None and rank_0 else sys.stdout

    def write(record: dict) -> None:
        out.write(json.dumps({**record, "settings": settings}) + "\n")
        out.flush()
        if out is not sys.stdout:
            os.fsync(out.fileno())

    context = model.args.max_seq_length
    todo, encoded = [], {}
    for index, entry in enumerate(entries):
        if index in done:
            continue
        tokens = encode_prompt(args, tokenizer, entry["prompt"])
        if len(tokens) >= context:
            reason = f"prompt is {len(tokens)} tokens; the model's context of {context} leaves no room"
            print(f"warning: prompt {index} skipped: {reason}", file=sys.stderr)
            write({**entry, "index": index, "skipped": reason})
            continue
        todo.append(index)
        encoded[index] = tokens
    if done:
        print(f"resuming: {len(done)} of {len(entries)} prompts already in {args.output}", file=sys.stderr)
    results = []
    if todo:
        length = cache_length([len(encoded[i]) for i in todo], args.max_new_tokens, context, max(steps) + 1)
        policy = prepare_run(args, model, prefill_fn, steps, length, exit_layer)
        bar = tqdm(total=len(todo), unit="prompt", file=sys.stderr, dynamic_ncols=True)
        t0, generated = time.perf_counter(), 0

        def on_done(result: dict) -> None:
            nonlocal generated
            index = todo[result["index"]]
            result["text"] = completion_text(tokenizer, result["prompt_tokens"], result["generated_tokens"])
            write({**entries[index], **result, "index": index})
            results.append(result)
            generated += len(result["generated_tokens"])
            bar.update()
            bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):.1f} tokens/s")

        try:
            with torch.inference_mode():
                generate_run([encoded[i] for i in todo], args.max_new_tokens, on_done=on_done, policy=policy)
        except KeyboardInterrupt:
            bar.close()
            where = f"in {args.output}; --resume continues" if args.output else "above"
            fail(f"interrupted: {len(results)} of {len(todo)} prompts finished, {where}")
        bar.close()
        seconds = time.perf_counter() - t0
        print(f"{len(todo)} prompts, {generated} tokens in {seconds:.2f} s: {generated / seconds:.2f} tokens/s "
              f"aggregate, batch size {args.batch_size}", file=sys.stderr)
    if args.json:
        print(json.dumps({"samples": results, **info, "peak_memory_gb": peak_memory_gb(args.device)}))


if __name__ == "__main__":
    main()
