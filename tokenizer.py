"""Tokenizers: one small interface over the three kinds of tokenizer files checkpoints ship.

- SentencePiece `tokenizer.model` (Llama 2, CodeLlama): a binary protobuf, run by `sentencepiece`.
- tiktoken BPE `tokenizer.model` (Llama 3.x): text lines `<base64 bytes> <rank>`, run by `tiktoken`
  with the 256 special tokens and the split pattern of Meta's Llama 3.1/3.2 tokenizer.
- Hugging Face `tokenizer.json` (SmolLM2, TinyLlama and most checkpoints published today), run by
  the `tokenizers` library: BOS is added where its post-processor adds it, and special-token
  strings in the text are their ids, as transformers' tokenizer does.

A `tokenizer.model`'s kind is chosen from its content, never from its name or folder.
`load_tokenizer(path)` takes a checkpoint folder or a tokenizer file and returns an object with
`encode(text, bos=True, special=False)`, `decode(ids)`, `bos_id`, `eos_id`, `stop_ids` (every id
generation stops at: the checkpoint's stop_ids.json, else EOS), `chat_template` (None where the
checkpoint has none), `vocab_size`, `emitted_ids` (the special tokens a model emits) and
`frequency_order()` (every id, the emitted ones and then the likely frequent first: what a draft
head over the frequent part of the vocabulary keeps by default).
"""
import base64
import json
from pathlib import Path
from typing import Optional, Union

STOP_IDS_FILE = "stop_ids.json"  # the converter's list of EOS ids, from config.json and generation_config.json
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Llama 3's pre-tokenization regex (Meta's llama3 / llama-models tokenizer.py)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta's Llama 3.1/3.2 special tokens, numbered right after the base tokens: 256 in all
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS += [
    f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL_TOKENS))
]


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # sentencepiece reports a bad protobuf as RuntimeError
            msg = f"{path} is neither a SentencePiece nor a tiktoken tokenizer.model (sentencepiece: {e})"
            raise ValueError(msg) from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()
        self.emitted_ids: list[int] = [self.eos_id]

        self.bos_token, self.eos_token = self.sp.id_to_piece(self.bos_id), self.sp.id_to_piece(self.eos_id)

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Control symbols written as text ("<s>") are plain text, unless `special` (a rendered chat
        template, which writes them as text)."""
        ids = [self.bos_id] if bos else []
        if not special:
            return ids + self.sp.encode(text)
        for piece, special_id in _split_special(text, {self.bos_token: self.bos_id, self.eos_token: self.eos_id}):
            ids += [special_id] if special_id is not None else self.sp.encode(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        # ids past the tokenizer's own (a model's vocabulary padded beyond it) stand for no text
        return self.sp.decode([i for i in ids if i < self.vocab_size])

    def frequency_order(self) -> list[int]:
        """EOS, then by score: a BPE piece's score is minus its merge rank (earlier merges join more
        frequent pairs), a unigram piece's its log probability."""
        scores = [self.sp.get_score(i) for i in range(self.vocab_size)]
        order = sorted(range(self.vocab_size), key=lambda i: -scores[i])
        return self.emitted_ids + [i for i in order if i not in self.emitted_ids]


class TiktokenTokenizer:
    def __init__(self, path: Path, ranks: dict[bytes, int]):
        import tiktoken

        n = len(ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]  # HF's EOS for the base (not instruct) models
        self.vocab_size: int = n + LLAMA3_NUM_SPECIAL
        # end of text, of turn, of message, a tool call
        emitted = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
        self.emitted_ids: list[int] = [self.special_tokens[t] for t in emitted]

        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        # allowed_special=set() and disallowed_special=(): special-token strings in the text are encoded as
        # plain text (never as their ids, and without tiktoken's default "disallowed" exception), unless
        # `special` (a rendered chat template)
        ids = [self.bos_id] if bos else []
        allowed = "all" if special else set()
        for chunk in _llama3_chunks(text):
            ids += self.model.encode(chunk, allowed_special=allowed, disallowed_special=())
        return ids

    def decode(self, ids: list[int]) -> str:
        # a prefix of the generated ids may end inside a multi-byte character: replace, don't raise;
        # ids past the tokenizer's own (a model's vocabulary padded beyond it) stand for no text
        return self.model.decode([i for i in ids if i < self.vocab_size], errors="replace")

    def frequency_order(self) -> list[int]:
        """The special tokens a model emits, then the base tokens by rank (a BPE's rank is its merge
        order: the frequent pairs first), then the other special tokens (headers, reserved)."""
        return self.emitted_ids + list(range(self.vocab_size - LLAMA3_NUM_SPECIAL)) + [
            i for i in self.special_tokens.values() if i not in self.emitted_ids]


def _llama3_chunks(text: str, max_chars: int = 400_000, max_run: int = 25_000):
    """Cut text as Meta's Llama 3 tokenizer does before tiktoken sees it: pieces of at most 400k chars, and no
    run of whitespace or of non-whitespace longer than 25k (tiktoken's regex fails on ~1M spaces in a row)."""
    if len(text) <= max_run:  # nothing to cut: the common case, without a Python loop over characters
        yield text
        return
    for start in range(0, len(text), max_chars):
        s = text[start : start + max_chars]
        run, is_space, cut = 0, s[0].isspace(), 0
        for i, c in enumerate(s):
            if c.isspace() != is_space:
                run, is_space = 1, not is_space
            else:
                run += 1
                if run > max_run:
                    yield s[cut:i]
                    cut, run = i, 1
        yield s[cut:]


def _read_tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """The ranks if every non-empty line is `<base64> <int>` with ranks 0..N-1, else None."""
    try:
        lines = data.decode("utf-8").splitlines()
        ranks = {}
        for line in lines:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:  # UnicodeDecodeError, binascii.Error and bad splits/ints are all ValueErrors
        return None
    # special ids are numbered from len(ranks), so the base ranks must be exactly 0..N-1
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        return None
    return ranks


class HFTokenizer:
    """A Hugging Face tokenizer.json, with the BOS/EOS tokens its tokenizer_config.json names."""

    def __init__(self, path: Path, config: dict):
        from tokenizers import Tokenizer

        try:
            self.model = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own Exception type for a bad file
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self.model.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.eos_id: int = self._token_id(self.eos_token, "eos_token", path)
        # bos_id is the document boundary (eval.py's prefix), not necessarily what encode adds (SmolLM2
        # names <|im_start|> but its post-processor adds nothing); a config naming none: the EOS, as lm-eval does
        self.bos_id: int = self._token_id(self.bos_token, "bos_token", path) if self.bos_token else self.eos_id
        self.emitted_ids: list[int] = [self.eos_id]

    def _token_id(self, token: Optional[str], key: str, path: Path) -> int:
        token_id = self.model.token_to_id(token) if token else None
        if token_id is None:
            raise ValueError(f"{path.parent / 'tokenizer_config.json'} names no {key} that {path.name} knows ({token!r})")
        return token_id

    def encode(self, text: str, bos: bool = True, special: bool = True) -> list[int]:
        """bos: add the special tokens the post-processor adds (transformers' add_special_tokens);
        special-token strings in the text are always their ids here, as in transformers."""
        return self.model.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        # byte-level BPE: a prefix ending inside a multi-byte character decodes with U+FFFD, never raises
        return self.model.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=False)

    def frequency_order(self) -> list[int]:
        """The emitted ids, then by id: a BPE numbers its tokens in merge order (the alphabet, then
        each merge as it was learned, earlier merges joining more frequent pairs)."""
        return self.emitted_ids + [i for i in range(self.vocab_size) if i not in self.emitted_ids]


def _token_text(token: Union[str, dict, None]) -> Optional[str]:
    """tokenizer_config.json writes a special token as its text or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _split_special(text: str, specials: dict[str, int]):
    """(piece, None) for plain text and ("", id) for each special-token string, in order."""
    import re

    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start:match.start()], None
        yield "", specials[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:], None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def chat_template(folder: Path) -> Optional[str]:
    """The folder's chat template: chat_template.jinja (transformers 5), else tokenizer_config.json's."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def tokenizer_file(folder: Path) -> Path:
    """A checkpoint folder's tokenizer: tokenizer.model, else tokenizer.json (tokenizer.model when neither is there)."""
    return next((p for p in (folder / "tokenizer.model", folder / "tokenizer.json") if p.is_file()),
                folder / "tokenizer.model")


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The conversation in the checkpoint's chat template, ending with the assistant's turn opened:
    the text transformers' apply_chat_template(messages, add_generation_prompt=True) renders (its
    sandboxed jinja environment, filters and globals). Encode it with bos=False, special=True."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tokenizer.chat_template is None:
        raise ValueError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json's)")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping, unlike jinja's own
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's tokens with it; the text is the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(tokenizer.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def load_tokenizer(path: Union[str, Path]) -> Union[SentencePieceTokenizer, TiktokenTokenizer, HFTokenizer]:
    """A checkpoint folder (its tokenizer_file) or one tokenizer file; the stop ids and the chat
    template come from the file's folder."""
    path = Path(path)
    if path.is_dir():
        path = tokenizer_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    folder = path.parent
    if path.suffix == ".json":
        tokenizer = HFTokenizer(path, _read_json(folder / "tokenizer_config.json"))
    else:
        ranks = _read_tiktoken_ranks(path.read_bytes())
        # SentencePiece raises ValueError if it is not a SentencePiece model either
        tokenizer = TiktokenTokenizer(path, ranks) if ranks is not None else SentencePieceTokenizer(path)
    stop_ids = _read_json(folder / STOP_IDS_FILE).get("stop_ids")
    tokenizer.stop_ids = set(stop_ids) if stop_ids else {tokenizer.eos_id}
    tokenizer.emitted_ids += sorted(tokenizer.stop_ids - set(tokenizer.emitted_ids))  # a draft head keeps every stop id
    tokenizer.chat_template = chat_template(folder)
    return tokenizer
