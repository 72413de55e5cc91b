"""Generates text from a converted checkpoint: autoregressive, self-speculative or early-exit.

    python generate.py --checkpoint_path DIR/model.pth --prompt "def fib(n):" --compile
    python generate.py ... --draft_layers 8 --speculate_k 6     # LayerSkip self-speculation

Loading is lazy (meta device, memory-mapped weights assigned in place), the KV cache is static,
and with --compile the one-token decode step is compiled once and replayed (as a CUDA graph on
a GPU). Text streams to stdout; each sample reports tokens/s, bandwidth and peak memory; with
--json the last stdout line is a JSON object with every sample.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from model import Transformer, load_model
from tokenizer import load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo" / "model.pth"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def logits_to_probs(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """Sampling distribution over the last dim; temperature 0 is the one-hot argmax (greedy)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample_from_probs(probs: Tensor) -> Tensor:
    # argmax(p / Exp(1)) draws from p (the exponential-race trick) without the host sync that
    # torch.multinomial makes; on a one-hot p it returns the argmax exactly.
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


def model_logits(model: Transformer, idx: Tensor, input_pos: Tensor, early_exit: bool) -> Tensor:
    """Full model, or with early_exit only layers [0, E) + the shared head (lossy)."""
    return model.head(model.early(idx, input_pos)) if early_exit else model(idx, input_pos)


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, temperature: float,
            top_k: Optional[int], early_exit: bool = False) -> Tensor:
    logits = model_logits(model, idx, input_pos, early_exit)[:, -1]
    return sample_from_probs(logits_to_probs(logits, temperature, top_k)).view(1, 1)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float,
                     top_k: Optional[int], early_exit: bool = False) -> Tensor:
    return prefill(model, x, input_pos, temperature, top_k, early_exit)


def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float,
             top_k: Optional[int], eos_id: int, prefill_fn: Callable = prefill,
             decode_fn: Callable = decode_one_token, early_exit: bool = False,
             on_tokens: Optional[Callable[[list[int], list[bool]], None]] = None) -> tuple[list[int], dict]:
    """Autoregressive decoding; stops after EOS (kept) or max_new_tokens. Returns tokens, stats."""
    device = prompt.device
    input_pos = torch.arange(prompt.numel(), device=device)
    token = prefill_fn(model, prompt.view(1, -1), input_pos, temperature, top_k, early_exit)
    tokens = [token.item()]
    input_pos = input_pos[-1:] + 1
    while tokens[-1] != eos_id and len(tokens) < max_new_tokens:
        if on_tokens:
            on_tokens(tokens[-1:], [False])
        token = decode_fn(model, token, input_pos, temperature, top_k, early_exit).clone()
        tokens.append(token.item())
        input_pos += 1
    if on_tokens:
        on_tokens(tokens[-1:], [False])
    return tokens, {"acceptance_rate": None, "tokens_per_step": None}


class TextStream:
    """Prints the text as tokens arrive. It decodes prompt + generated tokens each time and prints
    what is new: decoding pieces alone would lose SentencePiece's word-start spaces and split
    multi-byte characters. With show_drafts in a terminal, accepted drafts print in green."""

    def __init__(self, tokenizer, prompt_tokens: list[int], enabled: bool, show_drafts: bool):
        self.tokenizer, self.enabled = tokenizer, enabled
        self.colour = show_drafts and sys.stdout.isatty()
        self.tokens = list(prompt_tokens)
        self.printed = self.prompt_text = tokenizer.decode(self.tokens)

    def __call__(self, new_tokens: list[int], drafted: list[bool]) -> None:
        if not self.enabled:  # the compile warm-up: nothing to show, nothing to decode
            return
        for token, from_draft in zip(new_tokens, drafted):
            self.tokens.append(token)
            text = self.tokenizer.decode(self.tokens)
            if text.endswith("\ufffd"):  # wait for the rest of the character
                continue
            piece, self.printed = text[len(self.printed):], text
            if self.colour and from_draft:
                piece = f"\033[32m{piece}\033[0m"
            print(piece, end="", flush=True)

    def text(self) -> str:
        """Everything generated, as text."""
        return self.tokenizer.decode(self.tokens)[len(self.prompt_text):]


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights read per full forward: every parameter but the embedding table."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith("tok_embeddings") or model.args.tie_embeddings)


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


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def check_exit_layer(flag: str, exit_layer: int, n_layer: int) -> None:
    """An exit needs at least one layer on each side: [0, E) drafts, [E, L) verifies."""
    if not 1 <= exit_layer < n_layer:
        fail(f"{flag} must be between 1 and {n_layer - 1} for this {n_layer}-layer model, got {exit_layer}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail  # one line on stderr for a bad flag too, not usage + message
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (argmax)")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="compile the prefill too")
    p.add_argument("--draft_layers", type=int, help="self-speculation: draft with layers [0, E)")
    p.add_argument("--speculate_k", type=int, default=6, help="tokens drafted per step")
    p.add_argument("--early_exit", type=int, help="generate with layers [0, E) alone (lossy)")
    p.add_argument("--show_drafts", action="store_true", help="colour accepted drafts in a terminal")
    p.add_argument("--json", action="store_true", help="last stdout line: JSON with every sample")
    args = p.parse_args(argv)
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"unknown device {args.device!r}: use cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda asked for, but no CUDA device is available")
    if args.num_samples < 1:
        fail("--num_samples must be at least 1")
    if args.max_new_tokens < 1:
        fail("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        fail("--temperature must be 0 (greedy) or positive")
    if args.top_k is not None and args.top_k < 1:
        fail("--top_k must be at least 1")
    if args.speculate_k < 1:
        fail("--speculate_k must be at least 1")
    if args.draft_layers is not None and args.early_exit is not None:
        fail("--draft_layers and --early_exit exclude each other")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint_path, args.device, args.dtype)
        tokenizer = load_tokenizer(args.checkpoint_path.parent / "tokenizer.model")
    except (ValueError, OSError) as e:
        fail(str(e))
    exit_layer = args.draft_layers if args.draft_layers is not None else args.early_exit
    if exit_layer is not None:
        flag = "--draft_layers" if args.draft_layers is not None else "--early_exit"
        check_exit_layer(flag, exit_layer, model.args.n_layer)
    if model.args.vocab_size < tokenizer.vocab_size:
        fail(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")

    torch.manual_seed(args.seed)
    on_cuda = args.device.startswith("cuda")
    speculate = args.draft_layers is not None
    k = args.speculate_k if speculate else 0
    if speculate:
        # Imported here: self_spec.py builds on this file's sampling and prefill.
        from self_spec import speculative_generate, speculative_step
    prefill_fn, decode_fn, step_fn = prefill, decode_one_token, (speculative_step if speculate else None)
    if args.compile:
        if on_cuda:
            torch._inductor.config.coordinate_descent_tuning = True
            torch._inductor.config.triton.unique_kernel_names = True
        mode = "reduce-overhead" if on_cuda else "default"
        decode_fn = torch.compile(decode_one_token, mode=mode, fullgraph=True)
        if speculate:
            step_fn = torch.compile(speculative_step, mode=mode, fullgraph=True)
        if args.compile_prefill:
            prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)

    prompts = read_prompts() if args.interactive else [args.prompt]
    results, cache_length = [], 0
    bytes_per_token = weight_bytes(model)
    for prompt_text in prompts:
        prompt_tokens = tokenizer.encode(prompt_text, bos=True)
        context = model.args.max_seq_length
        if len(prompt_tokens) >= context:
            fail(f"prompt is {len(prompt_tokens)} tokens; the model's context of {context} leaves no room")
        max_new_tokens = min(args.max_new_tokens, context - len(prompt_tokens))
        # Self-speculation's last step may write k + 1 positions past the final token.
        needed = len(prompt_tokens) + max_new_tokens + k + 1
        if needed > cache_length:
            cache_length = needed
            with torch.device(args.device):
                model.setup_caches(1, cache_length, exit_layer)
        prompt = torch.tensor(prompt_tokens, device=args.device)
        warmup = 1 if args.compile and not results else 0  # compile once, on the first prompt
        for i in range(warmup + args.num_samples):
            stream = TextStream(tokenizer, prompt_tokens, enabled=i >= warmup, show_drafts=args.show_drafts)
            if stream.enabled:
                print(prompt_text, end="", flush=True)
            if on_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                if speculate:
                    tokens, stats = speculative_generate(
                        model, prompt, max_new_tokens, k, temperature=args.temperature, top_k=args.top_k,
                        eos_id=tokenizer.eos_id, prefill_fn=prefill_fn, step_fn=step_fn, on_tokens=stream)
                else:
                    tokens, stats = generate(
                        model, prompt, max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        eos_id=tokenizer.eos_id, prefill_fn=prefill_fn, decode_fn=decode_fn,
                        early_exit=args.early_exit is not None, on_tokens=stream)
            if on_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if i < warmup:
                print(f"compilation (first sample, not timed): {seconds:.1f} s", file=sys.stderr)
                continue
            tokens_per_sec = len(tokens) / seconds
            sample = {"prompt_tokens": prompt_tokens, "generated_tokens": tokens,
                      "text": stream.text(), "tokens_per_sec": tokens_per_sec, **stats}
            results.append(sample)
            report = f"\n\n{len(tokens)} tokens in {seconds:.2f} s: {tokens_per_sec:.2f} tokens/s"
            report += f", {bytes_per_token * tokens_per_sec / 1e9:.2f} GB/s of weights"
            if stats["acceptance_rate"] is not None:
                report += f", acceptance {stats['acceptance_rate']:.1%}, {stats['tokens_per_step']:.2f} tokens/step"
            print(report + f", peak memory {peak_memory_gb(args.device):.2f} GB", flush=True)
    if args.json:
        print(json.dumps({"samples": results, "checkpoint": str(args.checkpoint_path), "device": args.device,
                          "dtype": str(args.dtype).removeprefix("torch."), "compile": args.compile,
                          "draft_layers": args.draft_layers, "speculate_k": k or None,
                          "early_exit": args.early_exit, "weight_bytes": bytes_per_token,
                          "peak_memory_gb": peak_memory_gb(args.device)}))


if __name__ == "__main__":
    main()
