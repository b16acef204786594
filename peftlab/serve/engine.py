"""Continuous batching: requests join and leave the running batch at every decode step, each with its own adapter.

One engine thread owns the model. Each loop iteration it
1. drops cancelled requests (a client that went away frees its row at the next step),
2. admits waiting requests while the batch has room: they are prefilled together (left-padded, each row with its
   own adapter, at most `prefill_tokens` padded positions per forward) and their first tokens sampled; their KV
   caches then join the batch's,
3. runs one decode step for every running row at once (one token each) and removes the rows that finished.

KV cache layout: per layer keys/values (B, heads, L, head_dim) in a transformers DynamicCache, rows left-padded to the
longest; `mask` (B, L) marks the real positions and `pos` (B,) is each row's own next position (its real length), so
RoPE and attention see every row exactly as if it ran alone. A joining row's cache is left-padded with zeros (masked,
so they weigh exactly 0); when rows leave, columns that are padding in every remaining row are cut off.

Sampling per row: temperature 0 is greedy (argmax, as `peftlab generate`); otherwise temperature, then top-p, then a
draw from the row's own generator (seeded by the request's `seed`, so a seeded request repeats whatever else runs).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..data.templates import adapter_template, stop_token_ids
from ..models.compat import cache_kwarg
from .mixed import MixedModel, read_adapter


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's max_queue allows."""


class AdapterInUse(RuntimeError):
    """An adapter cannot be unloaded while requests use it."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


_ids = itertools.count(1)


@dataclass
class Request:
    """One generation. `emit(kind, payload)` is called from the engine thread: ("delta", text) as text becomes final,
    then once ("done", {"finish_reason", "prompt_tokens", "completion_tokens"}) or ("error", message)."""

    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[str, object], None]
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, max_context: int | None = None,
                 prefill_tokens: int = 8192):
        self.mixed = MixedModel(model)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.cache_key = cache_kwarg(model)  # "cache" (transformers >= 5.2x) or "past_key_values"
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # any id: it is masked
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos  # the ids generate() stops at, for parity with it
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # Per adapter: the chat template saved with it (data.chat_template) and that template's end-of-turn token,
        # one more stop for its requests only, as `peftlab generate --adapter` adds it (data/templates.py).
        self.chat_templates: dict[str, str] = {}
        self.adapter_stops: dict[str, set[int]] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []
        self._commands: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._reset_batch()

    # ---- called from other threads ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the engine thread (once; later calls do nothing)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="peftlab-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.mixed.adapters)

    def submit(self, request: Request) -> None:
        if request.adapter is not None and request.adapter not in self.mixed.adapters:
            raise KeyError(request.adapter)
        if request.params.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            if request.params.seed is not None:
                request.generator.manual_seed(request.params.seed)
            else:
                request.generator.seed()
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps (adapter tables change only there)."""
        future: Future = Future()
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    def load_adapter(self, name: str, folder: str) -> str:
        """Read `folder` (in the calling thread: the model keeps serving) and install it; returns the method name."""
        method, terms = read_adapter(self.mixed.base, folder)
        template = adapter_template(folder)
        stops = set(stop_token_ids(self.tokenizer, template)) if template else set()

        def install():
            self.mixed.install(name, method, folder, terms)
            self._forget_template(name)  # a reload may bring another template, or none
            if template:
                self.chat_templates[name], self.adapter_stops[name] = template, stops
        self._on_engine_thread(install)
        return method

    def chat_template(self, adapter: str | None) -> str | None:
        """The template chat requests for `adapter` are rendered with: its own, else the base tokenizer's."""
        return self.chat_templates.get(adapter) or getattr(self.tokenizer, "chat_template", None)

    def unload_adapter(self, name: str) -> None:
        def remove():
            users = sum(r.adapter == name for r in itertools.chain(self.rows, self.waiting) if not r.cancelled)
            if users:
                raise AdapterInUse(f"adapter {name!r} serves {users} request(s) now; unload it when they finish")
            self.mixed.remove(name)
            self._forget_template(name)
        self._on_engine_thread(remove)

    def _forget_template(self, name: str) -> None:
        self.chat_templates.pop(name, None)
        self.adapter_stops.pop(name, None)

    def _on_engine_thread(self, fn: Callable[[], object]) -> object:
        if self._thread is None:  # not started: nothing runs a step yet
            return fn()
        return self.call(fn).result()

    def drain(self) -> None:
        """Run steps on the calling thread until no request is left (scripts and tests; not with start())."""
        if self._thread is not None:
            raise RuntimeError("drain() runs the engine on the calling thread; this engine's own thread runs it.")
        with torch.inference_mode():
            while self.waiting or self.rows:
                self._step()

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.waiting)}

    # ---- the engine thread -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stop or self._commands or self.waiting or self.rows):
                        self._wake.wait()
                    if self._stop:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # handed to the caller, the loop goes on
                        future.set_exception(err)
                try:
                    self._step()
                except Exception as err:  # a failed step must not kill the server: fail the requests it held
                    for req in self.rows + list(self.waiting):
                        self._finish(req, error=f"generation failed: {type(err).__name__}: {err}")
                    with self._wake:
                        self.waiting.clear()
                    self._reset_batch()
        for req in self.rows + list(self.waiting):
            self._finish(req, error="the server is shutting down")

    def _step(self) -> None:
        if any(r.cancelled for r in self.rows):
            self._keep([i for i, r in enumerate(self.rows) if not r.cancelled])
        group: list[Request] = []
        with self._wake:
            while self.waiting and len(self.rows) + len(group) < self.max_batch:
                req = self.waiting[0]
                longest = max([len(r.prompt_ids) for r in group] + [len(req.prompt_ids)])
                if group and (len(group) + 1) * longest > self.prefill_tokens:
                    break  # the rest waits for the next step: one prefill holds at most prefill_tokens positions
                self.waiting.popleft()
                if req.cancelled:
                    continue
                if req.adapter is not None and req.adapter not in self.mixed.slots:  # unloaded while it waited
                    self._finish(req, error=f"adapter {req.adapter!r} was unloaded before this request started")
                    continue
                group.append(req)
        if group:
            self._admit(group)
        if self.rows:
            self._decode()

    def _reset_batch(self) -> None:
        self.rows = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)   # (B, L)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)       # (B,)
        self.last = torch.zeros(0, 1, dtype=torch.long, device=self.device)   # (B, 1) the token each row feeds next

    def _slot(self, req: Request) -> int:
        return 0 if req.adapter is None else self.mixed.slots[req.adapter]

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill these requests together (left-padded, each with its own adapter), sample their first tokens, and
        join the batch with those that go on."""
        lengths = [len(r.prompt_ids) for r in reqs]
        T = max(lengths)
        ids = torch.full((len(reqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, T - lengths[i]:] = torch.tensor(r.prompt_ids)
            mask[i, T - lengths[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.mixed.ctx.set([self._slot(r) for r in reqs], self.device)
        cache = DynamicCache()
        logits = self.mixed.net(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                                use_cache=True, logits_to_keep=1, **{self.cache_key: cache}).logits[:, -1]
        tokens = self._sample(logits, reqs)
        going = [i for i, (r, t) in enumerate(zip(reqs, tokens)) if not self._push(r, t)]
        if not going:
            return
        idx = torch.tensor(going, device=self.device)
        real = mask[idx, None, :, None].bool()  # (n, 1, T, 1): padded positions' keys/values become exact zeros
        kv = [(torch.where(real, layer.keys[idx], 0), torch.where(real, layer.values[idx], 0))
              for layer in cache.layers]
        mask = mask[idx]
        if self.rows:  # both sides left-padded to the longer one, then stacked
            L = max(T, self.mask.shape[1])
            old = [(layer.keys, layer.values) for layer in self.cache.layers]
            kv = [(torch.cat([_left_pad(k0, L), _left_pad(k1, L)]), torch.cat([_left_pad(v0, L), _left_pad(v1, L)]))
                  for (k0, v0), (k1, v1) in zip(old, kv)]
            mask = torch.cat([F.pad(self.mask, (L - self.mask.shape[1], 0)), F.pad(mask, (L - T, 0))])
        self.cache, self.mask = DynamicCache(ddp_cache_data=kv), mask
        self.rows += [reqs[i] for i in going]
        self.pos = torch.cat([self.pos, torch.tensor([lengths[i] for i in going], device=self.device)])
        self.last = torch.cat([self.last, torch.tensor([[tokens[i]] for i in going], device=self.device)])

    def _decode(self) -> None:
        self.mixed.ctx.set([self._slot(r) for r in self.rows], self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, L + 1): the token fed now is real in every row
        logits = self.mixed.net(input_ids=self.last, attention_mask=self.mask, position_ids=self.pos[:, None],
                                use_cache=True, **{self.cache_key: self.cache}).logits[:, -1]
        tokens = self._sample(logits, self.rows)
        self.pos = self.pos + 1
        self.last = torch.tensor(tokens, device=self.device)[:, None]
        done = [self._push(req, tok) for req, tok in zip(self.rows, tokens)]
        if any(done):
            self._keep([i for i, d in enumerate(done) if not d])

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the batch, and cut the cache columns that are padding in all of them."""
        if not keep:
            self._reset_batch()
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask[idx]
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column some row still uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]
        self.pos, self.last = self.pos[idx], self.last[idx]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row from logits (B, V)."""
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature <= 0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].float() / p.temperature, -1)
            if p.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                cut = (sorted_p.cumsum(0) - sorted_p) >= p.top_p  # keep the smallest set whose mass reaches top_p
                sorted_p[cut] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out.append(int(torch.multinomial(probs, 1, generator=req.generator)))
        return out

    def _push(self, req: Request, token: int) -> bool:
        """Add a sampled token to `req`, emit the text that became final; True if the request is finished."""
        if (token in self.eos or token in self.adapter_stops.get(req.adapter, ())) and not req.params.ignore_eos:
            return self._finish(req, "stop")
        req.generated.append(token)
        text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        stops = [(text.find(s), s) for s in req.params.stop if s and s in text]
        if stops:
            return self._finish(req, "stop", text[:min(stops)[0]])
        if len(req.generated) >= req.params.max_tokens:
            return self._finish(req, "length", text)
        # Hold back what may still change: a partly decoded character, or a tail that may begin a stop string.
        hold = max([len(s) - 1 for s in req.params.stop] + [0])
        final = text.rstrip("\ufffd")
        final = final[:max(len(req.sent), len(final) - hold)]
        self._emit_text(req, final)
        return False

    def _emit_text(self, req: Request, text: str) -> None:
        if len(text) > len(req.sent) and text.startswith(req.sent):
            req.emit("delta", text[len(req.sent):])
            req.sent = text

    def _finish(self, req: Request, reason: str | None = None, text: str | None = None,
                error: str | None = None) -> bool:
        if req.finished:
            return True
        req.finished = True
        if error is not None:
            req.emit("error", error)
            return True
        if text is None:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        self._emit_text(req, text)
        req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                          "completion_tokens": len(req.generated)})
        return True


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, length, D) with zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))
