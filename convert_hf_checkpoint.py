"""Converts a Hugging Face Llama checkpoint folder (or hub repo) to the engine's format.

Writes DIR/model.pth (our parameter names, q/k/v fused), DIR/model_config.json, the tokenizer
(tokenizer.model, else tokenizer.json with its tokenizer_config.json and chat template) and
DIR/stop_ids.json (every EOS id of config.json and generation_config.json). Every file is
written under a temporary name and renamed, so an interrupted run never leaves a file that
looks complete.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from common import atomic_write, fail, save_checkpoint
from model import ModelArgs
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


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = fail
    parser.add_argument("--checkpoint_dir", type=Path, help="folder with config.json, weights and tokenizer.model or tokenizer.json")
    parser.add_argument("--repo_id", help="download this hub repo first (e.g. facebook/layerskip-llama3.2-1B)")
    args = parser.parse_args(argv)
    if args.checkpoint_dir is None and args.repo_id is None:
        parser.error("give --checkpoint_dir, --repo_id or both")
    try:
        checkpoint_dir = download(args.repo_id, args.checkpoint_dir) if args.repo_id else args.checkpoint_dir
        convert(checkpoint_dir)
    except (ValueError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
