"""Tiny Hugging Face Llama checkpoints, made offline, converted once per test session.

Two styles, as the LayerSkip checkpoints come: "llama2" (untied head, multi-head attention,
SentencePiece) and "llama32" (tied embeddings, grouped-query attention, llama3 rope scaling,
tiktoken); and "json", as most published checkpoints come (tied embeddings, grouped-query
attention, a byte-level BPE tokenizer.json, two EOS ids in generation_config.json, a Llama 3
chat template). Each is saved as safetensors (llama32 sharded, with an index) or as a .bin.
"""
import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_tokenizers import make_sentencepiece_model, make_tiktoken_model, make_tokenizer_json  # noqa: E402

N_LAYER = 6

# Meta's Llama 3 Instruct chat template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The test models are tiny: a second thread only adds synchronisation, and on a busy 2-core machine
# OpenMP threads that wait for each other make small operations many times slower. Subprocesses
# get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs a real model file (SMOLLM2_GGUF); skipped without it")


def hf_config(style: str, vocab_size: int, context: int = 128):
    from transformers import LlamaConfig
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=N_LAYER,
                  max_position_embeddings=context, rms_norm_eps=1e-5,
                  initializer_range=0.3)  # large weights: varied greedy text, few near-ties
    if style == "json":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                           bos_token_id=0, eos_token_id=1)
    if style == "llama2":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_theta=500000.0, bos_token_id=vocab_size - 256, eos_token_id=vocab_size - 255,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


def make_hf_checkpoint(folder: Path, style: str, fmt: str, context: int = 128):
    """Writes an HF checkpoint folder of a model with `context` positions; returns the HF model (float32, eval)."""
    from transformers import LlamaForCausalLM
    from tokenizer import load_tokenizer
    folder.mkdir(parents=True)
    if style == "llama2":
        make_sentencepiece_model(folder / "tokenizer.model")
        tokenizer_path = folder / "tokenizer.model"
    elif style == "json":
        tokenizer_path = make_tokenizer_json(folder)
        (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    else:  # the hub keeps Llama 3's tiktoken file under original/
        (folder / "original").mkdir()
        tokenizer_path = make_tiktoken_model(folder / "original" / "tokenizer.model")
    torch.manual_seed({"llama2": 0, "llama32": 1, "json": 2}[style])
    hf = LlamaForCausalLM(hf_config(style, load_tokenizer(tokenizer_path).vocab_size, context)).eval()
    if fmt == "safetensors":
        hf.save_pretrained(folder, max_shard_size="100KB" if style == "llama32" else "1GB")
    else:
        hf.config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    if style == "json":  # Llama 3 instruct's way: <|end_of_text|> and <|eot_id|> both end a reply
        (folder / "generation_config.json").write_text('{"bos_token_id": 0, "eos_token_id": [1, 4]}')
    return hf


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """(style, fmt, context) -> (path of the converted model.pth, HF model), made on first use."""
    from convert_hf_checkpoint import convert
    made = {}

    def get(style: str, fmt: str = "safetensors", context: int = 128):
        if (style, fmt, context) not in made:
            folder = tmp_path_factory.mktemp("ckpt") / f"{style}-{fmt}-{context}"
            hf = make_hf_checkpoint(folder, style, fmt, context)
            convert(folder)
            made[style, fmt, context] = (folder / "model.pth", hf)
        return made[style, fmt, context]

    return get


def free_port() -> int:
    """A port of 127.0.0.1 free now (for a server or a process group the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stand_in_model(context: int, device: str = "cpu") -> SimpleNamespace:
    """What generate_batch reads of a model (its device and context), for scripted steps."""
    return SimpleNamespace(tok_embeddings=SimpleNamespace(weight=torch.empty(0, device=device)),
                           args=SimpleNamespace(max_seq_length=context))


def write_task(folder, name: str, docs: list[dict], config: str) -> None:
    """A harness task over a local JSONL file; datasets' cache goes into the test's folder."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.jsonl'}\n  cache_dir: {folder / 'hf_cache'}\n"
        "test_split: test\n" + config)
