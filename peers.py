"""The peers benchmark.py times the engine against, each on the engine's own weights and prompts:
transformers (generate, and generate(assistant_early_exit=E)) on a Hugging Face folder written from
the engine's model, and llama.cpp (llama-cpp-python) on that folder converted and quantized by
llama.cpp's own tools, in a worker process of its own venv that keeps the model loaded.

Each peer returns Methods, the unit benchmark.py times: a name, the engine it runs on, k and the
draft layers, and run(prompts' tokens, batch size) -> one result per prompt as generate_batch's.
"""
import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from common import atomic_write, fail
from model import Transformer, load_model

@dataclass
class Method:
    name: str
    engine: str  # "this", "transformers", ...
    k: Union[int, str]  # tokens drafted per step; 0: autoregressive; "auto": chosen per step
    draft_layers: Optional[int]
    run: Callable[[list[list[int]], int], list[dict]]  # (prompts' tokens, batch size) -> generate_batch's results
    # A peer in another process (llama.cpp) adds "timed_seconds" to each result: its generation's wall
    # time, prefill included, measured where it ran; time_groups then sums those instead of timing the
    # call, which would add the round trip to the process.



def write_hf_checkpoint(model: Transformer, tokenizer_path: Path, folder: Path) -> None:
    """The reverse of convert_hf_checkpoint: a Hugging Face Llama folder (config.json,
    model.safetensors, the tokenizer file) with the engine's weights, q/k/v split again, as
    transformers and llama.cpp's converter read it."""
    from safetensors.torch import save_file
    from convert_hf_checkpoint import LAYER_NAMES, QKV, TOP_NAMES
    from tokenizer import load_tokenizer
    a = model.args
    tokenizer = load_tokenizer(tokenizer_path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab_size,
              "hidden_size": a.dim, "intermediate_size": a.intermediate_size, "num_hidden_layers": a.n_layer,
              "num_attention_heads": a.n_head, "num_key_value_heads": a.n_kv_head, "head_dim": a.head_dim,
              "hidden_act": "silu", "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_base,
              "rope_scaling": {"rope_type": "llama3", **a.rope_scaling} if a.rope_scaling else None,
              "max_position_embeddings": a.max_seq_length, "tie_word_embeddings": a.tie_embeddings,
              "attention_bias": False, "mlp_bias": False, "bos_token_id": tokenizer.bos_id,
              "eos_token_id": tokenizer.eos_id, "torch_dtype": str(model.output.weight.dtype).removeprefix("torch.")}
    ours = {name: w.detach().to("cpu") for name, w in model.state_dict().items()}
    state = {theirs: ours[name] for theirs, name in TOP_NAMES.items()
             if not (a.tie_embeddings and theirs == "lm_head.weight")}  # a tied head is the embedding
    sizes = [a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim]
    for i in range(a.n_layer):
        for theirs, name in LAYER_NAMES.items():
            state[f"model.layers.{i}.{theirs}"] = ours[f"layers.{i}.{name}"]
        for theirs, w in zip(QKV, ours[f"layers.{i}.attention.wqkv.weight"].split(sizes)):
            state[f"model.layers.{i}.{theirs}"] = w
    state = {name: w.contiguous() for name, w in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    atomic_write(folder / tokenizer_path.name, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def transformers_methods(folder: Path, model: Transformer, args: argparse.Namespace, exit_layer: int,
                         check_tokens: list[int], stop_ids: set[int]) -> tuple[list[Method], dict]:
    """transformers' generate(do_sample=False) and generate(assistant_early_exit=E) at each k, on
    the weights of `folder` (write_hf_checkpoint). Its logits must match the engine's on
    check_tokens: a comparison on other weights would mean nothing."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=model.output.weight.dtype).to(args.device).eval()
    hf.generation_config.eos_token_id = sorted(stop_ids) or None  # None: a fixed number of tokens
    hf.generation_config.pad_token_id = 0
    idx = torch.tensor([check_tokens], device=args.device)
    with torch.inference_mode():
        model.setup_caches(1, idx.shape[1], None)
        ours = model(idx, torch.arange(idx.shape[1], device=args.device)[None]).float()
        theirs = hf(idx).logits.float()
    difference = ((ours - theirs).abs().max() / ours.abs().max()).item()
    if difference > (1e-3 if args.dtype == "float32" else 5e-2):
        fail(f"transformers' logits differ from the engine's by {difference:.2g} of their largest: "
             f"the weights in {folder} are not the engine's")

    def method(k: int) -> Method:
        # The assistant's drafting policy is read from the model's generation_config, not from
        # generate()'s arguments; its defaults (20 drafts, a 0.4 confidence stop) would otherwise
        # apply. Set for the duration of each call: a constant k, no confidence cut-off.
        policy = dict(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                      assistant_confidence_threshold=0.0)

        def run(prompts: list[list[int]], batch_size: int) -> list[dict]:
            results = []
            for prompt in prompts:
                # Verify passes reach the last layer, drafts stop at E: last-layer calls = steps.
                calls = [0]
                hook = hf.model.layers[-1].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
                saved = {key: getattr(hf.generation_config, key) for key in policy}
                if k:
                    for key, value in policy.items():
                        setattr(hf.generation_config, key, value)
                try:
                    x = torch.tensor([prompt], device=args.device)
                    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                      do_sample=False, **({"assistant_early_exit": exit_layer} if k else {}))
                finally:
                    hook.remove()
                    for key, value in saved.items():
                        setattr(hf.generation_config, key, value)
                tokens = out[0, len(prompt):].tolist()
                # Every verify pass yields its accepted drafts + 1 token, k drafted per pass (fewer
                # only where transformers caps the last one at max_new_tokens): a close lower bound.
                steps = calls[0]
                results.append({"generated_tokens": tokens,
                                "acceptance_rate": (len(tokens) - steps) / (steps * k) if k else None,
                                "tokens_per_step": len(tokens) / steps if k else None})
            return results
        return Method("transformers" if k == 0 else f"transformers early exit k={k}", "transformers", k,
                      exit_layer if k else None, run)
    # transformers' assistant has no counterpart of "auto" with the same meaning: fixed k only
    return [method(k) for k in [0] + [k for k in args.speculate_k if k != "auto"]], {"logits_max_difference": difference}


# --- llama.cpp, through its own converter, quantizer and llama-cpp-python in their own venv ------

LLAMA_CPP_SETUP = "../shared/tools/setup-llama-cpp.sh"
LLAMA_CPP_FLOAT_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # engine dtype -> GGUF type
GGML_TYPES = {"f32": 0, "f16": 1, "Q4_0": 2, "Q8_0": 8, "bf16": 30}  # ggml's enum ggml_type


def llama_cpp_formats(dtype: str, quantization: Optional[tuple[str, Optional[int]]]) -> dict:
    """How llama.cpp holds the engine's model. The engine's precision -> "outtype" (the converter's
    --outtype), "quant" (llama.cpp's quantization type, None: none), "embedding" (the type an
    untied token embedding keeps: the engine never quantizes it) and "kv" (the KV cache's type,
    the engine's activation dtype). quantization: None or (mode, group size) of a quantize.py file.

        float32 -> f32 GGUF | bfloat16 -> bf16 | float16 -> f16
        int8 (one scale per output channel) -> Q8_0 (one scale per block of 32)
        int4, groups of 32 -> Q4_0 (groups of 32, one scale each: the counterpart of --symmetric's
        codes; the engine's asymmetric int4 keeps a zero too); other group sizes have none
    A quantized type is made from an f32 GGUF of the unquantized weights, as llama.cpp's own
    quantizer expects. Raises ValueError for what llama.cpp cannot mirror."""
    if dtype not in LLAMA_CPP_FLOAT_TYPES:
        raise ValueError(f"llama.cpp has no {dtype} model type")
    float_type = LLAMA_CPP_FLOAT_TYPES[dtype]
    if quantization is None:
        return {"outtype": float_type, "quant": None, "embedding": float_type, "kv": float_type}
    mode, groupsize = quantization
    if mode == "int8":
        quant = "Q8_0"
    elif mode == "int4" and groupsize == 32:
        quant = "Q4_0"
    elif mode == "int4":
        raise ValueError(f"llama.cpp's Q4_0 quantizes in groups of 32, this int4 file in groups of {groupsize}: "
                         f"compare a file from quantize.py --mode int4 --groupsize 32")
    else:
        raise ValueError(f"no llama.cpp counterpart of quantization mode {mode!r}")
    return {"outtype": "f32", "quant": quant, "embedding": float_type, "kv": float_type}


def engine_quantization(model: Transformer) -> Optional[tuple[str, Optional[int]]]:
    """(mode, group size) of a model loaded from a quantize.py file; None for a float model."""
    from model import Int4Linear, Int8Linear
    for module in model.modules():
        if isinstance(module, Int4Linear):
            return "int4", module.groupsize
        if isinstance(module, Int8Linear):
            return "int8", None
    return None


def llama_cpp_environment(environ: Optional[dict] = None) -> dict:
    """LCPP_PY (a python with llama_cpp and gguf), LCPP_CONVERT (llama.cpp's convert_hf_to_gguf.py)
    and LCPP_PYTHONPATH (its gguf-py), from the environment; one line and exit 1 if they are not
    there."""
    environ = os.environ if environ is None else environ
    found = {name: environ.get(name, "") for name in ("LCPP_PY", "LCPP_CONVERT", "LCPP_PYTHONPATH")}
    problem = next((f"{name} is not set" for name, value in found.items() if not value), None)
    problem = problem or next((f"{name}={found[name]} is not a file" for name in ("LCPP_PY", "LCPP_CONVERT")
                               if not Path(found[name]).is_file()), None)
    if problem:
        fail(f"--compare llama.cpp needs llama.cpp's own Python environment and converter ({problem}): run "
             f"{LLAMA_CPP_SETUP} and export the LCPP_PY, LCPP_CONVERT and LCPP_PYTHONPATH it prints")
    return found


def first_divergence(tokens: list[int], reference: list[int]) -> Optional[int]:
    """The first position where two outputs differ (the shorter one's length if one is a prefix of
    the other); None if they are equal."""
    if tokens == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


# The worker, run by LCPP_PY (llama-cpp-python lives in its own venv): loads one GGUF once, then
# answers one JSON line per JSON request line, so that the model's load is never timed.
LLAMA_CPP_WORKER = r'''
import base64, json, os, sys, time
reply_to = os.fdopen(os.dup(1), "w")  # the protocol's channel; what the C library prints goes to stderr
os.dup2(2, 1)

def reply(message):
    reply_to.write(json.dumps(message) + "\n")
    reply_to.flush()

try:
    import numpy as np
    import llama_cpp as L
    path, threads, n_ctx, kv_type = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = L.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx, logits_all=False,
                  verbose=False, type_k=kv_type, type_v=kv_type)
    ctx, n_vocab = llm.ctx, llm.n_vocab()
    memory = L.llama_get_memory(ctx)
    tensor_types = {}
    try:
        import gguf
        for t in gguf.GGUFReader(path).tensors:
            tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    except Exception:
        pass
except Exception as e:
    reply({"error": f"cannot load {sys.argv[1] if len(sys.argv) > 1 else 'a model'}: {type(e).__name__}: {e}"})
    sys.exit(1)

def last_logits(tokens):
    """A fresh sequence: the tokens decoded in one batch (the prompt) or one by one (after it)."""
    L.llama_memory_clear(memory, True)
    ids = (L.llama_token * len(tokens))(*tokens)
    if L.llama_decode(ctx, L.llama_batch_get_one(ids, len(tokens))) != 0:
        raise RuntimeError(f"llama_decode failed on a prompt of {len(tokens)} tokens (n_ctx {n_ctx})")
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

def generate(prompt, max_new_tokens, stop_ids):
    """Greedy: argmax (the first of equal maxima, as torch's), prefill + decode, one token a call
    to llama_decode; stops after any of `stop_ids` (kept) or max_new_tokens."""
    start = time.perf_counter()
    logits, out, one = last_logits(prompt), [], (L.llama_token * 1)()
    while True:
        token = int(logits.argmax())
        out.append(token)
        if len(out) >= max_new_tokens or token in stop_ids:
            return out, time.perf_counter() - start
        one[0] = token
        if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
            raise RuntimeError(f"llama_decode failed at position {len(prompt) + len(out)} (n_ctx {n_ctx})")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

reply({"ready": True, "n_vocab": n_vocab, "llama_cpp_python": L.__version__, "tensor_types": tensor_types,
       "gguf_bytes": os.path.getsize(path)})
for line in sys.stdin:
    try:
        request = json.loads(line)
        if "logits" in request:
            logits = np.ascontiguousarray(last_logits(request["logits"]), dtype=np.float32)
            reply({"logits": base64.b64encode(logits.tobytes()).decode()})
        else:
            tokens, seconds = generate(request["prompt"], request["max_new_tokens"], set(request.get("stop_ids", [])))
            reply({"tokens": tokens, "seconds": seconds})
    except Exception as e:
        reply({"error": f"{type(e).__name__}: {e}"})
'''

# llama.cpp's own quantizer (llama_model_quantize), run by LCPP_PY: SRC DST TYPE OUTPUT_TYPE EMBEDDING_TYPE THREADS.
LLAMA_CPP_QUANTIZE = r'''
import ctypes, sys
import llama_cpp as L
src, dst, quant, output_type, embedding_type, threads = sys.argv[1:7]
params = L.llama_model_quantize_default_params()
params.ftype = getattr(L, "LLAMA_FTYPE_MOSTLY_" + quant)
params.output_tensor_type = int(output_type)  # the LM head: quantized as the engine's is
params.token_embedding_type = int(embedding_type)  # an untied embedding: kept in float, as the engine keeps it
params.nthread = int(threads)
sys.exit(L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
'''


def parse_worker_reply(line: str) -> dict:
    """One line from the worker: a JSON object, else ValueError (the worker's own error message, or
    what went wrong with the line)."""
    if not line:
        raise ValueError("the worker ended without a reply")
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"the worker said {line.strip()[:120]!r}, not a JSON reply") from None
    if not isinstance(message, dict):
        raise ValueError(f"the worker said {line.strip()[:120]!r}, not a JSON object")
    if "error" in message:
        raise ValueError(str(message["error"]))
    return message


class LlamaCppWorker:
    """One long-lived LCPP_PY process with one GGUF loaded; requests and replies are JSON lines."""
    running: list["LlamaCppWorker"] = []

    def __init__(self, env: dict, gguf: Path, threads: int, n_ctx: int, kv_type: int, log: Path):
        self.log = log
        self.stderr = open(log, "w")
        self.process = subprocess.Popen([env["LCPP_PY"], "-c", LLAMA_CPP_WORKER, str(gguf), str(threads), str(n_ctx),
                                         str(kv_type)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env=llama_cpp_subprocess_env(env, threads))
        LlamaCppWorker.running.append(self)
        self.ready = self.receive()

    def receive(self) -> dict:
        try:
            return parse_worker_reply(self.process.stdout.readline())
        except ValueError as e:
            self.close()
            fail(f"llama.cpp's worker: {e}{last_line(self.log, ' (stderr: {})')}")

    def ask(self, request: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it ended: receive() reads the empty line and says so
        return self.receive()

    def close(self) -> None:
        if self in LlamaCppWorker.running:
            LlamaCppWorker.running.remove(self)
        if self.process.poll() is None:
            self.process.stdin.close()  # the worker's loop ends at EOF
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.stderr.close()

    @classmethod
    def close_all(cls) -> None:
        for worker in list(cls.running):
            worker.close()


def llama_cpp_subprocess_env(env: dict, threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": env["LCPP_PYTHONPATH"], "OMP_NUM_THREADS": str(threads)}


def last_line(path: Path, template: str = "{}") -> str:
    """The last non-empty line of a log, in `template`; "" if there is none."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return template.format(lines[-1][:300]) if lines else ""


def llama_cpp_run(command: list[str], env: dict, threads: int, log: Path, what: str) -> None:
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                              env=llama_cpp_subprocess_env(env, threads)).returncode
    if code != 0:
        fail(f"llama.cpp's {what} failed (exit status {code}){last_line(log, ': {}')}")


def sentencepiece_stand_in(path: Path, vocab_size: int) -> None:
    """A small SentencePiece BPE tokenizer.model (unk 0, BOS 1, EOS 2, byte fallback) for llama.cpp's
    converter, which reads no tiktoken file: the worker is fed token ids, never text, so the pieces
    only have to exist (the converter pads them to the model's vocabulary)."""
    import sentencepiece as spm
    if vocab_size < 300:
        fail(f"llama.cpp's converter needs a SentencePiece tokenizer, and a vocabulary of {vocab_size} is too "
             "small for a stand-in (its 256 byte pieces and 3 special ones, and some merges): use --vocab_size 300 or more")
    model = io.BytesIO()
    text = ["the quick brown fox jumps over the lazy dog", "a language model predicts the next token"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, model_type="bpe",
                                   vocab_size=300, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())


def peer_weights(model: Transformer, args: argparse.Namespace) -> Transformer:
    """The model whose weights the peers' Hugging Face folder is written from: the engine's own, or
    for a quantized checkpoint the unquantized one it was made from (llama.cpp quantizes those
    weights with its own quantizer): --llama_cpp_source, else model.pth beside the checkpoint."""
    if engine_quantization(model) is None:
        if args.llama_cpp_source is not None:
            fail("--llama_cpp_source is for a quantized --checkpoint_path; llama.cpp converts this one's own weights")
        return model
    if "transformers" in args.compare:
        fail("--compare transformers runs unquantized weights: compare it on the unquantized model.pth")
    source = args.llama_cpp_source or args.checkpoint_path.with_name("model.pth")
    if not source.is_file() or source.resolve() == args.checkpoint_path.resolve():
        fail(f"{args.checkpoint_path} is quantized; llama.cpp quantizes the unquantized weights itself, and "
             f"{source} is not them: give the unquantized checkpoint as --llama_cpp_source DIR/model.pth")
    try:
        float_model = load_model(source, "cpu", torch.float32)
    except (ValueError, OSError) as e:
        fail(str(e))
    if engine_quantization(float_model) is not None:
        fail(f"--llama_cpp_source {source} is quantized too: give the unquantized model.pth")
    if float_model.args != model.args:
        fail(f"--llama_cpp_source {source} is another model than {args.checkpoint_path} (model_config.json differs)")
    return float_model


def convert_for_llama_cpp(folder: Path, model: Transformer, formats: dict, env: dict, threads: int,
                          work: Path) -> tuple[Path, str]:
    """`folder` converted to GGUF by llama.cpp's converter and quantized by its quantizer as
    `formats` says; the file and a note on the tokenizer it was given."""
    # The converter's input: the folder's weights and config, and a SentencePiece tokenizer.model.
    source = work / "hf"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).symlink_to((folder / name).resolve())
    from tokenizer import SentencePieceTokenizer, load_tokenizer
    if isinstance(load_tokenizer(folder), SentencePieceTokenizer):
        shutil.copyfile(folder / "tokenizer.model", source / "tokenizer.model")
        tokenizer_note = "the model's SentencePiece tokenizer.model"
    else:
        sentencepiece_stand_in(source / "tokenizer.model", model.args.vocab_size)
        tokenizer_note = "a SentencePiece stand-in for the model's own tokenizer (the worker is fed token ids)"
    gguf = work / f"model-{formats['outtype']}.gguf"
    print(f"# llama.cpp: converting to {gguf.name}", file=sys.stderr)
    llama_cpp_run([env["LCPP_PY"], env["LCPP_CONVERT"], str(source), "--outtype", formats["outtype"],
                   "--outfile", str(gguf)], env, threads, work / "convert.log", "converter (convert_hf_to_gguf.py)")
    if formats["quant"]:
        quantized = work / f"model-{formats['quant']}.gguf"
        print(f"# llama.cpp: quantizing to {quantized.name}", file=sys.stderr)
        quant = GGML_TYPES[formats["quant"]]
        embedding = quant if model.args.tie_embeddings else GGML_TYPES[formats["embedding"]]  # tied: it is the head
        llama_cpp_run([env["LCPP_PY"], "-c", LLAMA_CPP_QUANTIZE, str(gguf), str(quantized), formats["quant"],
                       str(quant), str(embedding), str(threads)], env, threads, work / "quantize.log",
                      "quantizer (llama_model_quantize)")
        gguf.unlink()
        gguf = quantized
    return gguf, tokenizer_note


def llama_cpp_methods(folder: Path, model: Transformer, args: argparse.Namespace, exit_layer: int,
                      check_tokens: list[int], stop_ids: set[int], n_ctx: Optional[int] = None) -> tuple[list[Method], dict]:
    """llama.cpp on the same weights: `folder` (write_hf_checkpoint, of the unquantized weights)
    converted to GGUF by llama.cpp's own converter, quantized by llama.cpp's own quantizer as the
    engine's model is (llama_cpp_formats), generation timed through llama-cpp-python in a worker
    process (LlamaCppWorker), greedy, autoregressive (llama.cpp has no early-exit drafting), with
    the benchmark's threads. Its last-position logits on check_tokens are compared with the
    engine's: for an unquantized model they must match, else the conversion is wrong."""
    env = llama_cpp_environment()
    LlamaCppWorker.close_all()  # an earlier variant's (--late_scales): its rows are done
    try:
        formats = llama_cpp_formats(args.dtype, engine_quantization(model))
    except ValueError as e:
        fail(str(e))
    threads = args.threads or torch.get_num_threads()
    work = folder.parent / "llama.cpp"
    work.mkdir(parents=True, exist_ok=True)
    if args.llama_cpp_gguf is not None:  # the user's own file, as llama.cpp would run it
        gguf, tokenizer_note, formats = args.llama_cpp_gguf, "the GGUF's own (fed the engine's token ids)", {
            **llama_cpp_formats(args.dtype, None), "outtype": None, "quant": "the file's own"}
    else:
        gguf, tokenizer_note = convert_for_llama_cpp(folder, model, formats, env, threads, work)
    n_ctx = n_ctx or model.args.max_seq_length
    worker = LlamaCppWorker(env, gguf, threads, n_ctx, GGML_TYPES[formats["kv"]], work / "worker.log")

    # The same weights? The last position's logits on check_tokens, llama.cpp's against the engine's.
    logits = worker.ask({"logits": check_tokens})["logits"]
    theirs = torch.frombuffer(bytearray(base64.b64decode(logits)), dtype=torch.float32)
    idx = torch.tensor([check_tokens], device=args.device)
    with torch.inference_mode():
        model.setup_caches(1, idx.shape[1], None)
        ours = model(idx, torch.arange(idx.shape[1], device=args.device)[None])[0, -1].float().cpu()
    if theirs.shape != ours.shape:
        fail(f"llama.cpp's model has {theirs.numel()} logits, the engine's {ours.numel()}: not the same model")
    difference = ((ours - theirs).abs().max() / ours.abs().max()).item()
    same_argmax = bool(ours.argmax() == theirs.argmax())
    if formats["quant"] is None and args.llama_cpp_gguf is None and difference > (1e-3 if args.dtype == "float32" else 1e-1):
        fail(f"llama.cpp's logits differ from the engine's by {difference:.2g} of their largest: {gguf.name} "
             f"does not hold the engine's weights")
    info = {"gguf": gguf.name, "converter_outtype": formats["outtype"], "quantization": formats["quant"],
            "kv_cache_type": formats["kv"], "threads": threads, "n_ctx": n_ctx, "flash_attention": False,
            "tokenizer": tokenizer_note, "tensor_types": worker.ready.get("tensor_types"),
            "gguf_bytes": worker.ready.get("gguf_bytes"), "llama_cpp_python": worker.ready.get("llama_cpp_python"),
            "logits_max_difference": difference, "logits_same_argmax": same_argmax, "pipe_overhead_ms": []}
    context = model.args.max_seq_length

    def run(prompts: list[list[int]], batch_size: int) -> list[dict]:
        results = []
        for prompt in prompts:  # one at a time: batch 1, as --compare times it
            t0 = time.perf_counter()
            reply = worker.ask({"prompt": prompt, "max_new_tokens": min(args.max_new_tokens, context - len(prompt)),
                                "stop_ids": sorted(stop_ids)})
            # Timed by the worker (timed_seconds); what the pipe's round trip adds, for the record.
            info["pipe_overhead_ms"].append(round((time.perf_counter() - t0 - reply["seconds"]) * 1e3, 3))
            results.append({"generated_tokens": reply["tokens"], "acceptance_rate": None, "tokens_per_step": None,
                            "timed_seconds": reply["seconds"]})
        return results
    return [Method("llama.cpp", "llama.cpp", 0, None, run)], info


PEERS = {"transformers": transformers_methods, "llama.cpp": llama_cpp_methods}
