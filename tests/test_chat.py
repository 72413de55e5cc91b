"""Chat templates and several EOS ids: render_chat against transformers' apply_chat_template, and
generate.py --chat / --system / --interactive --chat on a converted tokenizer.json checkpoint."""
import io
import json
import shutil

import pytest
import torch

import generate
from conftest import LLAMA3_TEMPLATE
from tiny_tokenizers import make_sentencepiece_model, make_tokenizer_json
from tokenizer import load_tokenizer, render_chat

# Meta's Llama 2 chat template (raise_exception when roles do not alternate)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# The environment's other features, as recent templates use them: lines and indentation trimmed
# (trim_blocks, lstrip_blocks), tojson without HTML escaping, strftime_now, namespace, loop controls,
# the {% generation %} tag
FEATURES_TEMPLATE = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    <{{ message['role'] }}>{{ message | tojson }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% endif %}
{% endfor %}
year {{ strftime_now('%Y') }}, {{ ns.count }} messages
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You answer in French. <b>&</b>"},
    {"role": "user", "content": "  Hello, héllo 日本!  "},
    {"role": "assistant", "content": "Bonjour."},
    {"role": "user", "content": "def f(x): return x"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    make_tokenizer_json(root / "json")
    make_sentencepiece_model(root / "sp" / "tokenizer.model")
    return root


def reference(folder, template: str, messages: list[dict], **special):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(folder)
    ref.chat_template = template
    return ref, ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **special)


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, FEATURES_TEMPLATE], ids=["llama3", "features"])
def test_json_kind_renders_and_encodes_as_transformers(folders, template):
    tok = load_tokenizer(folders / "json")
    tok.chat_template = template
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION + [{"role": "stop"}, {"role": "user"}]):
        ref, text = reference(folders / "json", template, messages)
        assert render_chat(tok, messages) == text
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.encode(text, bos=False, special=True) == list(ids)


def test_sentencepiece_kind_renders_llama2_as_transformers(folders):
    tok = load_tokenizer(folders / "sp" / "tokenizer.model")
    tok.chat_template = LLAMA2_TEMPLATE
    for messages in (CONVERSATION, CONVERSATION[1:]):
        # transformers' template sees the tokenizer's special tokens: here those of a Llama 2 tokenizer
        _, text = reference(folders / "json", LLAMA2_TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
        assert render_chat(tok, messages) == text
    ids = tok.encode(render_chat(tok, CONVERSATION), bos=False, special=True)
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1  # <s> per user turn, </s> after the reply
    with pytest.raises(ValueError, match="^chat template: Conversation roles must alternate"):
        render_chat(tok, CONVERSATION[1:2] * 2)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tok, CONVERSATION)


def chat_checkpoint(checkpoints, tmp_path, stop_ids: list[int]):
    """The converted "json" checkpoint in a folder of its own, with these stop ids."""
    path, hf = checkpoints("json")
    for source in path.parent.iterdir():
        if source.is_file():
            shutil.copy(source, tmp_path / source.name)
    (tmp_path / "stop_ids.json").write_text(json.dumps({"stop_ids": stop_ids}))
    return tmp_path / "model.pth", hf


def test_converted_checkpoint_stops_at_every_eos(checkpoints):
    path, _ = checkpoints("json")
    assert json.loads((path.parent / "stop_ids.json").read_text()) == {"stop_ids": [1, 4]}  # config + generation_config
    assert load_tokenizer(path.parent).stop_ids == {1, 4}


@pytest.mark.parametrize("draft_layers", [None, 3])
def test_generate_chat_equals_transformers_and_stops_at_any_stop_id(checkpoints, tmp_path, capsys, draft_layers):
    """--chat --system: the prompt is transformers' apply_chat_template ids, greedy tokens are its
    generate's with the same stop ids; the reply ends at the stop id (kept in the tokens, not printed)."""
    from transformers import AutoTokenizer
    path, hf = checkpoints("json")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    ref = AutoTokenizer.from_pretrained(path.parent)
    prompt = list(ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    # an explicit mask: BOS is id 0, which transformers would take for padding
    greedy = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    free = hf.generate(torch.tensor([prompt]), eos_token_id=None, **greedy)[0, len(prompt):].tolist()
    # a token greedy decoding reaches, with text of its own: generation must end there, as transformers' does
    tokenizer = load_tokenizer(path.parent)
    stop = next(t for i, t in enumerate(free) if i > 3 and t not in free[:i] and "\ufffd" not in tokenizer.decode([t]))
    path, hf = chat_checkpoint(checkpoints, tmp_path, [1, stop])
    expected = hf.generate(torch.tensor([prompt]), eos_token_id=[1, stop], **greedy)[0, len(prompt):].tolist()
    assert expected[-1] == stop and len(expected) > 4
    flags = ["--checkpoint_path", str(path), "--chat", "--system", "Be brief.", "--prompt", "def add(a, b):",
             "--max_new_tokens", "24", "--temperature", "0", "--json"]
    if draft_layers:
        flags += ["--draft_layers", str(draft_layers), "--speculate_k", "3"]
    capsys.readouterr()
    generate.main(flags)
    out = capsys.readouterr().out
    sample = json.loads(out.strip().splitlines()[-1])["samples"][0]
    assert sample["prompt_tokens"] == prompt and sample["generated_tokens"] == expected
    shown = tokenizer.decode(prompt + expected[:-1])[len(tokenizer.decode(prompt)):]
    assert out.startswith(shown.rstrip("\ufffd") + "\n"), (out, shown)  # the reply alone, without the prompt or the stop token's text


def test_interactive_chat_keeps_the_conversation(checkpoints, tmp_path, capsys, monkeypatch):
    path, _ = chat_checkpoint(checkpoints, tmp_path, [1, 4])
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond one\n\n"))
    capsys.readouterr()
    generate.main(["--checkpoint_path", str(path), "--chat", "--interactive", "--max_new_tokens", "5",
                   "--temperature", "0", "--json"])
    first, second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"]
    tokenizer = load_tokenizer(path.parent)
    reply = tokenizer.decode(first["prompt_tokens"] + first["generated_tokens"])[len(tokenizer.decode(first["prompt_tokens"])):]
    conversation = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": reply},
                    {"role": "user", "content": "second one"}]
    assert second["prompt_tokens"] == tokenizer.encode(render_chat(tokenizer, conversation), bos=False, special=True)
    assert second["prompt_tokens"][: len(first["prompt_tokens"])] == first["prompt_tokens"]


def test_chat_errors_are_one_line(checkpoints, capsys):
    path, _ = checkpoints("llama2")  # a SentencePiece checkpoint without a chat template
    for flags, message in ((["--chat"], "has no chat template"), (["--system", "x"], "--system needs --chat")):
        with pytest.raises(SystemExit) as exit_:
            generate.main(["--checkpoint_path", str(path), "--max_new_tokens", "2", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1 and err[-1].startswith("error: ") and message in err[-1], err


def test_stream_prints_characters_split_over_tokens_whole(folders, capsys):
    """Byte-level BPE cuts 日本🙂 into tokens that are not characters: the stream prints nothing
    until a character is whole, and in the end exactly the text."""
    tok = load_tokenizer(folders / "json")
    text = "Hi 日本🙂 wörld"
    ids = tok.encode(text, bos=False)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))  # some prefix does end inside one
    capsys.readouterr()
    stream = generate.TextStream(tok, [tok.bos_id], show_drafts=False)
    printed = []
    for token in ids:
        stream(0, [token], [False])
        printed.append(capsys.readouterr().out)
    assert "".join(printed) == text and not any("\ufffd" in piece for piece in printed)
