"""Tiny tokenizer.model files for the tests, made offline in well under a second.

make_sentencepiece_model: a Llama-2-style SentencePiece BPE model (unk=0, bos=1, eos=2, byte fallback).
make_tiktoken_model: a Llama-3-format tiktoken BPE file (256 single bytes, then learned merges).
make_tokenizer_json: a Hugging Face byte-level BPE tokenizer.json with Llama 3's special tokens and
tokenizer_config.json beside it.
All learn from SAMPLE_TEXT, a few KB of English and Python.
"""
import base64
import io
import json
from collections import Counter
from pathlib import Path

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the tokens before it.
Early exit lets the first layers of the model draft a few tokens, and the full model checks them in one pass.
When the draft is right, several tokens are accepted at once; when it is wrong, the model keeps the correct prefix.
Speculative decoding does not change the output of greedy search, it only changes how fast it is produced.
The cache stores the keys and values of every layer, so each new token only needs one step through the network.
Reading the weights from memory is the slow part of generation, so a smaller model or fewer layers runs faster.
There are many ways to measure speed: tokens per second, time to the first token, and memory bandwidth used.
She said that the results were good, but they'd need to run the tests again before we're sure it's working.
In the morning the train leaves at seven, and in the evening it comes back at nine, unless the weather is bad.
Numbers like 3, 14, 159, 2653 and 58979 are split into groups of at most three digits by the pattern.
"""

_CODE = '''\
def greedy(logits):
    """Return the index of the largest logit."""
    return int(logits.argmax(dim=-1))


class KVCache:
    def __init__(self, max_batch_size, max_seq_len, n_heads, head_dim):
        self.k = [[0.0] * head_dim for _ in range(max_seq_len)]
        self.v = [[0.0] * head_dim for _ in range(max_seq_len)]

    def update(self, pos, k, v):
        for i, p in enumerate(pos):
            self.k[p] = k[i]
            self.v[p] = v[i]
        return self.k, self.v


for step in range(10):
    if step % 2 == 0:
        print(f"step {step}: even")
    else:
        print(f"step {step}: odd")
result = {"tokens": [1, 2, 3], "accepted": 2, "rate": 0.75}
'''

SAMPLE_TEXT: str = (_ENGLISH + "\n" + _CODE) * 2  # repeated so that frequent pairs stand out


def make_sentencepiece_model(path: Path, vocab_size: int = 320) -> Path:
    import sentencepiece as spm

    path = Path(path)
    model = io.BytesIO()  # model_writer: the trainer writes no files of its own, so parallel tests cannot collide
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_TEXT.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama 2's settings: ids, byte fallback (any text encodes), digits split, whitespace kept as is
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.995,  # rare characters go to byte fallback, leaving room for merges
        num_threads=1,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def make_tiktoken_model(path: Path, n_merges: int = 200) -> Path:
    import regex  # a tiktoken dependency; supports the \p{L} classes of the Llama 3 pattern

    from tokenizer import LLAMA3_PATTERN

    path = Path(path)
    ranks = {bytes([b]): b for b in range(256)}
    # plain BPE over the pre-tokenized words, as tiktoken applies merges only inside one regex piece
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(LLAMA3_PATTERN, SAMPLE_TEXT))
    while len(ranks) < 256 + n_merges:
        pairs = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            raise ValueError(f"SAMPLE_TEXT is too small for {n_merges} merges")
        a, b = max(pairs, key=lambda p: (pairs[p], p))  # most frequent pair, ties broken deterministically
        ranks.setdefault(a + b, len(ranks))  # two different pairs can spell the same bytes: keep one rank
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


JSON_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer_json(folder: Path, vocab_size: int = 400, bos: bool = True) -> Path:
    """folder/tokenizer.json (byte-level BPE, special ids 0-4; with bos, a post-processor that adds
    <|begin_of_text|> as Llama 3's does) and folder/tokenizer_config.json naming BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=JSON_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(keepends=True), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"
