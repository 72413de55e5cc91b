"""Parity with Hugging Face transformers on the same weights, through the converter."""

import pytest
import torch

from common import generate
from model import ModelArgs, Transformer, load_model
from tokenizer import load_tokenizer

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
CASES = [("llama2", "safetensors"), ("llama2", "bin"), ("llama32", "safetensors"), ("llama32", "bin")]


@pytest.mark.parametrize("style,fmt", CASES)
def test_logits_and_greedy_tokens_match_transformers(checkpoints, style, fmt):
    path, hf = checkpoints(style, fmt)
    prompt = load_tokenizer(path.parent / "tokenizer.model").encode(PROMPT)
    model = load_model(path)
    model.setup_caches(1, 128)
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        ours = model(ids[None], torch.arange(len(prompt))[None])
        theirs = hf(ids[None]).logits
    assert (ours - theirs).norm() / theirs.norm() < 1e-4

    with torch.inference_mode():
        ref = hf.generate(ids[None], max_new_tokens=48, do_sample=False)[0, len(prompt):].tolist()
        tokens, _ = generate(model, ids, 48, temperature=0, top_k=None, stop_ids={hf.config.eos_token_id})
    assert len(set(ref)) > 5  # a degenerate model (one repeated token) would prove little
    assert tokens == ref


def test_converted_config(checkpoints):
    path, hf = checkpoints("llama32")
    args = ModelArgs.load(path.parent / "model_config.json")
    assert (args.n_layer, args.n_head, args.n_kv_head, args.tie_embeddings) == (6, 4, 2, True)
    assert args.rope_base == 500000.0 and args.rope_scaling["factor"] == 8.0
    assert "output.weight" not in torch.load(path, weights_only=True)  # tied: stored once
    assert (path.parent / "tokenizer.model").read_bytes() == (path.parent / "original" / "tokenizer.model").read_bytes()


def test_config_of_released_checkpoints():
    """The LayerSkip checkpoints' config.json uses the pre-transformers-5 rope keys."""
    config = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    args = ModelArgs.from_hf_config(config)
    assert (args.head_dim, args.n_kv_head, args.rope_base, args.rope_scaling["factor"]) == (64, 8, 500000.0, 32.0)
    config.pop("rope_scaling")
    assert ModelArgs.from_hf_config(config).rope_scaling is None
    with pytest.raises(ValueError, match="rope type"):
        ModelArgs.from_hf_config({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_stale_cache_entries_are_never_read(checkpoints):
    """Garbage written past the current position must not change the logits."""
    path, _ = checkpoints("llama2")
    model = load_model(path)
    model.setup_caches(1, 64)
    ids = torch.randint(0, 300, (1, 10))
    with torch.inference_mode():
        clean = model(ids, torch.arange(10)[None])
        for layer in model.layers:
            layer.attention.kv_cache.k[:, :, 10:].normal_()
            layer.attention.kv_cache.v[:, :, 10:].normal_()
        again = model(ids, torch.arange(10)[None])
    assert torch.equal(clean, again)


def test_caches_take_the_activations_dtype_and_device():
    """setup_caches allocates in the embedding's dtype and on its device (meta stands in for a GPU):
    a bfloat16 model's caches are bfloat16, half a float32 cache's memory, and a forward pass reads
    them; the row index that writes the exit cache lives on the device too."""
    args = ModelArgs(vocab_size=32, dim=16, n_layer=2, n_head=2, n_kv_head=1, head_dim=8, intermediate_size=32)
    for device, dtype in (("cpu", torch.bfloat16), ("meta", torch.float32)):
        with torch.device(device):
            model = Transformer(args).to(dtype)
        model.setup_caches(3, 20, exit_layer=1)
        caches = [t for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
        assert all(t.shape == (3, 1, 20, 8) for t in caches) and model.exit_cache.shape == (3, 20, 16)
        for t in [*caches, model.exit_cache]:
            assert t.device.type == device and t.dtype == dtype, (device, t.dtype)
        assert model.every_row.device.type == device and model.every_row.shape == (3, 1)
        if device == "cpu":
            with torch.inference_mode():
                logits = model(torch.tensor([[1, 2]] * 3), torch.tensor([[0, 1]] * 3))
            assert logits.dtype == torch.bfloat16 and logits.shape == (3, 2, 32) and model.exit_cache[:, :2].any()
