"""A draft head over part of the vocabulary: its logits are the full head's for the kept tokens
(float, int8, int4), greedy self-speculation with it returns the autoregressive tokens for every
kept set - drafts outside it included - batched or not, sampling keeps the full model's
distribution, and the flags choose the kept tokens (tokenizer order, or counts on a corpus saved
beside the checkpoint) or refuse bad input in one line."""
import json
import math
from collections import Counter

import pytest
import torch

import generate
from common import generate_batch, prefill, weight_bytes
from conftest import N_LAYER
from model import load_model
from quantize import quantize_state
from self_spec import corpus_token_counts, draft_vocab_ids, speculative_step, speculative_steps
from test_batch import EXIT, PROMPTS, ROWS, TEMPERATURE, TOP_K, VOCAB, damped_model, empirical, exact_distributions, run_batch, tv
from tokenizer import load_tokenizer

MAX_NEW = 23


def quantized_file(path, tmp_path, mode: str, groupsize=None):
    from model import ModelArgs
    state = torch.load(path, weights_only=True)
    quantized, _ = quantize_state(state, ModelArgs.load(path.parent / "model_config.json"), mode, groupsize)
    out = tmp_path / f"model_{mode}.pth"
    torch.save(quantized, out)
    (tmp_path / "model_config.json").write_text((path.parent / "model_config.json").read_text())
    return out


@pytest.mark.parametrize("style", ["llama2", "llama32"])
def test_the_draft_head_gives_the_full_heads_logits_of_the_kept_tokens(checkpoints, tmp_path, style):
    """Float (untied and tied to the embedding), int8 and int4 (kept rows taken before packing; 37
    rows, padded to the kernels' 16): draft_head(h) is head(h) at the kept ids, in their order."""
    path, _ = checkpoints(style)
    vocab = load_model(path).args.vocab_size
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:37].sort().values
    files = {"float": path, "int8": quantized_file(path, tmp_path, "int8"),
             "int4": quantized_file(path, tmp_path, "int4", 32)}
    h = torch.randn(2, 3, 64)
    for kind, file in files.items():
        model = load_model(file, "cpu", torch.float32, draft_ids=ids)
        with torch.inference_mode():
            kept, full = model.draft_head(h), model.head(h)
        assert kept.shape == (2, 3, 37) and torch.allclose(kept, full[..., ids], atol=1e-5), kind
        assert torch.equal(model.draft_ids, ids)
        # the bandwidth report counts what a full forward reads: not the draft head's copy
        assert weight_bytes(model) == weight_bytes(load_model(file, "cpu", torch.float32)), kind
    for kind in ("int8", "int4"):  # their heads are packed at load: the rows are no longer codes
        with pytest.raises(ValueError, match="packed already"):
            load_model(files[kind], "cpu", torch.float32).set_draft_vocab(ids)
    model = load_model(path)
    for bad in (torch.tensor([1, 1, 2]), torch.tensor([0, vocab]), torch.tensor([-1, 3]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="draft vocabulary"):
            model.set_draft_vocab(bad)


def run(model, prompts, exit_layer=None, k=0, batch_size=1):
    model.setup_caches(batch_size, max(map(len, prompts)) + MAX_NEW + k + 1, exit_layer)
    steps = speculative_steps((k,), 0.0, None)
    with torch.inference_mode():
        results = generate_batch(model, prompts, MAX_NEW, prefill_fn=partial_prefill, steps=steps, stop_ids=set(),
                                 batch_size=batch_size)
    return [r["generated_tokens"] for r in results], [r["acceptance_rate"] for r in results]


def partial_prefill(model, idx, lengths, rows):
    return prefill(model, idx, lengths, rows, temperature=0.0, top_k=None)


@pytest.mark.parametrize("style", ["llama2", "llama32"])
def test_greedy_equals_autoregressive_for_every_kept_set(checkpoints, tmp_path, style):
    """Kept sets of 1 token, a few, half, all, and one without any token the full model emits
    (every draft falls outside it: nothing is accepted, every token comes from the verify pass);
    one row and two rows of a batch refilled with three prompts; float and int8 (its head packed at
    load: the kept set given to load_model)."""
    path, _ = checkpoints(style)
    torch.manual_seed(1)
    prompts = [[1] + torch.randint(3, 300, (n,)).tolist() for n in (4, 11, 2)]
    for file in (path, quantized_file(path, tmp_path, "int8")):
        model = load_model(file, "cpu", torch.float32)
        vocab = model.args.vocab_size
        reference, _ = run(model, prompts)
        emitted = {t for tokens in reference for t in tokens}
        outside = torch.tensor([t for t in range(vocab) if t not in emitted])
        kept_sets = {"1": torch.tensor([5]), "8": torch.arange(8), "half": torch.arange(0, vocab, 2),
                     "all": torch.arange(vocab), "outside": outside}
        agreement = {}
        for name, ids in kept_sets.items():
            model = load_model(file, "cpu", torch.float32, draft_ids=ids)
            for batch_size in (1, 2):
                tokens, acceptance = run(model, prompts, N_LAYER // 2, k=3, batch_size=batch_size)
                assert tokens == reference, (file.name, name, batch_size)
                agreement[name] = acceptance
        assert agreement["outside"] == [0.0] * 3  # the drafts did fall outside: none was right
        assert max(agreement["all"]) > 0  # ... where the full head's drafts are sometimes right
        model.set_draft_vocab(None)
        assert model.draft_output is None and run(model, prompts, N_LAYER // 2, k=3)[0] == reference


def test_sampling_with_a_draft_vocabulary_keeps_the_full_model_distribution():
    """Drafts from a head over 3 of the 6 tokens (q is zero at the other 3, where the full model
    puts about half its mass): k = 1 and 3 on two prompts in alternating rows of a batch, checked
    on the k drafts' positions, the token after them - from max(p - q, 0) after a rejection, or
    from p after k acceptances (the bonus token: about a third of the k = 1 steps here) - and the
    first tokens of the next step.

    Resolution as test_batch's (Bretagnolle-Huber-Carol, N = 10,000 samples per prompt, a budget
    of 1e-3 for a false alarm over all checks): a token's distribution 0.028 off in total variation
    (m = 6 cells), a pair's 0.047 (m = 36) is caught. Subtracting q at the first N ids instead of
    the kept ones, drawing the bonus token from the last draft's residual, or drafting the kept
    index instead of its token id was 0.19, 0.41 and 0.30 off at the worst checked pair on this
    model when tried."""
    model = damped_model()
    kept = torch.tensor([0, 2, 5])
    model.set_draft_vocab(kept)
    cases = {1: 4, 3: 6}  # k: tokens checked
    checks = 2 * sum(2 * depth - 1 for depth in cases.values())
    delta = 1e-3 / checks
    eps = {m: math.sqrt((m * math.log(2) + math.log(1 / delta)) / (2 * ROWS)) for m in (VOCAB, VOCAB ** 2)}
    assert eps[VOCAB] < 0.03 and eps[VOCAB ** 2] < 0.05
    model.setup_caches(1, 8, EXIT)
    with torch.inference_mode():
        first = model.head(model.late(model.early(torch.tensor([PROMPTS[0]]), torch.arange(3)[None]), torch.arange(3)[None]))
    outside_mass = 1 - torch.softmax(first[0, -1] / TEMPERATURE, -1)[kept].sum()
    assert outside_mass > 0.2  # the full model often wants a token the drafts cannot make
    for k, depth in cases.items():
        torch.manual_seed(k)
        assert all_accepted(model, PROMPTS[0], k) > 0.1  # the bonus token is drawn often enough to be checked
        _, results = run_batch(model, PROMPTS * ROWS, depth, batch_size=ROWS, exit_layer=EXIT, k=k,
                               temperature=TEMPERATURE, top_k=TOP_K)
        for p, prompt in enumerate(PROMPTS):
            exact_marginals, exact_pairs = exact_distributions(model, prompt, depth)
            marginals, pairs = empirical([r["generated_tokens"] for r in results[p::2]], depth)
            off = [f"token {i}: {tv(a, b):.3f}" for i, (a, b) in enumerate(zip(marginals, exact_marginals)) if tv(a, b) >= eps[VOCAB]]
            off += [f"tokens {i}, {i + 1}: {tv(a, b):.3f}" for i, (a, b) in enumerate(zip(pairs, exact_pairs))
                    if tv(a, b) >= eps[VOCAB ** 2]]
            assert off == [], (k, p, off)


def all_accepted(model, prompt: list[int], k: int) -> float:
    """The share of first steps after `prompt` whose k drafts are all accepted (over 2,000 rows)."""
    rows = 2000
    model.setup_caches(rows, 16, EXIT)
    with torch.inference_mode():
        idx = torch.tensor([prompt] * rows)
        token = prefill(model, idx, torch.full((rows,), len(prompt)), torch.arange(rows), TEMPERATURE, TOP_K)
        _, n, _, _ = speculative_step(model, token[:, None], torch.full((rows,), len(prompt)), k, TEMPERATURE, TOP_K)
    return (n == k).float().mean().item()


def test_the_kept_tokens_follow_the_tokenizer_or_the_corpus(tmp_path):
    """The tokenizer's order: emitted special tokens first (kept even at N = 1), then SentencePiece
    by score, tiktoken by rank. With counts: the emitted ones, then the most counted, then the
    tokenizer's order; ids the model has past the tokenizer's last."""
    from tiny_tokenizers import make_sentencepiece_model, make_tiktoken_model
    sp = load_tokenizer(make_sentencepiece_model(tmp_path / "sp.model"))
    tt = load_tokenizer(make_tiktoken_model(tmp_path / "tt.model"))
    scores = [sp.sp.get_score(i) for i in sp.frequency_order()[1:]]
    assert sp.frequency_order()[0] == sp.eos_id and scores == sorted(scores, reverse=True)
    assert sorted(sp.frequency_order()) == list(range(sp.vocab_size))
    eot = tt.special_tokens["<|eot_id|>"]
    assert tt.frequency_order()[:2] == [tt.eos_id, eot] and sorted(tt.frequency_order()) == list(range(tt.vocab_size))
    assert draft_vocab_ids(sp, 1, sp.vocab_size).tolist() == [sp.eos_id]
    assert draft_vocab_ids(tt, 6, tt.vocab_size).tolist() == sorted([0, 1] + tt.emitted_ids)
    counts = Counter({300: 9, 200: 5, 250: 5, 7: 1})
    assert draft_vocab_ids(tt, 8, tt.vocab_size, counts).tolist() == sorted(tt.emitted_ids + [300, 200, 250, 7])
    assert draft_vocab_ids(tt, 9, tt.vocab_size, counts).tolist() == sorted(tt.emitted_ids + [300, 200, 250, 7, 0])
    padded = draft_vocab_ids(sp, sp.vocab_size + 2, sp.vocab_size + 2)
    assert padded.tolist() == list(range(sp.vocab_size + 2))
    for n in (0, sp.vocab_size + 1):
        with pytest.raises(ValueError, match="between 1 and"):
            draft_vocab_ids(sp, n, sp.vocab_size)


def test_corpus_counts_are_saved_beside_the_checkpoint_and_counted_once(tmp_path):
    from tiny_tokenizers import make_tiktoken_model
    tokenizer = load_tokenizer(make_tiktoken_model(tmp_path / "tt.model"))
    texts = ["the model drafts", "def f(x):\n    return x"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"prompt": texts[0]}) + "\n" + json.dumps({"text": texts[1], "id": 3}) + "\n")
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    expected = Counter(tokenizer.encode(texts[0], bos=False) + tokenizer.encode(texts[1], bos=False))
    assert corpus_token_counts(tokenizer, corpus, checkpoint_dir) == expected
    saved = list(checkpoint_dir.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("draft_vocab_counts.") and saved[0].suffix == ".json"
    assert json.loads(saved[0].read_text())["tokens"] == sum(expected.values())

    class NoEncoding:  # a second count would encode again
        def encode(self, text, bos):
            raise AssertionError("counted twice")
    assert corpus_token_counts(NoEncoding(), corpus, checkpoint_dir) == expected
    plain = tmp_path / "corpus.txt"
    plain.write_text("\n".join(texts))
    assert corpus_token_counts(tokenizer, plain, checkpoint_dir) == Counter(tokenizer.encode("\n".join(texts), bos=False))
    assert len(list(checkpoint_dir.iterdir())) == 2  # another corpus, another file; no temporary left


def test_generate_with_a_draft_vocabulary_and_its_bad_input(checkpoints, tmp_path, capsys):
    """--draft_vocab (and --draft_vocab_from, in-process) give the autoregressive tokens; bad values
    and a missing corpus end in one line on stderr."""
    path, _ = checkpoints("llama32")
    common = ["--checkpoint_path", str(path), "--prompt", "def f(", "--max_new_tokens", "12", "--temperature", "0", "--json"]
    generate.main(common)
    reference = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"][0]["generated_tokens"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 3)
    for flags in (["--draft_vocab", "40"], ["--draft_vocab", "40", "--draft_vocab_from", str(corpus)]):
        generate.main(common + ["--draft_layers", "3", "--speculate_k", "3", *flags])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["samples"][0]["generated_tokens"] == reference and result["draft_vocab"] == 40, flags
    saved = list(path.parent.glob("draft_vocab_counts.*.json"))
    assert len(saved) == 1
    saved[0].unlink()
    vocab = load_tokenizer(path.parent / "tokenizer.model").vocab_size
    bad = [(["--draft_layers", "3", "--draft_vocab", "0"], "--draft_vocab must be at least 1"),
           (["--draft_layers", "3", "--draft_vocab", str(vocab + 1)], f"--draft_vocab must be between 1 and the vocabulary's {vocab}"),
           (["--draft_layers", "3", "--draft_vocab", "9", "--draft_vocab_from", str(tmp_path / "none.txt")],
            "--draft_vocab_from: file not found"),
           (["--draft_layers", "3", "--draft_vocab_from", str(corpus)], "--draft_vocab_from needs --draft_vocab"),
           (["--draft_vocab", "9"], "--draft_vocab needs --draft_layers")]
    for flags, message in bad:
        with pytest.raises(SystemExit) as exit_:
            generate.main(common + flags)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (flags, lines)


def test_eval_reports_the_share_of_drafts_each_draft_vocabulary_keeps():
    """evaluate_layers' "kept": per exit layer, how often the argmax over the kept tokens is the
    argmax over all - counted here from each exit's logits directly: all of them for the whole
    vocabulary, none for the tokens that are never an argmax, and the share in between."""
    import train
    from test_train import tiny_model
    model = tiny_model(n_layer=4).eval()
    windows = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        argmax = [model.head(h).argmax(-1) for h in train.run_layers(model, windows[:, :-1])]
    favourites = torch.cat(argmax).unique()
    never = torch.tensor([t for t in range(64) if t not in favourites])
    half = torch.arange(0, 64, 2)
    results = train.evaluate_layers(model, windows, draft_vocabs={"all": torch.arange(64), "never": never, "half": half})
    for layer, r in zip(argmax, results):
        assert r["kept"]["all"] == 1.0 and r["kept"]["never"] == 0.0
        assert r["kept"]["half"] == pytest.approx((layer % 2 == 0).double().mean().item())
