"""serve.py: a live server in a subprocess on a free port of 127.0.0.1, driven by the official
openai client and httpx, against generate.py's output on the same tiny checkpoint; and the
engine in process where a test needs to break it. Every request loop is bounded in count and
time."""
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, free_port

import httpx
from openai import APIStatusError, OpenAI

KEY = "test-key"
MODEL = "tiny"
SERVER = ["--draft_layers", "2", "--speculate_k", "auto", "--batch_size", "4", "--threads", "1", "--model_name", MODEL]
PROMPTS = ["The quick brown fox", "def greedy(logits):", "Reading the weights", "In the morning the train",
           "class KVCache:", "Numbers like 3, 14", "She said that the", "The cache stores the keys"]
MAX_TOKENS = 24
LONG = 2048  # the context of the model that the tests which stop a text midway run on


def start_server(checkpoint, *flags, env_key: bool = True, launcher: tuple = (sys.executable,)):
    """serve.py in a subprocess; returns (process, base url) once /health answers (at most 120 s)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERSKIP_API_KEY": KEY} if env_key else \
        {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1"}.items() if k != "LAYERSKIP_API_KEY"}
    proc = subprocess.Popen([*launcher, str(ROOT / "serve.py"), "--checkpoint_path", str(checkpoint),
                             "--port", str(port), *SERVER, *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve.py did not answer /health within 120 s")


def stop_server(proc) -> str:
    """SIGTERM, then its stderr; it must exit within 15 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("serve.py did not exit within 15 s of SIGTERM")
    return err


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """One server for the module (key from LAYERSKIP_API_KEY), and generate.py's greedy output on
    PROMPTS and on PROMPTS[0] as a chat message, with the same settings."""
    checkpoint, _ = checkpoints("json")
    folder = tmp_path_factory.mktemp("serve")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    reference = {}
    for chat in (False, True):
        cmd = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(checkpoint),
               "--prompts_file", str(folder / "prompts.txt"), "--temperature", "0", "--draft_layers", "2",
               "--speculate_k", "auto", "--max_new_tokens", str(MAX_TOKENS), "--threads", "1"] + (["--chat"] if chat else [])
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr
        for line in run.stdout.splitlines():
            record = json.loads(line)
            reference[chat, record["prompt"]] = record
    proc, url = start_server(checkpoint, "--draft_vocab", "200")  # exact all the same: generate.py drafts over all
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield proc, url, client, reference
    err = stop_server(proc)
    assert "Traceback" not in err, err


def reply(record: dict) -> str:
    """generate.py's text without the EOS that ends it (a server's text leaves it out, as OpenAI's does)."""
    return record["text"].removesuffix("<|end_of_text|>").removesuffix("<|eot_id|>")


def metrics(url: str) -> dict[str, float]:
    """/metrics' samples: 'name{labels}' -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_greedy_requests_equal_generate_alone_and_among_sixteen_concurrent(server):
    proc, url, client, reference = server
    for prompt in PROMPTS[:3]:  # alone
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        expected = reference[False, prompt]
        assert r.choices[0].text == reply(expected)
        assert r.usage.completion_tokens == len(expected["generated_tokens"])
        assert r.usage.prompt_tokens == len(expected["prompt_tokens"])
        assert r.choices[0].finish_reason == ("stop" if expected["generated_tokens"][-1] in (1, 4) else "length")

    # 16 at once on 4 rows: all 8 prompts greedy, and 8 sampled requests with their own settings
    sampled = [dict(temperature=t, top_p=p, seed=s, extra_body={"top_k": k} if k else None)
               for t, p, s, k in [(0.7, 1.0, 1, None), (1.3, 0.8, 2, 5), (1.0, 0.5, 3, None), (0.5, 0.9, 4, 3),
                                  (1.0, 1.0, 5, 2), (2.0, 0.95, 6, None), (0.9, 0.3, 7, None), (1.1, 1.0, 8, 10)]]
    alone = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, **sampled[1]).choices[0].text
    jobs = [dict(prompt=p, temperature=0) for p in PROMPTS] + [dict(prompt=PROMPTS[i], **s) for i, s in enumerate(sampled)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: client.completions.create(model=MODEL, max_tokens=MAX_TOKENS, **job), jobs))
    for prompt, answer in zip(PROMPTS, answers):
        assert answer.choices[0].text == reply(reference[False, prompt]), prompt
    # a seeded request's text does not depend on what shares its batch, though each row chooses its own k
    assert answers[9].choices[0].text == alone
    other_seed = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, **{**sampled[1], "seed": 99})
    assert other_seed.choices[0].text != alone  # and it does sample: another seed, another text


def test_chat_streaming_usage_n_and_stop_strings(server):
    proc, url, client, reference = server
    expected = reference[True, PROMPTS[0]]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == reply(expected)
    assert chat.usage.prompt_tokens == len(expected["prompt_tokens"])

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    text = reply(reference[False, PROMPTS[1]])
    stop = text[5:8]  # a stop string met in the text: the text ends before it, finish_reason "stop"
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                      stop=[stop, "never seen"], stream=stream)
        pieces = list(r) if stream else [r]
        assert "".join(p.choices[0].text for p in pieces) == text[: text.index(stop)]
        assert pieces[-1].choices[0].finish_reason == "stop"

    two = client.completions.create(model=MODEL, prompt=[PROMPTS[2], PROMPTS[3]], n=2, max_tokens=4, temperature=0.9, seed=11)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == sum(len(reference[False, p]["prompt_tokens"]) for p in PROMPTS[2:4])
    assert two.usage.completion_tokens == 16  # 4 texts of max_tokens (the tiny model rarely ends sooner)
    again = client.completions.create(model=MODEL, prompt=[PROMPTS[2], PROMPTS[3]], n=2, max_tokens=4, temperature=0.9, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]


def test_models_health_metrics_and_the_api_key(server):
    proc, url, client, reference = server
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    before = metrics(url)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0)
    after = metrics(url)
    assert after["layerskip_generated_tokens_total"] - before["layerskip_generated_tokens_total"] == r.usage.completion_tokens
    assert after["layerskip_prompt_tokens_total"] - before["layerskip_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after['layerskip_requests_total{outcome="ok"}'] - before['layerskip_requests_total{outcome="ok"}'] == 1
    def steps(samples):
        return sum(v for name, v in samples.items() if name.startswith("layerskip_steps_total"))
    assert steps(after) > steps(before)
    assert 0 <= after["layerskip_accepted_tokens_total"] <= after["layerskip_draft_tokens_total"]
    assert after["layerskip_time_to_first_token_seconds_count"] - before["layerskip_time_to_first_token_seconds_count"] == 1
    assert after["layerskip_rows_busy"] == 0 and after["layerskip_queue_length"] == 0

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


BAD = [  # (body or raw text, status, words the message has)
    ("{not json", 400, "not valid JSON"),
    ({"model": MODEL, "prompt": 3}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "unsupported field: logprobs"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, 400, "unsupported field: frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "the " * 200}, 400, "context"),
    ({"model": "other", "prompt": "x"}, 404, "not found"),
    ({"prompt": "x"}, 400, "missing field: model"),
]


def test_bad_input_gets_its_status_and_an_openai_error_and_the_server_goes_on(server):
    proc, url, client, reference = server
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, status, words in BAD:
        kwargs = {"content": body, "headers": {**auth, "Content-Type": "application/json"}} if isinstance(body, str) \
            else {"json": body, "headers": auth}
        r = httpx.post(f"{url}/v1/completions", timeout=30, **kwargs)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert words in error["message"] and error["type"], (body, error)
        ok = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert ok.choices[0].text == client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3,
                                                               temperature=0).choices[0].text
    with pytest.raises(APIStatusError) as e:  # through the openai client too
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert e.value.status_code == 400


def endless_checkpoint(checkpoints, folder: Path) -> Path:
    """The tiny model with LONG positions and its stop tokens' embedding rows zeroed: their logits are
    0 (the head is tied), below the largest, so a greedy text never ends by itself and only a closed
    stream or a shutdown ends it before LONG positions, however fast the server decodes."""
    checkpoint, _ = checkpoints("json", context=LONG)
    shutil.copytree(checkpoint.parent, folder)
    state = torch.load(folder / "model.pth", weights_only=True)
    state["tok_embeddings.weight"][json.loads((folder / "stop_ids.json").read_text())["stop_ids"]] = 0
    torch.save(state, folder / "model.pth")
    return folder / "model.pth"


def test_a_stream_closed_after_two_chunks_frees_its_row(checkpoints, tmp_path):
    proc, url = start_server(endless_checkpoint(checkpoints, tmp_path / "endless"), "--batch_size", "1")
    prompt = PROMPTS[0]
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    try:
        short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        before = metrics(url)
        with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 10_000, "temperature": 0,
                                "stream": True}) as r:
            data = [line for line, _ in zip((l for l in r.iter_lines() if l.startswith("data: ")), range(2))]
        assert len(data) == 2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # freed at the next step
            after = metrics(url)
            if after.get('layerskip_requests_total{outcome="cancelled"}', 0) > before.get('layerskip_requests_total{outcome="cancelled"}', 0) \
                    and after["layerskip_rows_busy"] == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the closed stream's row was not freed within 30 s")
        assert after["layerskip_generated_tokens_total"] - before["layerskip_generated_tokens_total"] < LONG // 2  # it stopped early
        again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert again == short  # the row serves again, as before
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err


def test_sigterm_ends_streams_with_a_final_chunk_and_exits(checkpoints, tmp_path):
    proc, url = start_server(endless_checkpoint(checkpoints, tmp_path / "endless"), "--batch_size", "1", env_key=False)
    prompt = PROMPTS[0]
    lines, first = [], threading.Event()

    def read():
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 10_000, "temperature": 0,
                                "stream": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(60)
    err = stop_server(proc)
    reader.join(10)
    assert lines[-1] == "[DONE]"
    final = [json.loads(line) for line in lines[:-1]]
    assert final[-2]["choices"][0]["finish_reason"] == "length"  # ended by the shutdown, before its context
    assert final[-1]["usage"]["completion_tokens"] < LONG // 2
    assert "Traceback" not in err


def test_tensor_parallel_server_over_gloo(server, checkpoints):
    """torchrun, two ranks: rank 0 serves and announces each prefill and step; greedy texts equal
    the single process's, four at once on four rows, and SIGTERM stops both ranks."""
    _, _, _, reference = server
    checkpoint, _ = checkpoints("json")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc, url = start_server(checkpoint, launcher=torchrun)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS,
                                                                        temperature=0), PROMPTS[:4]))
        assert [a.choices[0].text for a in answers] == [reply(reference[False, p]) for p in PROMPTS[:4]]
    finally:
        err = stop_server(proc)
    assert 'serve.py", line' not in err, err  # (torchrun itself prints its own traceback on SIGTERM)


def test_bad_command_lines_get_one_line_and_exit_1(checkpoints, tmp_path):
    checkpoint, _ = checkpoints("json")
    cases = [(["--checkpoint_path", str(tmp_path / "none.pth")], "not found"),
             (["--checkpoint_path", str(checkpoint), "--draft_layers", "9"], "--draft_layers must be between 1 and 5"),
             (["--checkpoint_path", str(checkpoint), "--port", "70000"], "--port"),
             (["--checkpoint_path", str(checkpoint), "--draft_vocab", "50"], "--draft_vocab needs --draft_layers")]
    for flags, words in cases:
        run = subprocess.run([sys.executable, str(ROOT / "serve.py"), *flags], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 1 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1, (flags, run.stderr)


# --- in process: a fault inside the model loop, a full queue ---------------------------------------

def test_a_fault_in_the_loop_answers_its_requests_with_500_and_the_server_goes_on(checkpoints):
    from model import load_model
    from self_spec import decoding_functions
    from serve import Engine, make_app
    from tokenizer import load_tokenizer

    checkpoint, _ = checkpoints("json")
    broken = threading.Event()

    def make_steps(**kwargs):
        prefill_fn, steps = decoding_functions(**kwargs)

        def step_that_may_fail(step):
            def run(*args, **kwargs):
                if broken.is_set():
                    raise RuntimeError("a fault for the test")
                return step(*args, **kwargs)
            return run
        return prefill_fn, {k: step_that_may_fail(step) for k, step in steps.items()}

    model = load_model(checkpoint)
    engine = Engine(model, load_tokenizer(checkpoint.parent), 2, 2, 3, "cpu", threads=1, max_queue=3,
                    make_steps=make_steps)
    engine.thread.start()
    assert engine.ready.wait(60) and engine.failed is None
    app = make_app(engine, MODEL, None)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as http:
            body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
            good = (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            broken.set()
            failed = await http.post("/v1/completions", json=body)
            assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
            broken.clear()
            again = await http.post("/v1/completions", json=body)
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == good

            # Two at once: the short one in row 0 ends first; the long one goes on alone in row 1, so
            # its steps run on two rows (its text is the one it has alone, in row 0).
            with engine.lock:  # the loop cannot take from the queue while the lock is held (here, re-entered)
                tasks = [asyncio.create_task(http.post("/v1/completions", json={**body, "prompt": PROMPTS[1], "max_tokens": 2})),
                         asyncio.create_task(http.post("/v1/completions", json=body))]
                for _ in range(1000):
                    if len(engine.waiting) == 2:
                        break
                    await asyncio.sleep(0.01)
            short, long = await asyncio.gather(*tasks)
            assert short.status_code == 200 and long.json()["choices"][0]["text"] == good

            with engine.lock:
                engine.waiting.extend([SimpleNamespace(cancelled=True)] * 3)  # skipped if the loop ever took them
                full = await http.post("/v1/completions", json=body)
                engine.waiting.clear()
            assert full.status_code == 429 and full.headers["Retry-After"] and full.json()["error"]["type"] == "rate_limit_error"
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200  # this checkpoint has a template
            engine.tokenizer.chat_template = None
            no_template = await http.post("/v1/chat/completions", json=chat)
            assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]
            engine.drain()
            assert (await http.post("/v1/completions", json=body)).status_code == 503

    asyncio.run(run())
    engine.thread.join(10)
    assert not engine.thread.is_alive()
