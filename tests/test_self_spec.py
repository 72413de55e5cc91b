"""Self-speculative decoding returns exactly what the full model would: token for token under
greedy decoding, and in distribution under sampling."""
import math

import pytest
import torch

from conftest import N_LAYER
from generate import generate, logits_to_probs
from model import ModelArgs, Transformer, load_model
from self_spec import speculative_generate
from test_generate import json_result, run_generate

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


# --- sampling: the output distribution is the full model's -------------------------------------

VOCAB, TEMPERATURE, TOP_K, SAMPLES, EXIT = 6, 0.9, 4, 3000, 1
PROMPT = torch.tensor([0, 3, 1])


def tiny_vocab_model() -> Transformer:
    torch.manual_seed(3)
    args = ModelArgs(vocab_size=VOCAB, dim=32, n_layer=4, n_head=2, n_kv_head=1, head_dim=16,
                     intermediate_size=64, max_seq_length=32)
    model = Transformer(args).eval()
    model.setup_caches(1, 16, EXIT)
    return model


def exact_joint(model: Transformer, early_exit: bool) -> torch.Tensor:
    """P(t1, t2) for the 2nd and 3rd generated tokens (t0 comes from the prefill), summed over t0."""
    def next_probs(seq):
        with torch.inference_mode():
            h = model.early(seq[None], torch.arange(len(seq)))
            logits = model.head(h if early_exit else model.late(h, torch.arange(len(seq))))
        return logits_to_probs(logits[0, -1], TEMPERATURE, TOP_K).double()

    joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    p0 = next_probs(PROMPT)
    for t0 in range(VOCAB):
        p1 = next_probs(torch.cat([PROMPT, torch.tensor([t0])]))
        for t1 in range(VOCAB):
            p2 = next_probs(torch.cat([PROMPT, torch.tensor([t0, t1])]))
            joint[t1] += p0[t0] * p1[t1] * p2
    return joint


def empirical_joint(sample_fn) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(SAMPLES):
            tokens = sample_fn()
            counts[tokens[1], tokens[2]] += 1
    return counts / SAMPLES


def test_sampling_matches_the_full_model_and_the_test_has_power():
    # Bretagnolle-Huber-Carol: P(TV(empirical, true) >= eps) <= 2^m exp(-2 N eps^2) over m cells.
    # With m = 36 and N = 3000, eps below fails a correct sampler with probability at most 1e-4.
    eps = math.sqrt((VOCAB**2 * math.log(2) + math.log(1e4)) / (2 * SAMPLES))
    model = tiny_vocab_model()
    full, early_only = exact_joint(model, False), exact_joint(model, True)
    assert 0.5 * (full - early_only).abs().sum() > 2 * eps  # the drafts alone are far from the target

    torch.manual_seed(0)
    kwargs = dict(temperature=TEMPERATURE, top_k=TOP_K, eos_id=-1)
    speculative = empirical_joint(lambda: speculative_generate(model, PROMPT, 3, 2, **kwargs)[0])
    early_exit = empirical_joint(lambda: generate(model, PROMPT, 3, early_exit=True, **kwargs)[0])
    assert 0.5 * (speculative - full).abs().sum() < eps
    assert 0.5 * (early_exit - full).abs().sum() > eps  # the same bound rejects the wrong sampler


# --- compiled: one graph, no host sync, no recompiles -----------------------------------------

def test_compiled_step_is_one_graph_and_exact(checkpoints):
    """--compile compiles the step with fullgraph=True: any .item(), .tolist() or branch on a tensor
    value inside it is a graph break and fails. Then it must replay without recompiling."""
    path, _ = checkpoints("llama2")
    common = ("--checkpoint_path", str(path), "--prompt", "def add(a, b):", "--max_new_tokens", "30",
              "--temperature", "0", "--json")
    reference = json_result(run_generate(*common))["samples"][0]["generated_tokens"]
    for flags in (("--compile",), ("--compile", "--draft_layers", "3", "--speculate_k", "3", "--num_samples", "2")):
        proc = run_generate(*common, *flags, env={"TORCH_LOGS": "recompiles"})
        for sample in json_result(proc)["samples"]:
            assert sample["generated_tokens"] == reference, flags
        assert "compilation (first sample, not timed)" in proc.stderr
        assert "Recompiling" not in proc.stderr and "recompil" not in proc.stderr.lower(), proc.stderr[-2000:]
