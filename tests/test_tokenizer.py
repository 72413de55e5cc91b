"""tokenizer.py against the sentencepiece, tiktoken and transformers libraries, on tiny tokenizer files made offline."""
import json

import pytest
import sentencepiece as spm
import tiktoken
import tiktoken.load

from tiny_tokenizers import SAMPLE_TEXT, make_sentencepiece_model, make_tiktoken_model, make_tokenizer_json
from tokenizer import LLAMA3_PATTERN, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

SP_VOCAB, TK_MERGES = 320, 200
TK_BASE = 256 + TK_MERGES
# Meta's Llama 3 split pattern, copied here on its own so a typo in tokenizer.py cannot pass unnoticed
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "",
    "Hello, world!",
    "the cat sat on the mat, and the dog sat on the log.",
    "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "   leading, trailing and   inner   runs of spaces   ",
    "\n\n\nnew\r\nlines\n",
    "unicode: héllo wörld, 日本語, Ελληνικά, emoji 🙂👍🏽, math ∑∞",
    "numbers 1234567890 3.14159 -42",
    "I'm sure they'll say it's what we'd DO'nt",
    SAMPLE_TEXT,
]


def SHORT_ID(text: str) -> str:  # readable test ids
    return repr(text[:24])


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    # a SentencePiece model in a folder named like a Llama 3 one: detection must read the content
    return make_sentencepiece_model(tmp_path_factory.mktemp("llama3") / "tokenizer.model", vocab_size=SP_VOCAB)


@pytest.fixture(scope="module")
def tk_path(tmp_path_factory):
    # and a tiktoken file in a folder named like a Llama 2 one
    return make_tiktoken_model(tmp_path_factory.mktemp("llama2") / "tokenizer.model", n_merges=TK_MERGES)


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory):
    return make_tokenizer_json(tmp_path_factory.mktemp("hf")).parent


@pytest.fixture(params=["sentencepiece", "tiktoken", "tokenizer.json"])
def tok(request, sp_path, tk_path, json_folder):
    paths = {"sentencepiece": sp_path, "tiktoken": str(tk_path), "tokenizer.json": json_folder}
    return load_tokenizer(paths[request.param])  # a file (str or Path) or a checkpoint folder


def test_llama3_pattern_is_metas():
    # the tiny vocab has too few merges to notice every change of the pattern through encode alone
    assert LLAMA3_PATTERN == META_PATTERN


def test_format_detected_from_content(sp_path, tk_path):
    assert "llama3" in str(sp_path) and "llama2" in str(tk_path)
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tk_path), TiktokenTokenizer)


@pytest.mark.parametrize("text", TEXTS, ids=SHORT_ID)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert tok.decode(ids[1:]) == text
    assert tok.encode(text, bos=False) == ids[1:]
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_long_whitespace_run_round_trips(tok):
    # tiktoken's regex fails on ~1M spaces in a row; the tokenizer cuts long runs as Meta's does
    text = "a" + " " * 1_000_000 + "b" + "x" * 30_000
    assert tok.decode(tok.encode(text, bos=False)) == text


@pytest.mark.parametrize("text", TEXTS, ids=SHORT_ID)
def test_matches_sentencepiece_library(sp_path, text):
    ref = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert load_tokenizer(sp_path).encode(text) == [1] + ref.encode(text)


@pytest.mark.parametrize("text", TEXTS + ["<|begin_of_text|>x<|eot_id|>"], ids=SHORT_ID)
def test_matches_tiktoken_library(tk_path, text, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches files by path name: never read a stale one
    ranks = tiktoken.load.load_tiktoken_bpe(str(tk_path))
    ref = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert load_tokenizer(tk_path).encode(text) == [TK_BASE] + ref.encode_ordinary(text)


def test_sentencepiece_ids(sp_path):
    tok = load_tokenizer(sp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, SP_VOCAB)


def test_tiktoken_ids(tk_path):
    assert len(tk_path.read_text().splitlines()) == TK_BASE
    tok = load_tokenizer(tk_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (TK_BASE, TK_BASE + 1, TK_BASE + 256)
    # Meta's special-token layout, read back through decode
    specials = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
                4: "<|finetune_right_pad_id|>", 5: "<|step_id|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
                8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>", 11: "<|reserved_special_token_2|>",
                255: "<|reserved_special_token_246|>"}
    for offset, name in specials.items():
        assert tok.decode([TK_BASE + offset]) == name


@pytest.mark.parametrize("text", ["<|end_of_text|>", "a <|begin_of_text|> b <|eot_id|>", "</s><s>", "<unk>"])
def test_text_cannot_inject_special_ids(tok, text):
    if isinstance(tok, HFTokenizer):
        pytest.skip("a tokenizer.json parses special-token strings, as transformers does (test_json_matches_transformers)")
    ids = tok.encode(text, bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    if isinstance(tok, TiktokenTokenizer):
        assert all(i < TK_BASE for i in ids)  # no special id at all
    assert tok.decode(ids) == text


def test_decode_prefixes_are_stable(tok):
    # the CLI prints the growing decode of the generated ids: each prefix must decode to a prefix of the
    # final text, except for a trailing U+FFFD where the prefix ends inside a multi-byte character
    ids = tok.encode("Hi 日本🙂 the wörld, ok", bos=False)
    parts = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    assert parts[-1] == "Hi 日本🙂 the wörld, ok"
    for part in parts:
        assert parts[-1].startswith(part.rstrip("\ufffd"))
    assert any(part.endswith("\ufffd") for part in parts)  # a prefix does end inside a character


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
    """A model's vocabulary may be padded past its tokenizer's; a random model can emit those ids."""
    ids = tok.encode("hello world", bos=False)
    assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 7] + ids[1:]) == "hello world"


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x01\xffgarbage" * 50,
        b"hello world\n",
        b"IQ== 0\nIg== 1\nnot base64 at all\n",  # a truncated or corrupted tiktoken file
        b"IQ== 0\nIg== 5\n",  # ranks with a gap: special ids would collide with base ones
    ],
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is neither a SentencePiece nor a tiktoken tokenizer.model") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)  # one line on stderr


@pytest.mark.parametrize("bos", [True, False])
def test_json_matches_transformers(tmp_path, bos):
    """Ids equal AutoTokenizer's on the same folder, BOS where the post-processor adds it (SmolLM2's
    adds none), special-token strings as their ids; decode is transformers' too."""
    from transformers import AutoTokenizer
    make_tokenizer_json(tmp_path, bos=bos)
    ours, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"]), text
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    assert ours.encode("x", bos=True)[0] == 0 if bos else ours.encode("x") == ours.encode("x", bos=False)


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_special_strings_are_ids_when_asked(kind, sp_path, tk_path):
    """A rendered chat template writes special tokens as text: encode(special=True) makes them ids."""
    tok = load_tokenizer(sp_path if kind == "sentencepiece" else tk_path)
    text = f"{tok.bos_token}hi there{tok.eos_token} and{tok.bos_token}"
    ids = tok.encode(text, bos=False, special=True)
    hi, there = tok.encode("hi there", bos=False), tok.encode(" and", bos=False)
    assert ids == [tok.bos_id] + hi + [tok.eos_id] + there + [tok.bos_id]
    assert tok.bos_id not in tok.encode(text, bos=False)  # and plain text otherwise


def test_stop_ids_and_chat_template_come_from_the_folder(json_folder, tmp_path):
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(json_folder / name, tmp_path / name)
    tok = load_tokenizer(tmp_path)
    assert tok.stop_ids == {tok.eos_id} and tok.chat_template is None
    (tmp_path / "stop_ids.json").write_text('{"stop_ids": [1, 4]}')
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>", "chat_template": "{{ x }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))  # AddedToken dicts as older configs write
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.stop_ids, tok.eos_id, tok.bos_id, tok.chat_template) == ({1, 4}, 4, 0, "{{ x }}")
    (tmp_path / "chat_template.jinja").write_text("{{ y }}")  # transformers 5's file wins
    assert load_tokenizer(tmp_path).chat_template == "{{ y }}"
    config["eos_token"] = "<|nope|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no eos_token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
