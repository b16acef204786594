"""`peftlab serve`: the real `openai` client against a server on 127.0.0.1 (uvicorn in a thread), a tiny random Llama
and tiny adapters of every served method (LoRA r4, rsLoRA r8, DoRA r4, IA3, VeRA r16) with random, non-identity
weights.

The invariant: a request's greedy answer equals `peftlab generate` with that adapter alone (PeftModel.from_pretrained
+ generate, fp32), token for token, whatever else shares the batch. Plus every fault the issue lists: unknown model
404, malformed JSON / wrong types 400 naming the field, prompt over the context 400, a bad adapter folder 400 with the
server still serving, a path outside the allowed folders refused, queue full 429, a client that disconnects
mid-stream frees its row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn

from peftlab import (DoraConfig, IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, VeraConfig,
                     get_peft_model)
from peftlab.cli import generate_cmd, serve_cmd
from peftlab.cli.errors import CliError
from peftlab.models import load_model, load_tokenizer
from peftlab.serve.api import create_app
from peftlab.serve.engine import Engine, Request, SamplingParams

from .conftest import save_tiny, tiny_gpt2, tiny_tokenizer

try:  # the HTTP client the installed openai package is built on (httpx2 in this environment's release)
    import httpx2 as httpx
except ImportError:
    import httpx

ADAPTERS = {
    "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora8": LoraConfig(r=8, lora_alpha=8, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
    "dora4": DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "ia3": IA3Config(),  # Llama's defaults: k/v scaled at the output, down_proj at the input
    "vera16": VeraConfig(r=16, target_modules=["q_proj", "v_proj", "gate_proj"]),
}
PROMPTS = ["the movie was great and", "i hated the acting but", "hello how are you", "write a review about this film"]
CHAT = [{"role": "user", "content": "hello how are you"}]
BASE = "tiny"
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: intra-op threads only contend (10x slower on a busy 2-core machine); restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_adapter(base, config, folder: str, seed: int) -> str:
    """An adapter on `base` (a model, or a folder to load it from) whose every trainable tensor is moved off its
    identity init, as training would."""
    model = get_peft_model(load_model(base) if isinstance(base, str) else base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny(root / "llama")
    served = root / "served"
    folders = {name: _save_adapter(model_dir, cfg, str(served / name), seed)
               for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1)}
    extra = root / "extra"  # what POST /v1/adapters may read (--allow-load-from)
    _save_adapter(model_dir, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]), str(extra / "late"), 9)
    _save_adapter(model_dir, PromptTuningConfig(num_virtual_tokens=3, task_type=TaskType.CAUSAL_LM),
                  str(extra / "prompt"), 10)
    os.makedirs(extra / "empty")
    outside = root / "outside"  # a valid adapter the server must not read
    _save_adapter(model_dir, LoraConfig(r=2, target_modules=["q_proj"]), str(outside), 11)
    return {"model": model_dir, "adapters": folders, "extra": str(extra), "outside": str(outside)}


class Server:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def _engine(files, **options) -> Engine:
    engine = Engine(load_model(files["model"]), load_tokenizer(files["model"]), **options)
    for name, folder in files["adapters"].items():
        engine.load_adapter(name, folder)
    return engine


@pytest.fixture(scope="module")
def server(files):
    srv = Server(create_app(_engine(files, max_batch=6), BASE, list(files["adapters"].values()) + [files["extra"]]))
    yield srv
    srv.close()


_solo: dict = {}


def solo(files, adapter: str | None, prompt: str | list, max_new_tokens: int = NEW_TOKENS) -> tuple[str, int]:
    """(text, tokens) of `peftlab generate` with this adapter alone: its loader, greedy, fp32, batch of one."""
    key = (adapter, json.dumps(prompt), max_new_tokens)
    if key not in _solo:
        folder = files["adapters"].get(adapter) or (os.path.join(files["extra"], adapter) if adapter else None)
        tokenizer, net = generate_cmd.load_for_generation(files["model"], folder, "fp32")
        ids = generate_cmd._encode(tokenizer, prompt if isinstance(prompt, list) else None,
                                   prompt if isinstance(prompt, str) else None)
        with torch.no_grad():
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=0)[0, ids.shape[1]:].tolist()
        eos = net.generation_config.eos_token_id
        tokens = out[:out.index(eos)] if eos in out else out  # the server does not count the stop token
        _solo[key] = (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens))
    return _solo[key]


def _complete(client, model, prompt, stream=False, **kw):
    """(text, finish_reason, completion_tokens or None) of one completion, streamed or not."""
    if not stream:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                            stream=True, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, None


def _chat(client, model, stream=False):
    if not stream:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0)
        assert r.choices[0].message.role == "assistant"
        return r.choices[0].message.content, r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[-1].choices[0].finish_reason
    return "".join(c.choices[0].delta.content or "" for c in chunks), None


def test_models_and_health(server):
    listed = {m.id: m for m in server.client.models.list().data}
    assert list(listed) == [BASE, *ADAPTERS]
    assert listed["dora4"].model_extra["method"] == "dora" and listed["vera16"].model_extra["parent"] == BASE
    assert server.health() == {"status": "ok", "model": BASE, "adapters": list(ADAPTERS), "running": 0, "waiting": 0}


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_each_method_equals_generate_alone(server, files, model):
    """Completions and chat, streamed and not, each equal `peftlab generate` with that adapter alone."""
    adapter = None if model == BASE else model
    text, tokens = solo(files, adapter, PROMPTS[0])
    assert _complete(server.client, model, PROMPTS[0]) == (text, "length" if tokens == NEW_TOKENS else "stop", tokens)
    assert _complete(server.client, model, PROMPTS[0], stream=True)[0] == text
    chat_text, chat_tokens = solo(files, adapter, CHAT)
    assert _chat(server.client, model) == (chat_text, chat_tokens)
    assert _chat(server.client, model, stream=True)[0] == chat_text


def test_adapters_change_the_answer(files):
    """The references differ from each other, so the equality above could not hold with the wrong adapter."""
    texts = {solo(files, a, PROMPTS[1])[0] for a in [None, *ADAPTERS]}
    assert len(texts) == len(ADAPTERS) + 1


def test_40_concurrent_mixed_requests_each_equal_their_solo_answer(server, files):
    jobs = [(model, PROMPTS[i % len(PROMPTS)], i % 3 == 0)
            for i, model in enumerate([BASE, *ADAPTERS] * 7)][:40]  # 6 models, 4 prompts, a third streamed
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _complete(server.client, *job)[0], jobs))
    expected = [solo(files, None if m == BASE else m, p)[0] for m, p, _ in jobs]
    assert answers == expected
    assert server.health()["running"] == 0


def test_stop_and_seeded_sampling(server, files):
    text, _ = solo(files, "lora4", PROMPTS[2])
    words = text.split()
    assert len(words) >= 3, text  # the reference must go on past the stop word for this test to mean anything
    word = words[len(words) // 2]
    stopped = server.client.completions.create(model="lora4", prompt=PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0,
                                               stop=[word])
    assert stopped.choices[0].text == text[:text.index(word)] and stopped.choices[0].finish_reason == "stop"
    sampled = [server.client.completions.create(model="vera16", prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                                temperature=1.5, top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_bad_requests(server):
    with pytest.raises(openai.NotFoundError) as err:
        server.client.completions.create(model="nope", prompt="hello", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and all(n in err.value.message for n in [BASE, *ADAPTERS])
    url = f"{server.url}/v1/completions"
    bad_json = httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(bad_json, 400)["message"]
    assert "must be a JSON object" in _error(httpx.post(url, content=b"{bad"), 400)["message"]  # no content-type
    for field, value in [("temperature", "hot"), ("max_tokens", 2.5), ("prompt", {"a": 1}), ("stream", "yes")]:
        error = _error(httpx.post(url, json={"model": BASE, "prompt": "hello", field: value}), 400)
        assert error["param"] == field and field in error["message"]
    assert _error(httpx.post(url, json={"prompt": "hello"}), 400)["param"] == "model"
    chat = _error(httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": [{"role": "x"}]}),
                  400)
    assert chat["param"].startswith("messages.0.")
    with pytest.raises(openai.BadRequestError, match="context of 64 tokens"):
        server.client.completions.create(model=BASE, prompt="hello " * 70, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens 60"):
        server.client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=60)
    assert server.health()["running"] == 0


def test_runtime_load_and_unload(server, files):
    post = lambda body: httpx.post(f"{server.url}/v1/adapters", json=body, timeout=30)  # noqa: E731
    late = os.path.join(files["extra"], "late")
    card = post({"name": "late", "path": late})
    assert card.status_code == 200 and card.json()["method"] == "lora"
    assert _complete(server.client, "late", PROMPTS[3])[0] == solo(files, "late", PROMPTS[3])[0]
    assert _error(post({"name": "late", "path": late}), 409)["param"] == "name"
    # Refused without reading anything: outside the startup folders and --allow-load-from, or a traversal out of one.
    for path in [files["outside"], os.path.join(files["extra"], "..", "outside"), "/etc"]:
        assert _error(post({"name": "x", "path": path}), 403)["param"] == "path"
    assert "no adapter folder" in _error(post({"name": "x", "path": os.path.join(files["extra"], "none")}), 400)[
        "message"].lower()
    assert "adapter_config.json" in _error(post({"name": "x", "path": os.path.join(files["extra"], "empty")}), 400)[
        "message"]
    refused = _error(post({"name": "x", "path": os.path.join(files["extra"], "prompt")}), 400)["message"]
    assert "prompt_tuning" in refused and "mixes lora, dora, ia3, vera" in refused
    assert _error(post({"name": "bad/name", "path": late}), 400)["param"] == "name"
    # Still serving, everything as before.
    assert _complete(server.client, "dora4", PROMPTS[0])[0] == solo(files, "dora4", PROMPTS[0])[0]
    assert httpx.delete(f"{server.url}/v1/adapters/late").json() == {"id": "late", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="late", prompt="hello", max_tokens=2)
    assert _error(httpx.delete(f"{server.url}/v1/adapters/late"), 404)["code"] == "model_not_found"
    assert [m.id for m in server.client.models.list().data] == [BASE, *ADAPTERS]
    assert _complete(server.client, "ia3", PROMPTS[1])[0] == solo(files, "ia3", PROMPTS[1])[0]


def _wait_for(srv: Server, **counts) -> None:
    deadline = time.time() + 20
    while {k: srv.health()[k] for k in counts} != counts:
        assert time.time() < deadline, (srv.health(), counts)
        time.sleep(0.01)


def test_queue_full_and_disconnect_free_the_row(files):
    """One row, one queue place: a long stream runs, a second request waits, a third gets 429; closing the stream
    frees the row at once, and the waiting request then runs."""
    engine = _engine(files, max_batch=1, max_queue=1, max_context=100_000)
    srv = Server(create_app(engine, BASE, []))
    try:
        long = {"model": "lora4", "prompt": PROMPTS[0], "max_tokens": 50_000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=long, timeout=30) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            _wait_for(srv, running=1)  # the first text is sent before the row joins the batch
            running = engine.rows[0]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(_complete, srv.client, "ia3", PROMPTS[1])
                _wait_for(srv, waiting=1)
                with pytest.raises(openai.RateLimitError, match="max_queue=1"):
                    srv.client.completions.create(model=BASE, prompt="hello", max_tokens=2)
                stream.close()  # the client goes away mid-stream
                assert waiting.result(timeout=30)[0] == solo(files, "ia3", PROMPTS[1])[0]
        assert running.cancelled and len(running.generated) < 50_000
        assert srv.health()["running"] == 0 and srv.health()["waiting"] == 0
    finally:
        srv.close()


def test_conv1d_layers_mix_too(tmp_path):
    """GPT-2 stores its projections as Conv1D (weight (in, out)): the same invariant, engine only, 10 requests over
    LoRA, DoRA, IA3, VeRA and the base in batches of 4."""
    configs = {"lora": LoraConfig(r=4, target_modules=["c_attn"]),
               "dora": DoraConfig(r=4, target_modules=["c_attn", "c_fc"]),
               "ia3": IA3Config(), "vera": VeraConfig(r=8, target_modules=["c_attn", "c_proj"])}
    folders = {n: _save_adapter(tiny_gpt2(), c, str(tmp_path / n), seed) for seed, (n, c) in enumerate(configs.items())}
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_gpt2(), tokenizer, max_batch=4)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    names = [None, *folders]
    reqs = [Request(names[i % 5], tokenizer(PROMPTS[i % 4])["input_ids"], SamplingParams(NEW_TOKENS, ignore_eos=True),
                    lambda *_: None) for i in range(10)]
    for req in reqs:
        engine.submit(req)
    engine.drain()
    for req in reqs:
        net = tiny_gpt2()
        net = PeftModel.from_pretrained(net, folders[req.adapter]) if req.adapter else net
        ids = torch.tensor([req.prompt_ids])
        with torch.no_grad():
            out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert req.generated == out[0, ids.shape[1]:].tolist(), req.adapter


def test_cli_settings(files, tmp_path):
    """`peftlab serve` reads NAME=DIR flags and a YAML file (flags win), and names a bad flag in one line."""
    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    lora = files["adapters"]["lora4"]
    s = serve_cmd.settings(parser.parse_args([files["model"], "--adapter", f"a={lora}", "--port", "9"]))
    assert (s["adapters"], s["port"], s["host"], s["max_batch"]) == ({"a": lora}, 9, "127.0.0.1", 32)
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {files['model']}\nadapters: {{b: {lora}}}\nport: 7\nmax_batch: 4\n")
    s = serve_cmd.settings(parser.parse_args([str(config), "--port", "8"]))
    assert (s["model"], s["adapters"], s["port"], s["max_batch"]) == (files["model"], {"b": lora}, 8, 4)
    with pytest.raises(CliError, match="not NAME=DIR"):
        serve_cmd.settings(parser.parse_args([files["model"], "--adapter", lora]))
    with pytest.raises(CliError, match="unknown keys"):
        config.write_text("model: x\nport: 1\nportt: 2\n")
        serve_cmd.settings(parser.parse_args([str(config)]))
