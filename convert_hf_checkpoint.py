"""Converts a Hugging Face Llama checkpoint folder (or hub repo), or a llama.cpp GGUF file, to the engine's format.

    python convert_hf_checkpoint.py --checkpoint_dir DIR                    # in place
    python convert_hf_checkpoint.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
    python convert_hf_checkpoint.py --gguf FILE.gguf --checkpoint_dir OUT [--quantize int8]

Writes DIR/model.pth (our parameter names, q/k/v fused), DIR/model_config.json, the tokenizer
(tokenizer.model, else tokenizer.json with its tokenizer_config.json and chat template) and
DIR/stop_ids.json (every EOS id of config.json and generation_config.json). Every file is
written under a temporary name and renamed, so an interrupted run never leaves a file that
looks complete.

A GGUF's weights are dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants and the
others the `gguf` package reads) to --dtype, its query/key rows brought back from llama.cpp's RoPE
order; the configuration comes from its metadata, the tokenizer from transformers' conversion of
the same metadata (so the ids are transformers'), the stop ids from its EOS/EOT/EOM ids.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from common import DTYPES, atomic_write, fail, save_checkpoint
from model import ModelArgs
from quantize import GROUP_SIZES, quantize_state
from tokenizer import STOP_IDS_FILE, load_tokenizer

# Hugging Face name (after "model.layers.{i}.") -> ours (after "layers.{i}.")
LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The shards, from the index where there is one; safetensors preferred over .bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = checkpoint_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [checkpoint_dir / s for s in shards]
        files = sorted(checkpoint_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {checkpoint_dir}")


def read_shard(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def convert_state_dict(hf_state: dict, args: ModelArgs) -> dict:
    state = {ours: hf_state[theirs] for theirs, ours in TOP_NAMES.items() if theirs in hf_state}
    for i in range(args.n_layer):
        prefix = f"model.layers.{i}."
        for theirs, ours in LAYER_NAMES.items():
            state[f"layers.{i}.{ours}"] = hf_state[prefix + theirs]
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([hf_state[prefix + name] for name in QKV])
    return state


def convert(checkpoint_dir: Path) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}")
    args = ModelArgs.from_hf_config(json.loads(config_path.read_text()))
    tokenizer = next((p for p in (checkpoint_dir / "tokenizer.model", checkpoint_dir / "original" / "tokenizer.model",
                                  checkpoint_dir / "tokenizer.json") if p.is_file()), None)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.model, original/tokenizer.model or tokenizer.json in {checkpoint_dir}")
    vocab_size = load_tokenizer(tokenizer).vocab_size  # before any write: a bad tokenizer says so now
    if vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but config.json's vocabulary only {args.vocab_size}")
    stop_ids = eos_ids(checkpoint_dir)

    hf_state = {}
    for shard in tqdm(weight_files(checkpoint_dir), desc="reading shards", unit="shard", file=sys.stderr):
        hf_state.update(read_shard(shard))
    try:
        state = convert_state_dict(hf_state, args)
    except KeyError as e:
        raise ValueError(f"{checkpoint_dir} is missing weight {e.args[0]} for a {args.n_layer}-layer Llama") from None

    if stop_ids:
        atomic_write(checkpoint_dir / STOP_IDS_FILE, lambda tmp: write_stop_ids(tmp, stop_ids))
    save_checkpoint(checkpoint_dir, args, state, tokenizer)
    print(f"wrote {checkpoint_dir / 'model.pth'} ({args.n_layer} layers, dim {args.dim})", file=sys.stderr)


def eos_ids(folder: Path) -> list[int]:
    """Every EOS id of config.json and generation_config.json (each an id or a list), in order."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def write_stop_ids(path: Path, stop_ids: list[int]) -> None:
    path.write_text(json.dumps({"stop_ids": stop_ids}) + "\n")


def download(repo_id: str, checkpoint_dir: Optional[Path]) -> Path:
    """Fetches only what conversion reads; the token comes from HF_TOKEN."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, GatedRepoError
    target = checkpoint_dir or Path("checkpoints") / repo_id
    patterns = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja"]
    try:
        snapshot_download(repo_id, local_dir=target, allow_patterns=patterns, token=os.environ.get("HF_TOKEN"))
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id} not found on the hub (or HF_TOKEN lacks access)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"cannot download {repo_id}: {str(e).splitlines()[0]}") from None
    if not any(target.glob("*.safetensors")):  # repos with .bin weights only
        snapshot_download(repo_id, local_dir=target, allow_patterns=["pytorch_model*.bin*"],
                          token=os.environ.get("HF_TOKEN"))
    return target


# GGUF tensor name (after "blk.{i}.") -> ours (after "layers.{i}.")
GGUF_LAYER_NAMES = {
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
GGUF_QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, path: Path) -> ModelArgs:
    """The Llama configuration in a GGUF's metadata (llama.cpp's keys)."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} is a GGUF of the {arch!r} architecture; only llama is supported")
    try:
        n_head = gguf_field(reader, "llama.attention.head_count")
        dim = gguf_field(reader, "llama.embedding_length")
        tensors = {t.name for t in reader.tensors}
        return ModelArgs(
            vocab_size=int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight")),
            dim=dim,
            n_layer=gguf_field(reader, "llama.block_count"),
            n_head=n_head,
            n_kv_head=gguf_field(reader, "llama.attention.head_count_kv", n_head),
            head_dim=gguf_field(reader, "llama.attention.key_length", dim // n_head),
            intermediate_size=gguf_field(reader, "llama.feed_forward_length"),
            norm_eps=gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=gguf_field(reader, "llama.rope.freq_base", 10000.0),
            max_seq_length=gguf_field(reader, "llama.context_length", 2048),
            tie_embeddings="output.weight" not in tensors,
        )
    except (StopIteration, TypeError) as e:
        raise ValueError(f"{path} lacks the metadata of a llama model ({e})") from None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's two RoPE halves (for its rotation of adjacent
    pairs); this brings the rows back to Hugging Face's order (rotate_half), which the engine uses."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(reader, args: ModelArgs, path: Path, dtype: torch.dtype) -> dict:
    """Every weight dequantized to `dtype`, under our names, q/k/v fused."""
    import numpy as np
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} has the type {t.tensor_type.name}, which cannot be "
                             "dequantized here") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        tensors[t.name] = torch.from_numpy(np.array(w, dtype=np.float32).reshape(shape)).to(dtype)  # a copy: off the map
    try:
        state = {ours: tensors[theirs] for theirs, ours in GGUF_TOP_NAMES.items() if theirs in tensors}
        for i in range(args.n_layer):
            for theirs, ours in GGUF_LAYER_NAMES.items():
                state[f"layers.{i}.{ours}"] = tensors[f"blk.{i}.{theirs}"]
            q, k, v = (tensors[f"blk.{i}.{name}"] for name in GGUF_QKV)
            state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([unpermute(q, args.n_head),
                                                                    unpermute(k, args.n_kv_head), v])
        if "tok_embeddings.weight" not in state or "norm.weight" not in state:
            raise KeyError("token_embd.weight" if "tok_embeddings.weight" not in state else "output_norm.weight")
    except KeyError as e:
        raise ValueError(f"{path} is missing tensor {e.args[0]} for a {args.n_layer}-layer llama") from None
    # a tensor the engine has no place for (rope_freqs: Llama 3.1's RoPE scaling; biases) would change
    # the model's output if dropped: refuse rather than convert a different model
    known = set(GGUF_TOP_NAMES) | {f"blk.{i}.{name}" for i in range(args.n_layer)
                                   for name in (*GGUF_LAYER_NAMES, *GGUF_QKV)}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ValueError(f"{path} has tensor {unknown[0]}, which this engine's llama does not have "
                         f"({len(unknown)} such tensors)")
    return state


def gguf_tokenizer(path: Path, folder: Path, vocab_size: int) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja in `folder`, converted from the
    GGUF's metadata by transformers (the tokenizer its from_pretrained(gguf_file=...) builds).

    Tokens transformers adds past the model's vocabulary are dropped: its GPT-2 tokenizer brings
    `<|endoftext|>` as the unknown token where the file's vocabulary has none (Llama 3's has none),
    and no row of the model stands for it."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for a metadata it cannot convert
        raise ValueError(f"{path}: transformers cannot build its tokenizer ({str(e).splitlines()[0]})") from None
    tokenizer.save_pretrained(folder)
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ValueError(f"{path}: transformers built no tokenizer.json from its tokenizer")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype, quantize: Optional[str], groupsize: int) -> None:
    """The engine's files in out_dir from a llama.cpp GGUF; everything is read and checked before
    the first write."""
    import tempfile

    from gguf import GGUFReader
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or foreign file fails in numpy, struct or the reader's own checks
        raise ValueError(f"{path} is not a readable GGUF file, truncated or corrupt ({str(e).splitlines()[0]})") from None
    args = gguf_config(reader, path)
    state = gguf_state_dict(reader, args, path, dtype)
    stop_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = gguf_field(reader, key)
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(int(token_id))
    weights_file = "model.pth"
    if quantize:
        state, notes = quantize_state(state, args, quantize, groupsize if quantize == "int4" else None)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        weights_file = "model_int8.pth" if quantize == "int8" else f"model_int4.g{groupsize}.pth"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf_tokenizer(path, tmp, args.vocab_size)
        vocab_size = load_tokenizer(tmp).vocab_size
        if vocab_size > args.vocab_size:
            raise ValueError(f"{path}: its tokenizer has {vocab_size} tokens but its embedding only {args.vocab_size}")
        if stop_ids:
            write_stop_ids(tmp / STOP_IDS_FILE, stop_ids)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out_dir, args, state, tmp / "tokenizer.json", weights_file)
    print(f"wrote {out_dir / weights_file} ({args.n_layer} layers, dim {args.dim}) from {path.name}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = fail
    parser.add_argument("--checkpoint_dir", type=Path,
                        help="folder with config.json, weights and tokenizer.model or tokenizer.json; with --gguf the output folder")
    parser.add_argument("--repo_id", help="download this hub repo first (e.g. facebook/layerskip-llama3.2-1B)")
    parser.add_argument("--gguf", type=Path, help="convert this llama.cpp GGUF file (Llama architecture) instead")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="with --gguf: the dequantized weights' dtype")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="with --gguf: write the engine's quantized file (model_int8.pth / model_int4.g{G}.pth) instead of model.pth")
    parser.add_argument("--groupsize", type=int, choices=GROUP_SIZES, default=128, help="--quantize int4: input columns per scale")
    args = parser.parse_args(argv)
    if args.gguf is not None and (args.checkpoint_dir is None or args.repo_id is not None):
        parser.error("--gguf needs --checkpoint_dir (the output folder) and no --repo_id")
    if args.gguf is None and args.checkpoint_dir is None and args.repo_id is None:
        parser.error("give --checkpoint_dir, --repo_id or both")
    if args.gguf is None and args.quantize:
        parser.error("--quantize goes with --gguf (quantize.py quantizes a converted checkpoint)")
    try:
        if args.gguf is not None:
            convert_gguf(args.gguf, args.checkpoint_dir, DTYPES[args.dtype], args.quantize, args.groupsize)
            return
        checkpoint_dir = download(args.repo_id, args.checkpoint_dir) if args.repo_id else args.checkpoint_dir
        convert(checkpoint_dir)
    except (ValueError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
