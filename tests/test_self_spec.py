"""Self-speculative decoding returns exactly what the full model would, token for token under greedy
decoding (the distribution under sampling: test_batch.py), and compiles to one graph."""
import json

import pytest
import torch

from common import generate
from conftest import N_LAYER
from model import Transformer, load_model
from self_spec import speculative_generate
from test_generate import json_result, run_generate
from tokenizer import load_tokenizer

MAX_NEW = 37  # a multiple of none of k + 1 = 2, 4, 9


def greedy(model, prompt, exit_layer=None, k=0, eos_id=-1, max_new=MAX_NEW):
    model.setup_caches(1, len(prompt) + max_new + k + 1, exit_layer)
    with torch.inference_mode():
        if k:
            return speculative_generate(model, prompt, max_new, k, temperature=0, top_k=None, eos_id=eos_id)
        return generate(model, prompt, max_new, temperature=0, top_k=None, eos_id=eos_id)


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
        tokens, _ = greedy(model, prompt, N_LAYER - 2, k=3, eos_id=eos_id)
        assert tokens == reference[: first + 1]
    for max_new in (1, 2, 6):
        tokens, _ = greedy(model, prompt, N_LAYER - 2, k=3, max_new=max_new)
        assert tokens == reference[:max_new]


# --- compiled: one graph, no host sync, no recompiles -----------------------------------------

def test_compiled_steps_are_one_graph_and_exact(checkpoints, tmp_path):
    """--compile compiles the step with fullgraph=True: any .item(), .tolist() or branch on a tensor
    value inside it is a graph break and fails. Then it must replay without recompiling: across
    steps, across the rows of a batch at different positions, and across refills."""
    path, _ = checkpoints("llama2")
    texts = ["def add(a, b):", "class A:", "for i in range(3):"]
    tokenizer = load_tokenizer(path.parent / "tokenizer.model")
    model = load_model(path)
    reference = [greedy(model, torch.tensor(tokenizer.encode(t)), eos_id=tokenizer.eos_id, max_new=30)[0] for t in texts]
    env = {"TORCH_LOGS": "recompiles"}
    common = ("--checkpoint_path", str(path), "--max_new_tokens", "30", "--temperature", "0")
    proc = run_generate(*common, "--prompt", texts[0], "--compile", "--json", env=env)
    assert json_result(proc)["samples"][0]["generated_tokens"] == reference[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    spec = run_generate(*common, "--compile", "--draft_layers", "3", "--speculate_k", "3", "--prompts_file", str(prompts),
                        "--batch_size", "2", "--output", str(out), env=env)
    assert spec.returncode == 0, spec.stderr
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    assert [r["generated_tokens"] for r in records] == reference
    for p in (proc, spec):
        assert "compilation (not timed)" in p.stderr
        assert "recompil" not in p.stderr.lower(), p.stderr[-2000:]
