"""eval.py, the lm-eval adapter: its scores against Hugging Face transformers' forward on the same
weights (an implementation that shares no code with the engine), and whole harness runs of local
tasks (a JSONL file and a task YAML made here) whose expected metrics are derived from those scores.

Offline: the harness's datasets come from local files; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set
before `datasets` is first imported (it reads them then), so nothing reaches for the network."""
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-eval.txt)")

import eval as engine_eval  # noqa: E402
from conftest import N_LAYER, ROOT, write_task  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from common import generate_batch  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CONTEXT = 128  # the tiny models' max_position_embeddings

# A few KB of text the tiny tokenizers were trained on: long enough for several windows.
LONG_TEXT = open(ROOT / "tests" / "tiny_tokenizers.py").read()


@pytest.fixture(scope="module")
def tiny(checkpoints):
    """(checkpoint path, HF model, tokenizer) of the SentencePiece-style tiny model."""
    path, hf = checkpoints("llama2")
    return path, hf, load_tokenizer(path.parent / "tokenizer.model")


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """log-softmax of HF's logits for one sequence, (len, vocab)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), -1)


def reference_loglikelihood(hf, context_tokens: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is HF's argmax."""
    logprobs = hf_logprobs(hf, context_tokens + continuation)[len(context_tokens) - 1:-1]
    target = torch.tensor(continuation)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def clean_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Test data is chosen so that the whole text's tokens begin with the context's."""
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    assert whole[:len(head)] == head, (context, continuation)
    return head, whole[len(head):]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def engine_lm(path, **kwargs):
    model = load_model(path)
    return engine_eval.make_engine_lm(model, load_tokenizer(path.parent / "tokenizer.model"), **kwargs)


# --- scoring, against HF's forward -----------------------------------------------------------------

def test_loglikelihood_matches_a_direct_forward_with_padding_and_exact_splits(tiny):
    path, hf, tokenizer = tiny
    # A greedy continuation that survives decode + encode (byte-fallback tokens often do not), so
    # that is_greedy is True for one request and the check of it means something; and the same
    # context with only the first token greedy, for which it is False.
    greedy = mixed = None
    for context in ["for step in range(10):", "A language model", "In the morning the train", "The cache stores"]:
        head = tokenizer.encode(context)
        out = hf.generate(torch.tensor([head]), max_new_tokens=2, do_sample=False)[0, len(head):].tolist()
        text = tokenizer.decode(head + out)[len(tokenizer.decode(head)):]
        first = tokenizer.decode(head + out[:1])[len(tokenizer.decode(head)):]
        if (tokenizer.encode(context + text) == head + out and not text.endswith(" ")
                and tokenizer.encode(context + first + " the lazy dog")[:len(head) + 1] == head + out[:1]):
            greedy, mixed = (context, text), (context, first + " the lazy dog")
            break
    assert greedy is not None
    cases = [("The quick brown", " fox jumps over the lazy dog"),
             ("def greedy(logits):", "\n    return int(logits.argmax(dim=-1))"),
             ("A", " language model predicts the next token from the tokens before it, and the cache stores"),
             greedy,
             ("She said that the results were good", ","),
             ("Reading the weights from memory is the slow part of generation, so", " a smaller model"),
             mixed]
    expected = [reference_loglikelihood(hf, *clean_split(tokenizer, c, x)) for c, x in cases]
    assert expected[3][1] and not expected[6][1]  # greedy; only its first token greedy
    lengths = [len(tokenizer.encode(c + x)) for c, x in cases]
    assert len(set(lengths)) == len(lengths)  # every batch pads some of its rows
    # the harness's special cases: an empty context (the continuation after BOS alone), and a
    # context's trailing space, which belongs to the continuation
    cases.append(("", "The cache stores the keys"))
    expected.append(reference_loglikelihood(hf, [tokenizer.bos_id], tokenizer.encode("The cache stores the keys", bos=False)))
    cases.append(("The quick brown ", "fox"))
    expected.append(reference_loglikelihood(hf, *clean_split(tokenizer, "The quick brown", " fox")))
    # A split inside a token: "Th" + "e quick" encodes whole as [..., "▁T", "he", ...], not with
    # "Th"'s [..., "▁T", "h"] as its start; the token across the split is the continuation's first.
    whole, head = tokenizer.encode("The quick brown"), tokenizer.encode("Th")
    assert whole[:len(head)] != head and whole[:len(head) - 1] == head[:-1]
    cases.append(("Th", "e quick brown"))
    expected.append(reference_loglikelihood(hf, whole[:len(head) - 1], whole[len(head) - 1:]))
    # A context longer than the model's: the tokens are cut on the left to the last CONTEXT + 1
    long_context = LONG_TEXT[:300].rstrip()
    long_tokens = clean_split(tokenizer, long_context, " the model")
    assert len(long_tokens[0]) > CONTEXT + 50
    cases.append((long_context, " the model"))
    kept = (long_tokens[0] + long_tokens[1])[-(CONTEXT + 1):]
    expected.append(reference_loglikelihood(hf, kept[:-len(long_tokens[1])], long_tokens[1]))

    for batch_size in (3, 1):
        results = engine_lm(path, batch_size=batch_size).loglikelihood(requests("loglikelihood", cases))
        for case, (logprob, is_greedy), (ref_logprob, ref_greedy) in zip(cases, results, expected):
            # float32: the engine sums in another order than transformers: ~1e-4 of rounding on a sum of ~300 nats
            assert logprob == pytest.approx(ref_logprob, rel=1e-6, abs=1e-4), (batch_size, case)
            assert is_greedy == ref_greedy, (batch_size, case)
        assert [g for _, g in results].count(True) == 1 and results[3][1]  # the greedy case, and only it


def test_loglikelihood_rolling_scores_every_token_in_windows_of_the_context(tiny):
    """Windows as the harness defines them (context_len 1): the first is BOS + tokens[:127] and scores
    tokens[:128]; each next one scores the next 128 tokens given the 128 tokens before each; the last
    scores what is left, with a full context of earlier tokens."""
    path, hf, tokenizer = tiny
    texts = [LONG_TEXT[:600], "The quick brown fox", LONG_TEXT[3000:3200]]
    expected = []
    for text in texts:
        full = [tokenizer.bos_id] + tokenizer.encode(text, bos=False)
        n = len(full) - 1  # tokens to score: full[1:]
        total = 0.0
        for start in range(0, n, CONTEXT):
            end = min(start + CONTEXT, n)  # this window scores full[start + 1 : end + 1]
            window = full[max(0, end - CONTEXT):end]  # the CONTEXT tokens before full[end]
            logprobs = hf_logprobs(hf, window)[len(window) - (end - start):]
            total += logprobs.gather(1, torch.tensor(full[start + 1:end + 1])[:, None]).sum().item()
        expected.append(total)
    counts = [len(tokenizer.encode(t, bos=False)) for t in texts]
    assert counts[0] > 2 * CONTEXT and counts[0] % CONTEXT != 0  # several windows, the last one overlapping
    assert counts[1] < CONTEXT and CONTEXT < counts[2] < 2 * CONTEXT
    results = engine_lm(path, batch_size=2).loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    assert results == pytest.approx(expected, abs=1e-3)


# --- whole harness runs of local tasks -----------------------------------------------------------

def run_eval(capsys, *argv: str) -> tuple[dict, str]:
    """eval.main in this process: (the JSON it wrote to --output, stdout)."""
    capsys.readouterr()
    engine_eval.main(list(argv))
    out = capsys.readouterr().out
    output = argv[argv.index("--output") + 1]
    return json.loads(open(output).read()), out


QUESTIONS = ["The quick brown fox jumps over the", "A language model predicts the next", "def greedy(logits):\n    return int(logits",
             "In the morning the train leaves at", "Numbers like 3, 14, 159 are split into", "The cache stores the keys and"]
CHOICES = ["lazy dog", "token", "return", "seven", "groups", "values", "model", "weather"]


def test_multiple_choice_task_accuracy_is_exactly_what_the_scores_say(tiny, tmp_path, capsys):
    """Six questions with three options each; the "gold" option is the one the model scores highest
    for questions 0, 1 and 3 and the lowest-scored one for the others, so the accuracy over the first
    five (--limit 5) is exactly 3/5 (all six: 1/2)."""
    path, hf, tokenizer = tiny
    docs, scores = [], []
    for q, question in enumerate(QUESTIONS):
        options = [CHOICES[(q + i) % len(CHOICES)] for i in range(3)]
        lls = [reference_loglikelihood(hf, *clean_split(tokenizer, question, " " + o))[0] for o in options]
        ranked = sorted(lls)
        assert ranked[2] - ranked[1] > 1e-2 and ranked[1] - ranked[0] > 1e-2  # no near-ties
        gold = lls.index(max(lls)) if q in (0, 1, 3) else lls.index(min(lls))
        docs.append({"question": question, "options": options, "gold": gold})
        scores.append(lls)
    write_task(tmp_path, "tiny_mc", docs, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
               "doc_to_choice: '{{options}}'\ndoc_to_target: '{{gold}}'\n"
               "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    output = tmp_path / "results.json"
    results, out = run_eval(capsys, "--checkpoint_path", str(path), "--tasks", "tiny_mc", "--include_path",
                            str(tmp_path), "--limit", "5", "--batch_size", "4", "--output", str(output),
                            "--log_samples")
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(3 / 5)
    assert results["n-samples"]["tiny_mc"]["effective"] == 5
    row = next(line for line in out.splitlines() if line.startswith("|tiny_mc"))  # the harness's table
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[5] == "acc" and float(cells[7]) == pytest.approx(3 / 5)
    for sample in results["samples"]["tiny_mc"]:  # each option's score, as the harness received it
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(scores[sample["doc_id"]], abs=1e-4)


def hf_greedy_texts(hf, tokenizer, prompts: list[str], max_new: int) -> list[tuple[list[int], list[int], str]]:
    out = []
    for prompt in prompts:
        head = tokenizer.encode(prompt)
        tokens = hf.generate(torch.tensor([head]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tokenizer.eos_id, pad_token_id=0)[0, len(head):].tolist()
        if tokenizer.eos_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_id) + 1]
        text_tokens = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens
        out.append((head, tokens, tokenizer.decode(head + text_tokens)[len(tokenizer.decode(head)):]))
    return out


def test_generation_task_self_speculation_equals_autoregressive_and_stops_cut(tiny, tmp_path, capsys):
    """A generate_until task, greedy: every output is HF's greedy text cut at the first stop string,
    with AR and with self-speculation; generation ends at the stop (not only the text); the
    exact-match metric is what the targets say; --compare_ar reports the speedup."""
    path, hf, tokenizer = tiny
    prompts = ["The quick brown", "def greedy(logits):", "In the morning the train", "She said that",
               "Numbers like 3", "for step in range(10):"]
    max_new = 24
    greedy = hf_greedy_texts(hf, tokenizer, prompts, max_new)
    texts = [text for _, _, text in greedy]
    # Stop strings from the texts themselves: for rows 0, 2 and 4, two characters a few characters into
    # the row's text that occur nowhere else in any text, so that those rows stop early (each at its
    # own stop string) and the others run to max_gen_toks.
    until = []
    for i in (0, 2, 4):
        others = [t for j, t in enumerate(texts) if j != i]
        until.append(next(texts[i][j:j + 2] for j in range(3, len(texts[i]) - 4)
                          if texts[i][j:j + 2].isprintable() and "\ufffd" not in texts[i][j:j + 2]
                          and texts[i][j:j + 2] not in texts[i][:j + 1] and not any(texts[i][j:j + 2] in t for t in others)))
    cut = [t[:min([t.find(u) for u in until if u in t], default=len(t))] for t in texts]
    stopped = [c != t for c, t in zip(cut, texts)]
    assert stopped == [True, False, True, False, True, False] and all(cut)
    # tokens a row generates before its text contains the stop string (all of them if it never does)
    used = []
    for (head, tokens, _), s in zip(greedy, stopped):
        n = len(tokens)
        if s:
            n = next(i for i in range(1, len(tokens) + 1)
                     if any(u in tokenizer.decode(head + tokens[:i])[len(tokenizer.decode(head)):] for u in until))
        used.append(n)
    targets = [c if i % 2 == 0 else "no" for i, c in enumerate(cut)]
    docs = [{"prompt": p, "target": t} for p, t in zip(prompts, targets)]
    write_task(tmp_path, "tiny_gen", docs, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
               "doc_to_target: '{{target}}'\ngeneration_kwargs:\n"
               f"  until: {json.dumps(until)}\n  max_gen_toks: {max_new}\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    flags = ["--checkpoint_path", str(path), "--tasks", "tiny_gen", "--include_path", str(tmp_path), "--batch_size", "4",
             "--log_samples"]
    ar, _ = run_eval(capsys, *flags, "--output", str(tmp_path / "ar.json"))
    spec, out = run_eval(capsys, *flags, "--output", str(tmp_path / "spec.json"), "--draft_layers", "3",
                         "--speculate_k", "3", "--compare_ar")
    for results in (ar, spec):
        samples = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
        assert [s["resps"][0][0] for s in samples] == cut
        assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(3 / 6)
    generation = ar["engine"]["generation"]
    assert generation["generated_tokens"] == sum(used) and generation["acceptance_rate"] is None
    generation = spec["engine"]["generation"]
    assert 0 <= generation["acceptance_rate"] <= 1 and generation["generated_tokens"] >= sum(used)
    assert generation["autoregressive"]["generated_tokens"] == sum(used)
    assert generation["autoregressive"]["identical_greedy_outputs"] == generation["autoregressive"]["greedy_requests"] == 6
    assert generation["tokens_per_sec"] == pytest.approx(generation["generated_tokens"] / generation["seconds"])
    assert generation["speedup"] == pytest.approx(generation["tokens_per_sec"] / generation["autoregressive"]["tokens_per_sec"])
    assert "speedup" in out and "identical greedy outputs 6/6" in out


def test_generate_until_follows_gen_kwargs(tiny, monkeypatch):
    """Sampling when asked, greedy otherwise; each request's own max_gen_toks ends its row, also when
    requests with other budgets share the batch; a context too long is cut on the left."""
    path, hf, tokenizer = tiny
    lm = engine_lm(path, batch_size=3, draft_layers=2, speculate_k=2)
    torch.manual_seed(0)
    sampled = lm.generate_until(requests("generate_until", [("The quick brown", {"do_sample": True, "temperature": 1.0,
                                                                                  "max_gen_toks": 12, "until": []})] * 3))
    greedy = lm.generate_until(requests("generate_until", [("The quick brown", {"temperature": 0.0, "max_gen_toks": 12,
                                                                                 "until": []})] * 2))
    assert len(set(sampled)) == 3 and greedy[0] == greedy[1] and greedy[0] not in sampled
    # a context too long for the model keeps its last tokens, leaving room for max_gen_toks
    long_context = LONG_TEXT[:600]
    kept = tokenizer.encode(long_context)[-(CONTEXT - 8):]
    out = hf.generate(torch.tensor([kept]), max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_id,
                      pad_token_id=0)[0, len(kept):].tolist()
    assert tokenizer.eos_id not in out
    text = tokenizer.decode(kept + out)[len(tokenizer.decode(kept)):]
    assert lm.generate_until(requests("generate_until", [(long_context, {"max_gen_toks": 8, "until": []})])) == [text]
    generated = []

    def spy(*args, **kwargs):
        results = generate_batch(*args, **kwargs)
        generated.extend(len(r["generated_tokens"]) for r in results)
        return results

    monkeypatch.setattr(engine_eval, "generate_batch", spy)
    lm = engine_lm(path, batch_size=2)
    lm.generate_until(requests("generate_until", [("The quick brown", {"max_gen_toks": n, "until": []}) for n in (3, 12, 5)]))
    assert generated == [3, 12, 5]
    settings = engine_eval.decoding_settings
    assert settings({}) == {"temperature": 0.0, "top_k": None, "max_gen_toks": 256, "until": []}
    assert settings({"temperature": 0.7, "until": "\n", "max_new_tokens": 9}) == {
        "temperature": 0.7, "top_k": None, "max_gen_toks": 9, "until": ["\n"]}
    assert settings({"do_sample": False, "temperature": 0.7, "top_k": 5})["temperature"] == 0.0
    assert settings({"do_sample": True, "top_k": 5}) == {"temperature": 1.0, "top_k": 5, "max_gen_toks": 256, "until": []}


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input_gives_one_clear_line(tiny, tmp_path, capsys, monkeypatch):
    path, _, _ = tiny
    write_task(tmp_path, "tiny_mc", [{"q": "a", "o": ["b", "c"], "g": 0}],
               "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{o}}'\ndoc_to_target: '{{g}}'\n"
               "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiny_broken.yaml").write_text(
        f"task: tiny_broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'missing.jsonl'}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    base = ["--checkpoint_path", str(path), "--include_path", str(tmp_path)]
    cases = [
        (["--checkpoint_path", str(tmp_path / "none.pth"), "--tasks", "tiny_mc"], "checkpoint not found"),
        ([*base, "--tasks", "tiny_mcq"], "unknown task 'tiny_mcq' (did you mean tiny_mc"),
        ([*base, "--tasks", "tiny_mc", "--draft_layers", str(N_LAYER)], f"--draft_layers must be between 1 and {N_LAYER - 1}"),
        ([*base, "--tasks", "tiny_mc", "--compare_ar"], "--compare_ar needs --draft_layers"),
        ([*base, "--tasks", "tiny_mc", "--limit", "0"], "--limit must be positive"),
        (["--checkpoint_path", str(path), "--tasks", "tiny_mc", "--include_path", str(tmp_path / "nowhere")],
         "--include_path is not a folder"),
        (["--checkpoint_path", str(path), "--tasks", "tiny_broken", "--include_path", str(broken)], "cannot load task tiny_broken"),
        ([*base], "--tasks"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            engine_eval.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code != 0, argv
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, lines)
    # a continuation longer than the model's context cannot be scored: an error, not a wrong number
    with pytest.raises(engine_eval.RequestError, match="longer than the model's context of 128"):
        engine_lm(path).loglikelihood(requests("loglikelihood", [("A", " " + LONG_TEXT[:400])]))
    # lm-eval not installed
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(SystemExit) as exit_:
        engine_eval.main([*base, "--tasks", "tiny_mc"])
    assert exit_.value.code != 0
    assert capsys.readouterr().err.strip() == "error: lm-eval is not installed: pip install -r requirements-eval.txt"


def test_the_script_itself_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint_path", str(tmp_path / "model.pth"),
                           "--tasks", "hellaswag"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'model.pth'}"
