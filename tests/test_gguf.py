"""convert_hf_checkpoint.py --gguf against transformers' GGUF loading, on GGUF files written here with
the gguf package's writer from a tiny Llama, the way llama.cpp's converter writes them: q/k rows in
its RoPE order, F32 / F16 / Q8_0 / Q4_0 / Q4_1 tensors, a BPE or a SentencePiece tokenizer in the metadata."""
import json
import shutil

import numpy as np
import pytest
import torch

import convert_hf_checkpoint
from conftest import hf_config
from tiny_tokenizers import make_sentencepiece_model, make_tokenizer_json
from tokenizer import load_tokenizer

SP_VOCAB = 320
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's RoPE halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(writer, kind: str, folder):
    """The tokenizer keys llama.cpp writes: gpt2 (byte-level BPE) or llama (SentencePiece)."""
    import gguf
    if kind == "bpe":
        vocab = json.loads((folder / "tokenizer.json").read_text())["model"]
        tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_eot_token_id(4)
        writer.add_add_bos_token(True)
        return len(tokens)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    return sp.vocab_size()


def write_gguf(path, kind: str, arch: str = "llama", seed: int = 0):
    """A GGUF of a tiny random Llama; returns the HF model whose weights it holds (before quantization)."""
    import gguf
    from transformers import LlamaForCausalLM
    from gguf.quants import quantize
    folder = path.parent / f"{path.stem}-tokenizer"
    if kind == "bpe":
        make_tokenizer_json(folder)
    else:
        make_sentencepiece_model(folder / "tokenizer.model", SP_VOCAB)
    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = tokenizer_metadata(writer, kind, folder)
    config = hf_config("json" if kind == "bpe" else "llama2", vocab_size)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    # each kind of tensor llama.cpp's quantized files mix
    types = [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
             gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32]
    for n, (name, w) in enumerate(hf.state_dict().items()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{layer_names[rest.removesuffix('.weight')]}.weight"
        else:
            gguf_name = names[name]
        w = w.numpy()
        if "attn_q" in gguf_name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif "attn_k" in gguf_name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32 if w.ndim == 1 else types[n % len(types)]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, w)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(w, qtype), raw_dtype=qtype)  # the shape from the bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def converted(request, tmp_path_factory):
    """(GGUF path, converted folder, transformers' model and tokenizer loaded from the same GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.gguf"
    write_gguf(path, request.param)
    out = root / "converted"
    convert_hf_checkpoint.main(["--gguf", str(path), "--checkpoint_dir", str(out)])
    hf = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    return path, out, hf, AutoTokenizer.from_pretrained(root, gguf_file=path.name)


TEXTS = ["def add(a, b):\n    return a + b", "The quick brown fox, 日本 🙂", "  spaces  and\nlines "]


def test_tokens_logits_and_greedy_equal_transformers_gguf(converted):
    from common import generate
    from model import load_model
    path, out, hf, ref = converted
    tokenizer = load_tokenizer(out)
    for text in TEXTS:
        assert tokenizer.encode(text) == ref(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == ref.decode(ref(text, add_special_tokens=False)["input_ids"])
    model = load_model(out / "model.pth", "cpu", torch.float32)
    assert model.args.n_kv_head == hf.config.num_key_value_heads and model.args.tie_embeddings == hf.config.tie_word_embeddings
    prompt = tokenizer.encode(TEXTS[0])
    x = torch.tensor([prompt])
    with torch.inference_mode():
        model.setup_caches(1, len(prompt) + 21)
        ours = model(x, torch.arange(len(prompt))[None])
        theirs = hf(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        model.setup_caches(1, len(prompt) + 21)
        tokens = generate(model, x[0], 20, temperature=0, top_k=None, stop_ids=set())[0]
        expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == expected
    stop_ids = json.loads((out / "stop_ids.json").read_text())["stop_ids"]
    assert stop_ids == ([1, 4] if "<|eot_id|>" in ref.get_vocab() else [2])  # EOS, and EOT where the file has one
    assert load_tokenizer(out).chat_template == CHAT_TEMPLATE


def test_rope_rows_are_brought_back(converted):
    """The q/k rows are the Hugging Face model's own again (a Q8_0/Q4 round trip away)."""
    path, out, hf, _ = converted
    state = torch.load(out / "model.pth", weights_only=True)
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(state["layers.1.attention.wqkv.weight"][: q.shape[0]], q, atol=1e-6)


def test_quantize_straight_to_the_engines_file(converted, tmp_path):
    """--quantize int4 writes what quantize.py makes of the float conversion, and no model.pth."""
    import quantize
    path, out, _, _ = converted
    convert_hf_checkpoint.main(["--gguf", str(path), "--checkpoint_dir", str(tmp_path), "--quantize", "int4",
                                "--groupsize", "32"])
    assert not (tmp_path / "model.pth").exists()
    quantize.main(["--checkpoint_path", str(out / "model.pth"), "--mode", "int4", "--groupsize", "32",
                   "--output", str(tmp_path / "reference.pth")])
    ours, reference = (torch.load(tmp_path / name, weights_only=True) for name in ("model_int4.g32.pth", "reference.pth"))
    assert ours.keys() == reference.keys() and "layers.0.attention.wqkv.codes" in ours
    assert all(torch.equal(ours[k], reference[k]) if isinstance(ours[k], torch.Tensor) else ours[k] == reference[k]
               for k in ours)


def error_line(capsys, *flags: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert_hf_checkpoint.main(list(flags))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and lines[-1].startswith("error: "), lines
    assert not any(line.startswith("error: ") for line in lines[:-1]), lines
    return lines[-1]


def test_bad_gguf_files_give_one_clear_line_and_write_nothing(tmp_path, capsys):
    import gguf
    good = tmp_path / "good.gguf"
    write_gguf(good, "bpe")
    out = tmp_path / "out"

    for cut in (good.stat().st_size * 2 // 3, 200):  # inside the tensors' data, inside the metadata
        (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:cut])
        line = error_line(capsys, "--gguf", str(tmp_path / "cut.gguf"), "--checkpoint_dir", str(out))
        assert "is not a readable GGUF file, truncated or corrupt" in line

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert "'gpt2' architecture" in error_line(capsys, "--gguf", str(other), "--checkpoint_dir", str(out))

    def rewrite(name: str, int8_tensor: str = "", extra: str = "") -> str:
        """The good file again, one tensor made int8 (a type no dequantizer reads), one tensor added."""
        reader = gguf.GGUFReader(good)
        writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
        for field in reader.fields.values():
            if not field.name.startswith(("GGUF.", "general.architecture")):
                writer.add_key_value(field.name, field.contents(), field.types[0],
                                     field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for t in reader.tensors:
            quantized = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            if t.name == int8_tensor:
                writer.add_tensor(t.name, np.zeros(t.data.shape, np.int8))
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type if quantized else None)
        if extra:
            writer.add_tensor(extra, np.ones(8, np.float32))
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
        return str(tmp_path / name)

    line = error_line(capsys, "--gguf", rewrite("int8.gguf", int8_tensor="blk.2.attn_norm.weight"), "--checkpoint_dir", str(out))
    assert "blk.2.attn_norm.weight has the type I8" in line
    # Llama 3.1's RoPE scaling, which llama.cpp writes as a tensor of frequency factors: not dropped silently
    line = error_line(capsys, "--gguf", rewrite("rope.gguf", extra="rope_freqs.weight"), "--checkpoint_dir", str(out))
    assert "has tensor rope_freqs.weight, which this engine's llama does not have" in line

    assert "GGUF file not found" in error_line(capsys, "--gguf", str(tmp_path / "nope.gguf"), "--checkpoint_dir", str(out))
    assert "--gguf needs --checkpoint_dir" in error_line(capsys, "--gguf", str(good))
    assert "--quantize goes with --gguf" in error_line(capsys, "--checkpoint_dir", str(out), "--quantize", "int8")
    assert not out.exists()  # nothing half-written, not even the folder
