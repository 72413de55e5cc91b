"""Weight-only quantization of a converted checkpoint: int8 per output channel, or int4 in groups.

    python quantize.py --checkpoint_path DIR/model.pth --mode int8                # DIR/model_int8.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4 --groupsize 32  # DIR/model_int4.g32.pth
    python quantize.py --checkpoint_path DIR/model.pth --mode int4 --groupsize 32 --symmetric  # ...g32.sym.pth
    python generate.py --checkpoint_path DIR/model_int4.g32.pth --draft_layers 4   # reads what it holds

Every linear layer of every block and the LM head are quantized (the head is what every draft
reads); the token embedding keeps the checkpoint's dtype, and a head tied to it gets its own
quantized copy. The file is device-neutral - plain codes and scales, no kernel's packing - and
says what it holds in a "quantization" entry; model.load_model packs it for the device that
runs it. model_config.json and tokenizer.model beside it are the unquantized checkpoint's.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from common import atomic_write, fail
from model import QUANTIZATION_VERSION, ModelArgs

GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric, one scale per output channel: w ~ codes * scales, codes in [-127, 127]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-8)  # an all-zero row still divides
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(w: Tensor, groupsize: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Per group of `groupsize` input columns: w ~ (q - 8) * scale + zero, q in [0, 15], the zero
    point kept in the weights' own units (as gpt-fast and the kernels have it). Asymmetric: the
    16 codes span the group's [min, max]. Symmetric (llama.cpp's Q4_0): zero 0 and scale = the
    group's largest-magnitude weight / -8, which code 0 then holds exactly; a CPU reads one scale a
    group instead of a scale and a zero (4.5 bits a weight at groups of 32, not 5), a little less
    accurate. Returns codes (out, in / 2) uint8 - two nibbles a byte, the even column high - and
    scales_and_zeros (in / groupsize, out, 2) float32."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // groupsize, groupsize)
    if symmetric:
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))
        scale, zero = extreme / -8, torch.zeros_like(extreme)
        inverse = torch.where(scale != 0, 1 / scale, 0.0)  # an all-zero group: codes 8, weights 0
        q = (torch.round(groups * inverse) + 8).clamp(0, 15)
    else:
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp_min(1e-8)
        zero = low + 8 * scale
        q = torch.round((groups - low) / scale).clamp(0, 15)
    q = q.to(torch.uint8).reshape(out_features, in_features)
    codes = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return codes, scales_and_zeros


def dequantize_int8(codes: Tensor, scales: Tensor) -> Tensor:
    return codes.float() * scales.float()[:, None]


def dequantize_int4(codes: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    q = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(codes.shape[0], -1).float()
    scale, zero = (scales_and_zeros[..., i].float().t().repeat_interleave(groupsize, dim=1) for i in (0, 1))
    return (q - 8) * scale + zero


def linear_weights(args: ModelArgs) -> list[str]:
    """The state-dict names of every linear layer's weight, the LM head last."""
    names = [f"layers.{i}.{layer}.weight" for i in range(args.n_layer)
             for layer in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    return names + ["output.weight"]


def quantize_state(state: dict, args: ModelArgs, mode: str, groupsize: Optional[int],
                   progress: bool = False, symmetric: bool = False) -> tuple[dict, list[str]]:
    """The quantized state dict and notes on the layers that a kernel will not run as they are.
    symmetric: int4's symmetric codes (quantize_int4)."""
    if args.tie_embeddings:  # stored once as the embedding: the head gets its own quantized copy
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    out = {"quantization": {"mode": mode, "groupsize": groupsize, "version": QUANTIZATION_VERSION,
                            **({"symmetric": True} if symmetric else {})}}
    out.update((name, w) for name, w in state.items() if name not in linear_weights(args))
    notes = []
    for name in tqdm(linear_weights(args), desc=f"quantizing to {mode}", unit="layer", file=sys.stderr, disable=not progress):
        w, layer = state[name], name.removesuffix(".weight")
        rows, columns = w.shape
        if mode == "int8":
            out[f"{layer}.codes"], out[f"{layer}.scales"] = quantize_int8(w)
            if columns % 16:
                notes.append(f"{layer}: {columns} input columns, not a multiple of 16: where the engine's CPU "
                             "kernels are not built, PyTorch's int8 kernel cannot run it and a dequantizing matmul does")
        elif columns % groupsize:
            out[name] = w
            notes.append(f"{layer}: {columns} input columns, not a multiple of the group size {groupsize}: "
                         "kept unquantized")
        else:
            out[f"{layer}.codes"], out[f"{layer}.scales_and_zeros"] = quantize_int4(w, groupsize, symmetric)
            if rows % 16:
                notes.append(f"{layer}: {rows} output rows, not a multiple of 16: padded with zero rows when "
                             "loaded (PyTorch's int4 kernels need 8 on CUDA, 16 on a CPU without the engine's kernels)")
    return out, notes


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.error = fail
    p.add_argument("--checkpoint_path", type=Path, required=True, help="a converted model.pth")
    p.add_argument("--mode", choices=["int8", "int4"], required=True)
    p.add_argument("--groupsize", type=int, choices=GROUP_SIZES, default=128, help="int4: input columns per scale")
    p.add_argument("--symmetric", action="store_true",
                   help="int4: one scale a group and no zero, as llama.cpp's Q4_0 (4.5 bits a weight at groups of 32 "
                        "on a CPU instead of 5, a little less accurate)")
    p.add_argument("--output", type=Path,
                   help="default: model_int8.pth / model_int4.g{G}.pth / model_int4.g{G}.sym.pth beside the checkpoint")
    args = p.parse_args(argv)
    path = args.checkpoint_path
    if args.symmetric and args.mode != "int4":
        fail("--symmetric goes with --mode int4 (int8 is symmetric already)")
    if not path.is_file():
        fail(f"checkpoint not found: {path}")
    groupsize = args.groupsize if args.mode == "int4" else None
    output = args.output or path.with_name(
        "model_int8.pth" if args.mode == "int8" else f"model_int4.g{groupsize}{'.sym' if args.symmetric else ''}.pth")
    try:
        model_args = ModelArgs.load(path.parent / "model_config.json")
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except ValueError as e:
        fail(str(e))
    except Exception as e:  # a truncated or foreign file
        fail(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")
    if "quantization" in state or any(name.endswith(".codes") for name in state):
        fail(f"{path} is already quantized: quantize the unquantized model.pth")
    missing = [name for name in linear_weights(model_args) if name not in state
               and not (name == "output.weight" and model_args.tie_embeddings)]
    if missing:
        fail(f"{path} does not match model_config.json: no {missing[0]}")
    quantized, notes = quantize_state(state, model_args, args.mode, groupsize, progress=True, symmetric=args.symmetric)
    atomic_write(output, lambda tmp: torch.save(quantized, tmp))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    megabytes = [sum(t.nbytes for t in s.values() if isinstance(t, Tensor)) / 1e6 for s in (quantized, state)]
    print(f"wrote {output}: {megabytes[0]:.1f} MB (from {megabytes[1]:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
