"""convert_hf_checkpoint.py: the command line, its errors, and no half-written output."""
import os
import subprocess
import sys

import pytest
import torch

import convert_hf_checkpoint
from conftest import ROOT, make_hf_checkpoint


def run_convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # tests never reach the hub
    return subprocess.run([sys.executable, str(ROOT / "convert_hf_checkpoint.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_command_line_converts_a_sharded_checkpoint(tmp_path):
    folder = tmp_path / "hf"
    hf = make_hf_checkpoint(folder, "llama32", "safetensors")
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded, read through the index
    proc = run_convert("--checkpoint_dir", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "reading shards" in proc.stderr  # the progress bar
    state = torch.load(folder / "model.pth", weights_only=True)
    q = hf.model.layers[2].self_attn.q_proj.weight
    assert torch.equal(state["layers.2.attention.wqkv.weight"][: q.shape[0]], q)
    assert {p.name for p in folder.iterdir()} >= {"model.pth", "model_config.json", "tokenizer.model"}
    assert not list(folder.glob("*.tmp"))


def test_bad_folders_give_one_clear_line(tmp_path, capsys):
    """In process (the script itself runs in the tests above and for the hub's error below)."""
    folder = tmp_path / "hf"
    make_hf_checkpoint(folder, "llama2", "safetensors")

    def error_line(*flags: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            convert_hf_checkpoint.main(list(flags))
        lines = capsys.readouterr().err.strip().splitlines()  # a progress bar may come first
        assert exit_.value.code != 0 and lines[-1].startswith("error: "), lines
        assert not any(line.startswith("error: ") for line in lines[:-1]), lines
        return lines[-1]

    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_line("--checkpoint_dir", str(tmp_path / "empty"))
    (folder / "tokenizer.model").rename(tmp_path / "tokenizer.model")
    assert "no tokenizer.model" in error_line("--checkpoint_dir", str(folder))
    (folder / "tokenizer.json").write_text("{not json")  # the third kind, read before any write
    assert "is not a Hugging Face tokenizer.json" in error_line("--checkpoint_dir", str(folder))
    (folder / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").rename(folder / "tokenizer.model")
    weights = folder / "model.safetensors"
    weights.rename(tmp_path / "weights")
    assert "no *.safetensors or pytorch_model*.bin" in error_line("--checkpoint_dir", str(folder))
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "weights")
    del state["model.layers.3.mlp.up_proj.weight"]
    save_file(state, weights)
    assert "missing weight" in error_line("--checkpoint_dir", str(folder))
    assert "give --checkpoint_dir, --repo_id or both" in error_line()
    assert not (folder / "model.pth").exists()
    # the hub, offline: in a child process, where HF_HUB_OFFLINE is read before the hub's client starts
    proc = run_convert("--repo_id", "facebook/layerskip-llama3.2-1B", "--checkpoint_dir", str(tmp_path / "hub"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines[-1].startswith("error: ") and "cannot download" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    make_hf_checkpoint(folder, "llama2", "bin")

    def interrupted(obj, path):
        open(path, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_hf_checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_checkpoint.convert(folder)
    assert not (folder / "model.pth").exists()
    assert not list(folder.glob("*.tmp"))


def test_tokenizer_json_folder_converts_with_its_stop_ids(checkpoints):
    """A folder with tokenizer.json and no tokenizer.model (most published checkpoints): the engine's
    files beside it, the EOS ids of config.json (1) and generation_config.json ([1, 4]) in stop_ids.json."""
    from tokenizer import HFTokenizer, load_tokenizer
    path, hf = checkpoints("json")
    folder = path.parent
    assert not (folder / "tokenizer.model").exists()
    assert {p.name for p in folder.iterdir()} >= {"model.pth", "model_config.json", "tokenizer.json",
                                                  "tokenizer_config.json", "stop_ids.json", "chat_template.jinja"}
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.stop_ids == {1, 4} and tokenizer.chat_template
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["tok_embeddings.weight"], hf.model.embed_tokens.weight)
