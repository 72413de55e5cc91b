"""Tokenizers: one small interface over the two kinds of `tokenizer.model` the LayerSkip checkpoints ship.

- SentencePiece (Llama 2, CodeLlama): a binary protobuf, run by the `sentencepiece` library.
- tiktoken BPE (Llama 3.x): text lines `<base64 bytes> <rank>`, run by `tiktoken` with the 256 special
  tokens and the split pattern of Meta's Llama 3.1/3.2 tokenizer.

The kind is chosen from the file's content, never from its name or folder.
`load_tokenizer(path)` returns an object with `encode(text, bos=True)`, `decode(ids)`,
`bos_id`, `eos_id`, `vocab_size`, `emitted_ids` (the special tokens a model emits) and
`frequency_order()` (every id, the emitted ones and then the likely frequent first: what a draft
head over the frequent part of the vocabulary keeps by default).
"""
import base64
from pathlib import Path

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

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # control symbols written as text ("<s>") are not parsed by sentencepiece, so text cannot inject them
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

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

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # allowed_special=set() and disallowed_special=(): special-token strings in the text are encoded as
        # plain text (never as their ids, and without tiktoken's default "disallowed" exception)
        ids = [self.bos_id] if bos else []
        for chunk in _llama3_chunks(text):
            ids += self.model.encode(chunk, allowed_special=set(), disallowed_special=())
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


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | TiktokenTokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks = _read_tiktoken_ranks(path.read_bytes())
    if ranks is not None:
        return TiktokenTokenizer(path, ranks)
    return SentencePieceTokenizer(path)  # raises ValueError if it is not a SentencePiece model either
