"""Tensor parallelism: one model sharded over the processes that torchrun starts, NCCL between
GPUs, gloo between CPU processes, for autoregressive and self-speculative decoding alike.

    torchrun --standalone --nproc_per_node 2 generate.py --checkpoint_path DIR/model.pth --draft_layers 4 --compile
    torchrun --standalone --nproc_per_node 2 generate.py ... --device cpu     # gloo, one process per share

Attention is split by heads - each rank its share of the query heads and of the key/value heads
they read, so its KV cache holds only those - the MLP by its hidden width, the LM head by
vocabulary (every draft reads the head: left whole it would be the draft's largest unsplit read).
The token embedding, the norms and the residual stream, hence the exit cache, are whole on every
rank. A step needs one sum all-reduce after each attention output projection and after each MLP
output projection, and one all-gather of the head's logits.

This is plain sharding with torch.distributed's traceable functional collectives, not DTensor's
parallelize_module: a step then compiles to one graph holding exactly those collectives (DTensor
adds its own redistributions and cannot trace the int4/int8 kernels of quantized layers), and the
quantized layers' codes and scales shard like the weights they stand for (int4 groups stay whole).

Every rank samples from the same gathered logits with the same seed and so draws the same tokens:
the ranks agree on every accepted count and position without further communication.
"""
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from model import Linear, Transformer


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) under torchrun; (0, 1, device) in a plain process.
    Raises ValueError, before any rank waits on another, when the GPUs are too few."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.startswith("cuda"):
        if torch.cuda.device_count() < local_world:
            raise ValueError(f"{local_world} processes on this node but {torch.cuda.device_count()} CUDA device(s): "
                             "one GPU per process")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def check(model: Transformer, world: int, quantization: Optional[dict]) -> None:
    """Every split must be even (and int4 groups whole): one clear error otherwise."""
    args = model.args
    for name, size in (("attention heads", args.n_head), ("key/value heads", args.n_kv_head),
                       ("MLP hidden width", args.intermediate_size), ("vocabulary", args.vocab_size)):
        if size % world:
            raise ValueError(f"the model's {size} {name} do not split evenly over {world} processes")
    if quantization is not None and quantization["mode"] == "int4":
        for name, columns in (("attention output", args.n_head * args.head_dim), ("MLP output", args.intermediate_size)):
            if columns // world % quantization["groupsize"]:
                raise ValueError(f"the {name} projection's {columns} input columns split over {world} processes "
                                 f"cut its int4 groups of {quantization['groupsize']}")


def shard(rank: int, world: int) -> Callable[[Transformer, dict, Optional[dict]], dict]:
    """For model.load_model: slices the memory-mapped state to this rank's share (views: nothing
    is read until the weights are used or moved) and fits the meta model's layers to it."""

    def split(t: Tensor, dim: int, parts: list[int]) -> Tensor:
        """This rank's 1/world of each of the consecutive parts of `t` along `dim`, joined."""
        pieces, start = [], 0
        for size in parts:
            pieces.append(t.narrow(dim, start + rank * size // world, size // world))
            start += size
        return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]

    def shard_state(model: Transformer, state: dict, quantization: Optional[dict]) -> dict:
        check(model, world, quantization)
        args = model.args
        if args.tie_embeddings and not any(name.startswith("output.") for name in state):
            state = {**state, "output.weight": state["tok_embeddings.weight"]}  # the head's share is its own
        qkv = [args.n_head * args.head_dim, args.n_kv_head * args.head_dim, args.n_kv_head * args.head_dim]
        # layer -> (its output rows, split along them) or (its input columns, split along those)
        layers = {"output": ("rows", [args.vocab_size])}
        for i in range(args.n_layer):
            layers[f"layers.{i}.attention.wqkv"] = ("rows", qkv)
            layers[f"layers.{i}.attention.wo"] = ("columns", [args.n_head * args.head_dim])
            layers[f"layers.{i}.feed_forward.w1"] = ("rows", [args.intermediate_size])
            layers[f"layers.{i}.feed_forward.w3"] = ("rows", [args.intermediate_size])
            layers[f"layers.{i}.feed_forward.w2"] = ("columns", [args.intermediate_size])
        out = dict(state)
        for layer, (how, parts) in layers.items():
            # where each stored tensor keeps that axis: weight / int8 codes (out, in), int8 scales
            # (out,), int4 codes (out, in / 2), int4 scales_and_zeros (in / groupsize, out, 2)
            axes = {"weight": (0, 1), "codes": (0, 1), "scales": (0, None), "scales_and_zeros": (1, 0)}
            for kind, (row_axis, column_axis) in axes.items():
                name = f"{layer}.{kind}"
                if name not in state:
                    continue
                axis = row_axis if how == "rows" else column_axis
                if axis is None:  # per output row: whole when the input columns are split
                    continue
                t = state[name]
                sizes = [size * t.shape[axis] // sum(parts) for size in parts]  # halves for int4 codes, groups for scales
                out[name] = split(t, axis, sizes).contiguous()  # reads this rank's share, and only it
            module = model.get_submodule(layer)
            rows, columns = module.out_features, module.in_features
            if how == "rows":
                rows //= world
            else:
                columns //= world
            parent, _, child = layer.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Linear(columns, rows, bias=False))
        for block in model.layers:
            block.attention.n_head //= world
            block.attention.n_kv_head //= world
        return out

    return shard_state


def add_collectives(model: Transformer) -> None:
    """The partial sums of the split projections added up, the head's vocabulary shares gathered:
    forward hooks, which torch.compile traces into the step's graph."""
    group = dist.group.WORLD
    for block in model.layers:
        for projection in (block.attention.wo, block.feed_forward.w2):
            projection.register_forward_hook(lambda module, inputs, out: funcol.all_reduce(out, "sum", group))
    model.output.register_forward_hook(lambda module, inputs, out: funcol.all_gather_tensor(out, out.dim() - 1, group))


def broadcast(obj):
    """Rank 0's `obj` on every rank (e.g. what an output file already holds, which only rank 0 reads)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
