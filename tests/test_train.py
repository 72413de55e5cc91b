"""Tests of train.py, the LayerSkip training recipe: CPU, offline, tiny models and data made here."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from model import ModelArgs, Transformer, load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def make_text(n_funcs: int, seed: int) -> str:
    """Deterministic, repetitive Python-like code: enough structure for a tiny model to learn quickly."""
    g = torch.Generator().manual_seed(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "item", "index", "result"]
    ops = ["+", "-", "*"]
    out = []
    for i in range(n_funcs):
        a, b, c = (names[int(j)] for j in torch.randint(0, len(names), (3,), generator=g))
        op = ops[int(torch.randint(0, 3, (1,), generator=g))]
        out.append(
            f"def compute_{a}_{i}({a}, {b}):\n"
            f'    """Return the {c} of {a} and {b}."""\n'
            f"    {c} = {a} {op} {b}\n"
            f"    for {names[i % len(names)]} in range({i % 7 + 1}):\n"
            f"        {c} = {c} {op} {i % 5}\n"
            f"    return {c}\n\n"
        )
    return "".join(out)


TINY = ["--dim", "32", "--n_layer", "4", "--n_head", "2", "--intermediate_size", "64", "--seq_len", "32",
        "--batch_size", "8", "--threads", "1", "--eval_tokens", "2048", "--warmup", "5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    for k in range(10):  # several documents, so the split by content hash has both sides
        (d / f"mod{k}.py").write_text(make_text(40, seed=k))
    return d


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, data_dir) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_texts, _ = train.load_data([data_dir], "*.py", 0.2)
    train.train_tokenizer(train_texts, 400, path)
    return path


def tiny_model(n_layer: int = 4, vocab: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, dim=32, n_layer=n_layer, n_head=4, n_kv_head=2, head_dim=8,
                     intermediate_size=48, max_seq_length=64, tie_embeddings=True)
    model = Transformer(args)
    train.init_weights(model)
    model.setup_rope(64)
    return model


# ----------------------------------------------------------------------------- layer dropout


def test_dropout_rates_match_formulas():
    L, p_max, T = 8, 0.2, 101
    exp_d = [math.exp(l * math.log(2) / (L - 1)) - 1 for l in range(L)]
    lin_d = [l / (L - 1) for l in range(L)]
    for step in (0, 25, 50, 100):
        s = math.exp(step * math.log(2) / (T - 1)) - 1
        got = train.dropout_rates(step, T, L, p_max, "exp", "exp")
        assert torch.allclose(got, torch.tensor([s * d * p_max for d in exp_d]), atol=1e-7)
        got = train.dropout_rates(step, T, L, p_max, "linear", "exp")
        assert torch.allclose(got, torch.tensor([s * d * p_max for d in lin_d]), atol=1e-7)
        got = train.dropout_rates(step, T, L, p_max, "exp", "constant")  # S(t) = 1: the same at every step
        assert torch.allclose(got, torch.tensor([d * p_max for d in exp_d]), atol=1e-7)
    # the ends: the first layer is never dropped, the last at p_max; the ramp starts at 0 and ends at 1
    assert train.dropout_rates(100, T, L, p_max, "exp", "exp")[[0, -1]].tolist() == pytest.approx([0.0, p_max])
    assert train.dropout_rates(0, T, L, p_max, "exp", "exp").abs().max().item() == 0.0
    assert train.dropout_rates(50, T, L, p_max, "exp", "exp")[-1].item() == pytest.approx((math.sqrt(2) - 1) * p_max, rel=1e-6)
    rates = train.dropout_rates(30, T, L, p_max, "exp", "exp")
    assert all(a < b for a, b in zip(rates[1:], rates[2:]))  # rising with depth
    # the same ends in the smallest cases: 2 layers (the second is the last), 2 steps (the second is the last)
    assert train.dropout_rates(0, T, 2, p_max, "linear", "constant").tolist() == pytest.approx([0.0, p_max])
    assert train.dropout_rates(0, T, 2, p_max, "exp", "constant").tolist() == pytest.approx([0.0, p_max])
    assert train.dropout_rates(1, 2, 2, p_max, "exp", "exp").tolist() == pytest.approx([0.0, p_max])


def test_keep_mask_follows_rates_in_training_and_is_off_in_eval():
    model = tiny_model(n_layer=4)
    rates = torch.tensor([0.0, 0.1, 0.3, 0.6])
    model.train()
    keep = train.layer_keep_mask(model, rates, 20000, torch.Generator().manual_seed(0))
    skipped = 1 - keep.float().mean(0)
    assert torch.allclose(skipped, rates, atol=0.015)  # 20000 samples: the standard error is < 0.004
    # per sample: two layers' decisions are independent (P(both skipped) = p2 * p3)
    both = (~keep[:, 2] & ~keep[:, 3]).float().mean().item()
    assert both == pytest.approx(0.3 * 0.6, abs=0.015)
    model.eval()
    assert train.layer_keep_mask(model, rates, 16) is None
    model.train()
    assert train.layer_keep_mask(model, torch.zeros(4), 16) is None


def test_keep_mask_skips_exactly_below_the_rate(monkeypatch):
    """A layer is skipped when the uniform draw in [0, 1) is below its rate: probability exactly the
    rate, and a layer of rate 0 (the first) is never skipped, not even on a draw of exactly 0.0."""
    model = tiny_model(n_layer=4)
    draws = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.3, 0.6], [0.9, 0.09, 0.29, 0.59]])
    monkeypatch.setattr(train.torch, "rand", lambda batch, n, generator=None: draws[:batch, :n])
    keep = train.layer_keep_mask(model, torch.tensor([0.0, 0.1, 0.3, 0.6]), 3)
    assert keep.tolist() == [[True, False, False, False], [True, True, True, True], [True, False, False, False]]


def test_eval_runs_every_layer_and_matches_the_engine_forward():
    """evaluate_layers drops nothing, even on a model left in train mode, and its last-layer
    logits are the engine's own KV-cache forward."""
    model = tiny_model(n_layer=4)
    windows = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    model.train()
    results = train.evaluate_layers(model, windows)
    assert model.training  # evaluation leaves the mode as it found it
    # a mask that training would draw for this model now: what evaluation must not apply
    keep = train.layer_keep_mask(model, torch.full((4,), 0.5), 3, torch.Generator().manual_seed(0))

    model.eval()
    x, y = windows[:, :-1], windows[:, 1:]

    def exit_losses(hidden: list[torch.Tensor]) -> list[float]:
        return [F.cross_entropy(model.head(h).reshape(-1, 64), y.reshape(-1)).item() for h in hidden]

    with torch.no_grad():
        hidden = train.run_layers(model, x)
        by_hand = exit_losses(hidden)
        dropped = exit_losses(train.run_layers(model, x, keep))
        model.setup_caches(3, 32)
        engine = model(x, torch.arange(16).expand(3, -1))
        model.setup_rope(64)
    assert [r["loss"] for r in results] == pytest.approx(by_hand, rel=1e-5)
    assert dropped != pytest.approx(by_hand, rel=1e-5)  # what that comparison would catch
    final = model.head(hidden[-1]).argmax(-1)
    agree = [(model.head(h).argmax(-1) == final).float().mean().item() for h in hidden]
    assert [r["agreement"] for r in results] == pytest.approx(agree) and results[-1]["agreement"] == 1.0
    assert [r["accuracy"] for r in results] == pytest.approx([(model.head(h).argmax(-1) == y).float().mean().item() for h in hidden])
    assert torch.allclose(engine, model.head(hidden[-1]), atol=1e-5)


def test_dropped_layer_passes_its_input_through():
    model = tiny_model(n_layer=4)
    x = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 2] = False  # sample 0 skips layer 2
    keep[1, 1] = keep[1, 3] = False  # sample 1 skips layers 1 and 3
    with torch.no_grad():
        full = train.run_layers(model, x)
        dropped = train.run_layers(model, x, keep)
    assert torch.equal(dropped[2][0], dropped[1][0])  # output of the skipped layer == its input
    assert torch.equal(dropped[1][1], dropped[0][1]) and torch.equal(dropped[3][1], dropped[2][1])
    assert not torch.allclose(dropped[2][1], dropped[1][1])  # a layer that runs changes its input
    # sample 2 keeps every layer: the same as without dropout; sample 0 the same up to the skipped layer
    for l in range(4):
        assert torch.allclose(dropped[l][2], full[l][2], atol=1e-6)
    assert torch.allclose(dropped[1][0], full[1][0], atol=1e-6)
    assert not torch.allclose(dropped[3][0], full[3][0], atol=1e-3)
    # a layer that every sample skips
    keep_none = torch.ones(3, 4, dtype=torch.bool)
    keep_none[:, 0] = False
    with torch.no_grad():
        out = train.run_layers(model, x, keep_none)
    assert torch.equal(out[0], model.tok_embeddings(x))


def test_dropout_gradients_skip_the_dropped_samples():
    """The layer a sample skips gets no gradient from that sample: with every sample skipping
    layer 1, its weights get no gradient at all."""
    model = tiny_model(n_layer=3)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[:, 1] = False
    hidden = train.run_layers(model, x, keep)
    F.cross_entropy(model.head(hidden[-1]).reshape(-1, 64), x.reshape(-1)).backward()
    assert model.layers[1].attention.wqkv.weight.grad is None
    assert model.layers[2].attention.wqkv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- early-exit loss


def hand_curriculum(curriculum: str, step: int, steps: int, L: int, rotation: int, fraction: float) -> list[bool]:
    if curriculum == "none":
        on = [True] * L
    elif curriculum == "rotational":
        on = [l % rotation == step % rotation for l in range(L)]
    else:  # gradual: layer l is on once step / steps >= fraction * (L - l) / L
        on = [step / steps >= fraction * (L - l) / L for l in range(L)]
    on[-1] = True
    return on


@pytest.mark.parametrize("loss_scale", ["sum_l", "l", "one"])
@pytest.mark.parametrize("curriculum", ["none", "rotational", "gradual"])
def test_early_exit_loss_equals_hand_computation(curriculum, loss_scale):
    L, steps, e_scale, rotation, fraction = 4, 10, 0.5, 2, 0.6
    model = tiny_model(n_layer=L)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    scale = {"sum_l": lambda n: n * (n + 1) / 2, "l": lambda n: n, "one": lambda n: 1.0}[loss_scale]
    with torch.no_grad():
        # per-layer logits by hand: embeddings, then layer after layer, each through norm + output
        h, rope, logits = model.tok_embeddings(x), model.rope[:12], []
        for layer in model.layers:
            h = layer(h, rope, None, None)
            logits.append(model.output(model.norm(h)))
        ce = [F.cross_entropy(lg.reshape(-1, 64), y.reshape(-1)).item() for lg in logits]
        for step in (0, 1, 3, 7, 9):
            on = hand_curriculum(curriculum, step, steps, L, rotation, fraction)
            e = [scale(l + 1) * (e_scale if l < L - 1 else 1.0) * on[l] for l in range(L)]
            expected = sum(w * c for w, c in zip(e, ce)) / sum(e)

            got_on = train.exits_on(step, steps, L, curriculum, rotation, fraction)
            assert got_on.tolist() == on and got_on.dtype == torch.bool
            weights = train.exit_weights(got_on, e_scale, loss_scale)
            assert weights.sum().item() == pytest.approx(1.0)
            loss, per_layer = train.early_exit_loss(model, train.run_layers(model, x), y, weights)
            assert loss.item() == pytest.approx(expected, rel=1e-5)
            assert sorted(per_layer) == [l for l in range(L) if on[l]]  # the head runs only where needed


def test_curricula_and_scales_literal_values():
    """A few values written out, so that a formula shared by the code and the hand computation
    cannot hide a mistake."""
    assert train.exits_on(0, 10, 4, "rotational", 2, 0.5).tolist() == [True, False, True, True]
    assert train.exits_on(1, 10, 4, "rotational", 2, 0.5).tolist() == [False, True, False, True]
    assert train.exits_on(2, 10, 6, "rotational", 3, 0.5).tolist() == [False, False, True, False, False, True]
    # gradual, L=4, fraction 0.5 of 100 steps: layer 2 joins at step 25, layer 1 at 37.5, layer 0 at 50
    assert train.exits_on(0, 100, 4, "gradual", 2, 0.5).tolist() == [False, False, False, True]
    assert train.exits_on(25, 100, 4, "gradual", 2, 0.5).tolist() == [False, False, True, True]
    assert train.exits_on(38, 100, 4, "gradual", 2, 0.5).tolist() == [False, True, True, True]
    assert train.exits_on(50, 100, 4, "gradual", 2, 0.5).tolist() == [True] * 4
    on = torch.tensor([True, False, True, True])
    assert train.exit_weights(on, 0.5, "sum_l").tolist() == pytest.approx([0.5 / 13.5, 0, 3 / 13.5, 10 / 13.5])
    assert train.exit_weights(torch.ones(4, dtype=torch.bool), 1.0, "l").tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert train.exit_weights(torch.ones(4, dtype=torch.bool), 0.0, "sum_l").tolist() == [0, 0, 0, 1]  # plain LM loss
    with pytest.raises(ValueError, match="unknown curriculum 'sideways'"):
        train.exits_on(0, 10, 4, "sideways", 2, 0.5)


# ----------------------------------------------------------------------------- the training step


def test_train_step_is_one_optimizer_step_on_the_masked_weighted_loss():
    """train_step's clipped gradients and update are those of the loss built by hand,
    sum_l w_l CE(head(h_l)) with the layers run under the dropout mask; and a layer that every sample
    skips is not updated at all, not even by the momentum of the step before. (SGD with momentum: its
    update is linear in the gradient, so rounding differences stay small, unlike Adam's first step.)"""
    x = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(8))
    weights = torch.tensor([0.1, 0.0, 0.3, 0.6])
    keep = torch.tensor([[True, False, True, True], [True, True, False, False], [True, True, True, True]])
    skip_1 = torch.ones(3, 4, dtype=torch.bool)
    skip_1[:, 1] = False

    def hand_loss(model: Transformer, mask: torch.Tensor) -> torch.Tensor:
        h, loss = model.tok_embeddings(x), 0.0
        for l, layer in enumerate(model.layers):
            if mask[:, l].any():  # a layer that no sample runs is not part of the computation
                h = torch.where(mask[:, l, None, None], layer(h, model.rope[:12], None, None), h)
            loss = loss + weights[l] * F.cross_entropy(model.head(h).reshape(-1, 64), y.reshape(-1))
        return loss

    model, by_hand = tiny_model(n_layer=4), tiny_model(n_layer=4)  # the same seed: the same weights
    optimizer, hand_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) for m in (model, by_hand))
    for mask in (keep, skip_1):
        layer_1 = [p.detach().clone() for p in model.layers[1].parameters()]
        train.train_step(model, optimizer, x, y, mask, weights, 0.5, "cpu")  # the gradient norm is ~1.4: clipped
        hand_optimizer.zero_grad()
        hand_loss(by_hand, mask).backward()
        torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 0.5)
        hand_optimizer.step()
        for (name, p), q in zip(model.named_parameters(), by_hand.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-6), name
            assert torch.allclose(p, q, atol=1e-6), name
    assert all(p.grad is None for p in model.layers[1].parameters())
    assert all(torch.equal(a, b) for a, b in zip(layer_1, model.layers[1].parameters()))


# ----------------------------------------------------------------------------- whole runs


def run_train(argv: list[str]) -> None:
    threads = torch.get_num_threads()
    try:
        train.main([str(a) for a in argv])
    finally:  # --threads sets a process-wide value: leave the other tests theirs
        torch.set_num_threads(threads)


def last_layer_loss(model: Transformer, tokenizer_path: Path, data_dir: Path) -> float:
    _, val = train.load_data([data_dir], "*.py", 0.2)
    windows = train.eval_windows(train.encode(load_tokenizer(tokenizer_path), val), 32, 2048)
    model.setup_rope(32)
    return train.evaluate_layers(model, windows)[-1]["loss"]


def test_short_run_lowers_held_out_loss_and_checkpoint_loads(tmp_path, data_dir, tokenizer_path, capsys):
    out = tmp_path / "run"
    run_train(["--data", data_dir, "--tokenizer", tokenizer_path, "--val_fraction", "0.2", "--out_dir", out,
               "--steps", 40, "--lr", "3e-3", "--p_max", "0.2", "--curriculum", "rotational", *TINY])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [line.split("|")[1].strip() for line in table] == ["1", "2", "3", "4"]  # one row per exit layer
    assert (out / "layer_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()  # the model's own, beside it
    assert not list(out.glob("*.tmp"))

    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 40
    trained = Transformer(ModelArgs(**state["model_args"]))
    trained.load_state_dict(state["model"])
    trained.eval()
    # the same initial model as the run (same seed, same init): the held-out loss went down
    torch.manual_seed(1337)
    fresh = train.build_model(train.parse_args(["--tokenizer", str(tokenizer_path), *TINY]), tokenizer_path)
    fresh.eval()
    before, after = last_layer_loss(fresh, tokenizer_path, data_dir), last_layer_loss(trained, tokenizer_path, data_dir)
    assert after < before - 1.0, (before, after)
    assert f"{after:.3f}" in table[-1]  # the table printed at the end evaluates the checkpoint as written

    # the engine loads the checkpoint as it is and computes the same logits as the model in memory
    loaded = load_model(out / "model.pth", "cpu", torch.float32)
    assert loaded.args == trained.args and loaded.args.tie_embeddings
    assert "output.weight" not in torch.load(out / "model.pth", weights_only=True)  # tied: stored once
    x = torch.randint(0, loaded.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loaded.setup_caches(1, 32)
        engine_logits = loaded(x, torch.arange(20)[None])
        trained.setup_rope(32)
        memory_logits = trained.head(train.run_layers(trained, x)[-1])
    assert torch.allclose(engine_logits, memory_logits, atol=1e-5)
    tok = load_tokenizer(out / "tokenizer.model")
    text = "def compute_alpha_3(alpha, beta):\n    return alpha + beta\n"
    assert tok.decode(tok.encode(text, bos=False)) == text  # code round-trips, indentation included

    # --eval_only on the written checkpoint: the table and the plot
    plot = tmp_path / "eval.png"
    run_train(["--eval_only", "--checkpoint_path", out / "model.pth", "--data", data_dir, "--val_fraction", "0.2",
               "--seq_len", 32, "--eval_tokens", 2048, "--plot", plot])
    printed, kept_table = capsys.readouterr().out.split("Drafts a draft head")
    rows = [line for line in printed.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == 4
    assert f"{after:.3f}" in rows[-1]  # the loaded model gives the in-memory model's held-out loss
    kept_rows = [line for line in kept_table.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(kept_rows) == 4 and all(len(line.split("|")) == 6 for line in kept_rows)  # 3 sizes of draft vocabulary
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_training_loop_steps_with_the_mask_it_draws_and_the_curriculum_weights(tmp_path, data_dir, tokenizer_path, monkeypatch):
    """Each step of train() gives train_step the dropout mask it drew for the step, at the step's
    rates; the exit weights that the curriculum switches on at the step; the step's learning rate;
    and targets that are the inputs' next tokens. (That the mask and the batch depend on (seed, step)
    alone is the resume test's.)"""
    drawn, stepped = [], []
    draw, step = train.layer_keep_mask, train.train_step

    def record_draw(model, rates, batch, g=None):
        keep = draw(model, rates, batch, g)
        drawn.append((rates, keep))
        return keep

    def record_step(model, optimizer, x, y, keep, weights, grad_clip, device):
        stepped.append((optimizer.param_groups[0]["lr"], x, y, keep, weights))
        return step(model, optimizer, x, y, keep, weights, grad_clip, device)

    monkeypatch.setattr(train, "layer_keep_mask", record_draw)
    monkeypatch.setattr(train, "train_step", record_step)
    run_train(["--data", data_dir, "--tokenizer", tokenizer_path, "--val_fraction", "0.2", "--out_dir", tmp_path,
               "--steps", 6, "--stop_at", 3, "--lr", "1e-3", "--p_max", "0.9", "--dropout_depth", "exp", "--dropout_time", "exp",
               "--curriculum", "rotational", "--rotation", 2, "--e_scale", "0.5", "--loss_scale", "l", *TINY])
    assert len(drawn) == len(stepped) == 3
    for t, ((rates, drawn_keep), (lr, x, y, keep, weights)) in enumerate(zip(drawn, stepped)):
        assert torch.equal(rates, train.dropout_rates(t, 6, 4, 0.9, "exp", "exp")), t
        assert (keep is None) == (drawn_keep is None) and (keep is None or torch.equal(keep, drawn_keep)), t
        on = train.exits_on(t, 6, 4, "rotational", 2, 0.5)
        assert torch.equal(weights, train.exit_weights(on, 0.5, "l")), t
        assert lr == train.lr_at(t, 6, 1e-3, 5, 0.1), t  # TINY's --warmup, the default --min_lr_ratio
        assert torch.equal(y[:, :-1], x[:, 1:]), t
    # a run where this matters: some layers were skipped, some exits were off
    assert any(keep is not None and not keep.all() for _, keep in drawn)
    assert any((weights == 0).any() for *_, weights in stepped)


def test_resume_continues_with_same_step_and_optimizer_state(tmp_path, data_dir, tokenizer_path):
    common = ["--data", data_dir, "--tokenizer", tokenizer_path, "--val_fraction", "0.2", "--steps", 8,
              "--p_max", "0.3", "--curriculum", "gradual", "--save_interval", 3, *TINY]
    run_train([*common, "--out_dir", tmp_path / "whole"])
    run_train([*common, "--out_dir", tmp_path / "split", "--stop_at", 5])
    half = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert half["step"] == 5
    # every parameter has its Adam moments saved (the comparisons below are not over an empty state)
    assert len(half["optimizer"]["state"]) == sum(len(group["params"]) for group in half["optimizer"]["param_groups"])

    # what resuming starts from: the saved weights and optimizer state, at step 5
    run_train([*common, "--out_dir", tmp_path / "split", "--resume", "--stop_at", 5])
    again = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert again["step"] == 5
    for k in half["model"]:
        assert torch.equal(half["model"][k], again["model"][k])
    for a, b in zip(half["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert torch.equal(a["step"], b["step"]) and torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    run_train([*common, "--out_dir", tmp_path / "split", "--resume"])
    whole = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)
    assert whole["step"] == split["step"] == 8
    # the interrupted run ends exactly where the uninterrupted one does: same batches, same dropout,
    # same learning rate schedule, same Adam moments
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], split["model"][k]), k
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["step"], b["step"]) and torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert whole["optimizer"]["state"][0]["step"].item() == 8


def test_init_checkpoint_continues_from_its_weights(tmp_path, data_dir, tokenizer_path):
    base = tmp_path / "base"
    run_train(["--data", data_dir, "--tokenizer", tokenizer_path, "--val_fraction", "0.2", "--out_dir", base, "--steps", 3, *TINY])
    tuned = tmp_path / "tuned"
    # a learning rate of ~0 keeps the weights: the run really starts from the checkpoint
    run_train(["--data", data_dir, "--init_checkpoint", base / "model.pth", "--val_fraction", "0.2", "--out_dir", tuned,
               "--steps", 2, "--lr", "1e-12", "--weight_decay", 0, "--seq_len", 32, "--threads", 1, "--eval_tokens", 512])
    a, b = load_model(base / "model.pth"), load_model(tuned / "model.pth")
    assert a.args == b.args
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
    assert (tuned / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/path"], "data path not found"),
    (["--p_max", "1.5"], "--p_max"),
    (["--curriculum", "sideways"], "invalid choice"),
    (["--eval_only"], "--checkpoint_path"),
    (["--eval_only", "--checkpoint_path", "/no/such/model.pth", "--data", "{data}"], "checkpoint not found"),
])
def test_bad_input_is_one_line_on_stderr(argv, message, capsys, data_dir):
    with pytest.raises(SystemExit) as e:
        train.main([a.replace("{data}", str(data_dir)) for a in argv])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_input_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "data path not found" in r.stderr
