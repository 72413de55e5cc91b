"""Tensor parallelism over gloo on this CPU: two ranks give the single process's logits and tokens
(autoregressive, self-speculative, batched, quantized), agree on sampled tokens, compile to one
graph each, and refuse a model that does not split with one line and no hang."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import cpu_kernels
import quantize
import tp
from common import save_checkpoint
from conftest import ROOT, free_port
from model import ModelArgs, Transformer, load_model
from test_self_spec import greedy

PROMPT = [1, 40, 41, 42, 43, 44, 45]


def outputs(model: Transformer) -> dict:
    """What a rank (or the single process) computes: logits of the prompt, greedy tokens
    autoregressive and self-speculative, tokens sampled with a fixed seed."""
    model.setup_caches(1, len(PROMPT) + 40)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None])
    prompt = torch.tensor(PROMPT)
    out = {"logits": logits, "ar": greedy(model, prompt, max_new=20)[0], "spec": greedy(model, prompt, 2, 3, max_new=20)[0]}
    from self_spec import speculative_generate
    torch.manual_seed(7)
    model.setup_caches(1, len(PROMPT) + 30, 2)
    with torch.inference_mode():
        out["sampled"] = speculative_generate(model, prompt, 20, 3, temperature=0.8, top_k=50, stop_ids=set())[0]
    return out


def rank_worker(rank: int, world: int, port: int, paths: list, results: str) -> None:
    """One rank, as torchrun would start it (its environment variables), through tp.setup."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    _, _, device = tp.setup("cpu")
    found = {}
    for path in paths:
        model = load_model(path, device, torch.float32, shard=tp.shard(rank, world))
        tp.add_collectives(model)
        found[str(path)] = outputs(model)
        found[str(path)]["kv_heads"] = model.layers[0].attention.kv_cache.k.shape[1]
    torch.save(found, f"{results}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def int4_friendly(tmp_path_factory, checkpoints):
    """A tiny model whose widths still hold whole int4 groups of 32 when split in two, and its
    int4 file (the conftest models' MLP width, 160, does not)."""
    folder = tmp_path_factory.mktemp("tp") / "tiny"
    folder.mkdir()
    torch.manual_seed(5)
    args = ModelArgs(vocab_size=320, dim=64, n_layer=4, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128,
                     max_seq_length=128)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 2 else 1.0)
    save_checkpoint(folder, args, model.state_dict(), checkpoints("llama2")[0].parent / "tokenizer.model")
    quantize.main(["--checkpoint_path", str(folder / "model.pth"), "--mode", "int4", "--groupsize", "32"])
    return folder / "model_int4.g32.pth"


def test_two_ranks_equal_one_process(checkpoints, int4_friendly, tmp_path, monkeypatch):
    """Float files: the single process's logits (to float reassociation) and tokens. The int8 and
    int4 files: their kernels round each input to 8 bits, which turns the ranks' different order of
    summing a row-parallel layer into other codes now and then, so their logits are held to twice
    what that rounding itself moves them (the file through PyTorch's kernels, float activations)
    and their self-speculative tokens to the ranks' own autoregressive ones."""
    llama2, llama32 = checkpoints("llama2")[0], checkpoints("llama32")[0]
    quantize.main(["--checkpoint_path", str(llama32), "--mode", "int8", "--output", str(tmp_path / "int8.pth")])
    for name in ("model_config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((llama32.parent / name).read_bytes())
    paths = [llama2, llama32, tmp_path / "int8.pth", int4_friendly]
    mp.spawn(rank_worker, args=(2, free_port(), paths, str(tmp_path / "results")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"results.{r}", weights_only=True) for r in (0, 1)]
    def error(logits, reference):
        return ((logits - reference).norm() / reference.norm()).item()

    quantized = (tmp_path / "int8.pth", int4_friendly)
    for path in paths:
        single = outputs(load_model(path))
        bound = 1e-4
        if path in quantized:
            with monkeypatch.context() as patch:
                patch.setattr(cpu_kernels, "isa", "")
                bound = 2 * error(single["logits"], outputs(load_model(path))["logits"])
            assert 0 < bound < 0.5
        for found in ranks:
            got = found[str(path)]
            assert error(got["logits"], single["logits"]) < bound, (path, error(got["logits"], single["logits"]), bound)
            assert got["spec"] == got["ar"], path
            assert path in quantized or got["ar"] == single["ar"], path
            assert got["kv_heads"] == load_model(path).args.n_kv_head // 2  # each rank caches only its heads
        assert ranks[0][str(path)]["sampled"] == ranks[1][str(path)]["sampled"], path  # the ranks draw alike


@pytest.mark.parametrize("world, change, message", [
    (3, {}, "4 attention heads do not split evenly over 3"),
    (4, {}, "2 key/value heads do not split evenly over 4"),  # more ranks than KV heads
    (2, {"intermediate_size": 161, "n_head": 2, "n_kv_head": 2}, "161 MLP hidden width"),
    (2, {"vocab_size": 321}, "321 vocabulary"),
])
def test_shapes_that_do_not_split_are_refused(world, change, message):
    args = ModelArgs(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=160)
    with torch.device("meta"):
        model = Transformer(ModelArgs(**{**args.__dict__, **change}))
    with pytest.raises(ValueError, match=message):
        tp.check(model, world, None)


def test_int4_groups_stay_whole():
    with torch.device("meta"):
        model = Transformer(ModelArgs(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                                      intermediate_size=160))
    tp.check(model, 2, {"mode": "int4", "groupsize": 16})  # 80 columns a rank: five whole groups
    with pytest.raises(ValueError, match="MLP output projection's 160 input columns split over 2 processes cut its int4 groups of 32"):
        tp.check(model, 2, {"mode": "int4", "groupsize": 32})


def torchrun(n: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           str(ROOT / "generate.py"), "--device", "cpu", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def test_compiled_batched_generation_under_torchrun(checkpoints, tmp_path):
    """Both ranks compile the self-speculative step once and replay it with no recompiles across
    steps and refills; rank 0 alone writes the output, which equals the single process's."""
    path, _ = checkpoints("llama32")
    texts = ["def add(a, b):", "class A:", "for i in range(3):"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    flags = ["--checkpoint_path", str(path), "--prompts_file", str(prompts), "--batch_size", "2", "--temperature", "0",
             "--max_new_tokens", "24", "--draft_layers", "2", "--speculate_k", "3"]
    proc = torchrun(2, *flags, "--compile", "--output", str(tmp_path / "tp.jsonl"), env={"TORCH_LOGS": "recompiles"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recompil" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert proc.stderr.count("compilation (not timed)") == 1  # rank 0 alone reports
    import generate
    generate.main([*flags, "--output", str(tmp_path / "single.jsonl")])
    tokens = [[json.loads(line)["generated_tokens"] for line in (tmp_path / name).read_text().splitlines()]
              for name in ("tp.jsonl", "single.jsonl")]
    assert sorted(tokens[0]) == sorted(tokens[1]) and len(tokens[0]) == 3


def test_a_model_that_does_not_split_gives_one_line_and_no_hang(checkpoints):
    proc = torchrun(3, "--checkpoint_path", str(checkpoints("llama2")[0]), "--max_new_tokens", "4")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: the model's 4 attention heads do not split evenly over 3 processes"], proc.stderr[-2000:]
