"""Load benchmark for serve.py: servers with and without self-speculation under concurrent requests.

    python serve_benchmark.py --checkpoint_path DIR/model.pth --draft_layers 3 --speculate_k 0,6,auto \\
        --concurrency 1,4,16 --dataset humaneval --num_prompts 32 --max_tokens 128 --batch_size 16 --compile

For each k (0: an autoregressive server) it starts serve.py on a free port of 127.0.0.1, waits
until it has compiled and listens, and sends the prompts at each concurrency - that many requests
in flight, the next sent as one ends - greedy and streamed: requests/s, generated tokens/s, time
to first token and inter-token latency (p50 and p99), and the acceptance rate from the server's
/metrics. Every text is checked against generate.py's greedy text for the same prompt, and
generate.py's own tokens/s on the same prompts one at a time is the yardstick for concurrency 1.
The traffic stays on this machine and every loop is bounded by the number of prompts.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmark import environment, load_prompts, markdown_table
from common import fail
from self_spec import parse_speculate_k
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def decoding_flags(args: argparse.Namespace, k) -> list[str]:
    flags = ["--checkpoint_path", str(args.checkpoint_path)]
    if k != 0:
        flags += ["--draft_layers", str(args.draft_layers), "--speculate_k", str(k)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags + (["--compile"] if args.compile else [])


def reference_run(args: argparse.Namespace, k, prompts: list[dict], folder: Path) -> dict:
    """generate.py on the prompts one at a time: each prompt's text, and tokens/s over them all."""
    prompts_file, output = folder / "prompts.jsonl", folder / f"generate_{k}.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prompts))
    cmd = [sys.executable, str(ROOT / "generate.py"), *decoding_flags(args, k), "--prompts_file", str(prompts_file),
           "--batch_size", "1", "--temperature", "0", "--max_new_tokens", str(args.max_tokens), "--output", str(output)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        fail(f"generate.py failed: {run.stderr.strip().splitlines()[-1]}")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    tokens = sum(len(r["generated_tokens"]) for r in records)
    return {"texts": {r["prompt"]: r["text"] for r in records}, "tokens_per_sec": tokens / sum(r["seconds"] for r in records)}


def start_server(args: argparse.Namespace, k) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), *decoding_flags(args, k), "--batch_size", str(args.batch_size),
           "--port", str(port), "--model_name", "bench", "--max_queue", str(max(256, args.num_prompts))]
    env = {k_: v for k_, v in os.environ.items() if k_ != "LAYERSKIP_API_KEY"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"serve.py exited while starting: {proc.stderr.read().strip().splitlines()[-1]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    fail(f"serve.py did not listen within {args.start_timeout} s")


def counters(url: str) -> dict[str, float]:
    import httpx
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion: its text, tokens and timings."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, text, tokens = time.perf_counter(), None, "", 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["text"] and first is None:
                    first = time.perf_counter()
                text += choice["text"]
    end = time.perf_counter()
    first = first or end
    return {"prompt": prompt, "text": text, "tokens": tokens, "ttft": first - sent,
            "itl": (end - first) / (tokens - 1) if tokens > 1 else None}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    """Every prompt once, `concurrency` requests in flight; the results and the wall time."""
    import httpx
    todo, results = list(prompts), []
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        async def worker():
            while todo:
                results.append(await one_request(client, todo.pop(0), max_tokens))
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return results, time.perf_counter() - t0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail
    p.add_argument("--checkpoint_path", type=Path, required=True)
    p.add_argument("--draft_layers", type=int, help="the exit layer of the self-speculative servers")
    p.add_argument("--speculate_k", default="0,6,auto",
                   help="servers to measure: 0 (autoregressive), a number of drafts per step, or auto; comma-separated")
    p.add_argument("--concurrency", default="1,4,16", help="requests in flight, comma-separated")
    p.add_argument("--dataset", default="humaneval", help="humaneval, stdlib or jsonl:PATH (benchmark.py's)")
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16, help="the servers' cache rows")
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--start_timeout", type=float, default=3600, help="seconds a server may take to compile and listen")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    try:
        args.ks = [0 if k == "0" else parse_speculate_k(k) for k in args.speculate_k.split(",")]
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as e:
        fail(f"--speculate_k / --concurrency: {e}")
    if any(k != 0 for k in args.ks) and args.draft_layers is None:
        fail("--speculate_k other than 0 needs --draft_layers")
    if min(args.levels) < 1 or args.num_prompts < 1 or args.max_tokens < 1:
        fail("--concurrency, --num_prompts and --max_tokens must be at least 1")
    if not args.checkpoint_path.is_file():
        fail(f"checkpoint not found: {args.checkpoint_path}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.checkpoint_path.parent)
    context = json.loads((args.checkpoint_path.parent / "model_config.json").read_text())["max_seq_length"]
    entries = load_prompts(args.dataset, None, 0)
    fits = [e for e in entries if len(tokenizer.encode(e["prompt"], bos=True)) + args.max_tokens <= context]
    prompts = fits[: args.num_prompts]
    if not prompts:
        fail(f"no prompt of {args.dataset} fits the context of {context} tokens with --max_tokens {args.max_tokens}")
    print(f"{len(prompts)} prompts of {args.dataset} ({len(entries) - len(fits)} longer than the context left out), "
          f"max_tokens {args.max_tokens}, {args.batch_size} rows per server", file=sys.stderr)
    rows, yardsticks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            name = "AR" if k == 0 else f"k={k}"
            print(f"{name}: generate.py one prompt at a time", file=sys.stderr)
            reference = reference_run(args, k, prompts, Path(tmp))
            yardsticks[name] = reference["tokens_per_sec"]
            print(f"{name}: starting the server", file=sys.stderr)
            proc, url = start_server(args, k)
            try:
                asyncio.run(load(url, [prompts[0]["prompt"]], 1, 8))  # pages the weights in
                for level in args.levels:
                    before = counters(url)
                    results, seconds = asyncio.run(load(url, [p["prompt"] for p in prompts], level, args.max_tokens))
                    after = counters(url)
                    drafted = after["layerskip_draft_tokens_total"] - before["layerskip_draft_tokens_total"]
                    accepted = after["layerskip_accepted_tokens_total"] - before["layerskip_accepted_tokens_total"]
                    tokens = sum(r["tokens"] for r in results)
                    itl = [r["itl"] for r in results if r["itl"] is not None]
                    row = {"server": name, "concurrency": level, "requests_per_sec": len(results) / seconds,
                           "tokens_per_sec": tokens / seconds, "ttft_p50": percentile([r["ttft"] for r in results], 0.5),
                           "ttft_p99": percentile([r["ttft"] for r in results], 0.99), "itl_p50": percentile(itl, 0.5),
                           "itl_p99": percentile(itl, 0.99), "acceptance": accepted / drafted if drafted else None,
                           "equal": sum(r["text"] == reference["texts"][r["prompt"]] for r in results),
                           "requests": len(results), "generate_tokens_per_sec": reference["tokens_per_sec"]}
                    rows.append(row)
                    print(f"  concurrency {level}: {row['tokens_per_sec']:.1f} tokens/s, "
                          f"{row['equal']}/{len(results)} texts equal to generate.py's", file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def cell(key, spec, scale=1.0):
        return lambda row: "-" if row[key] is None else format(row[key] * scale, spec)
    print(markdown_table(rows, [
        ("server", lambda r: r["server"]), ("concurrency", lambda r: str(r["concurrency"])),
        ("requests/s", cell("requests_per_sec", ".2f")), ("tokens/s", cell("tokens_per_sec", ".1f")),
        ("vs AR", lambda r: next((format(r["tokens_per_sec"] / a["tokens_per_sec"], ".2f") + "x" for a in rows
                                  if a["server"] == "AR" and a["concurrency"] == r["concurrency"]), "-")),
        ("TTFT p50 / p99 ms", lambda r: f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f}"),
        ("ITL p50 / p99 ms", lambda r: "-" if r["itl_p50"] is None else f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f}"),
        ("acceptance", cell("acceptance", ".1%")), ("equal to generate.py", lambda r: f"{r['equal']}/{r['requests']}")]))
    for name, tps in yardsticks.items():
        one = next((r for r in rows if r["server"] == name and r["concurrency"] == 1), None)
        ratio = f" (the server at concurrency 1: {one['tokens_per_sec'] / tps:.2f}x)" if one else ""
        print(f"generate.py {name}, one prompt at a time: {tps:.1f} tokens/s{ratio}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "environment": environment("cpu"), "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    main()
