"""In-process judge backend: a transformers VLM (``AutoModelForImageTextToText`` + ``AutoProcessor``).

The model is ``from_pretrained(cfg.pretrained)`` (cuda + bfloat16 when a GPU is present, else CPU
float32) or, with ``cfg.tiny``, the tiny random Qwen2.5-VL of :mod:`rewards.tiny_vlm`. It is loaded
lazily (first call or :meth:`TransformersJudge.check_health`) and used by one worker thread at a
time (``asyncio.to_thread`` + a lock), so the event loop stays free.

Modes:

* ``text``: greedy ``generate`` (sampling when ``temperature > 0``) of up to ``max_tokens`` tokens.
* ``logprob``: the probes of :data:`rewards.judge.PROBE_TREE` read straight from the next-token
  logits, restricted to the allowed characters' tokens and renormalised -- the same quantity vLLM
  reports under a ``choice`` constraint.
* ``structured``: a small schema-directed decoder (:class:`SchemaDecoder`), not a general grammar
  engine. It walks the bounded schemas of :mod:`rewards.prompts` and writes compact JSON:
  object keys and punctuation are emitted as written (properties in schema order); integers with
  ``minimum``/``maximum``, enums, consts and booleans are chosen greedily character by character
  among the values still possible (one forward pass per real choice, the terminator character
  included so "1" and "10" are told apart), like a grammar-constrained greedy decoder; strings are
  generated freely, cut at the first ``"`` or newline and at ``maxLength``, and JSON-escaped;
  arrays follow ``prefixItems`` (one schema per position, as the judge's positional region
  schema uses) or have ``minItems``..``maxItems`` items (the model chooses between ``,`` and ``]``
  when the count is free; only self-delimiting items -- objects, arrays, strings -- may have a
  free count). Unbounded numbers are rejected with a clear error. Choice steps (one forward pass
  each) and generated string tokens count against ``max_tokens``; choices always complete (so the
  output always parses) and strings get what is left of the budget.

Each probe / choice re-runs the model over the whole prompt (no KV-cache reuse): fine for the tiny
model and acceptable for a real model on a GPU, where the OpenAI/vLLM backend is the fast path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from core.config import TransformersJudgeConfig
from rewards.judge import BaseJudge, Completion, PreparedImage

log = logging.getLogger("srum.judge.hf")

MAX_CHOICE_VALUES = 100_000
DEFAULT_MAX_ITEMS = 16


class _Context:
    """The encoded prompt of one request; prefixes of the assistant answer are appended as tokens."""

    def __init__(self, judge: TransformersJudge, image: PreparedImage, text: str):
        self.judge = judge
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        proc = judge.processor
        chat = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        self.inputs = proc(text=[chat], images=[image.pil], return_tensors="pt")
        self.prompt_len = int(self.inputs["input_ids"].shape[1])

    def with_prefix(self, prefix: str) -> dict[str, Any]:
        ids = self.judge.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        out: dict[str, Any] = {}
        n, L = len(ids), self.prompt_len
        for key, val in self.inputs.items():
            if n and torch.is_tensor(val) and val.ndim == 2 and tuple(val.shape) == (1, L):
                if key == "input_ids":
                    add = torch.tensor([ids], dtype=val.dtype)
                else:
                    add = (torch.ones if key == "attention_mask" else torch.zeros)((1, n), dtype=val.dtype)
                val = torch.cat([val, add], dim=1)
            out[key] = val.to(self.judge.device) if torch.is_tensor(val) else val
        if "pixel_values" in out and torch.is_floating_point(out["pixel_values"]):
            out["pixel_values"] = out["pixel_values"].to(self.judge.dtype)
        return out

    @torch.no_grad()
    def next_logprobs(self, prefix: str) -> torch.Tensor:
        logits = self.judge.model(**self.with_prefix(prefix)).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def generate(self, prefix: str, max_new_tokens: int, stop: str = "") -> tuple[str, int]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self.with_prefix(prefix)
        start = int(inputs["input_ids"].shape[1])
        tok = self.judge.tokenizer

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> bool:
                return any(c in tok.decode(input_ids[0, start:]) for c in stop)

        temp = float(self.judge.cfg.temperature)
        kwargs: dict[str, Any] = {"max_new_tokens": max(1, max_new_tokens), "do_sample": temp > 0}
        if temp > 0:
            kwargs["temperature"] = temp
        if stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop()])
        out = self.judge.model.generate(**inputs, **kwargs)
        new = out[0, start:]
        return tok.decode(new, skip_special_tokens=True), int(new.shape[0])


class SchemaDecoder:
    """Writes JSON matching a bounded schema, letting the model choose (see the module docstring)."""

    def __init__(self, ctx: _Context, budget: int):
        self.ctx = ctx
        self.out = ""
        self.budget = budget
        self.tokens = 0

    def _choose(self, options: Sequence[str]) -> str:
        """Greedy char-by-char choice among complete ``options`` (each ends with its terminator)."""
        cur = ""
        opts = list(dict.fromkeys(options))
        while cur not in opts:
            nxt = sorted({o[len(cur)] for o in opts if o.startswith(cur) and len(o) > len(cur)})
            if len(nxt) == 1:
                cur += nxt[0]
                continue
            logp = self.ctx.next_logprobs(self.out + cur)
            self.tokens += 1
            ids = [self.ctx.judge.char_id(c) for c in nxt]
            cur += nxt[int(torch.argmax(logp[ids]))]
        return cur

    def value(self, schema: dict[str, Any], terms: str) -> None:
        """Append one value of ``schema``; ``terms`` are the characters that may follow it."""
        typ = schema.get("type")
        if "const" in schema:
            self.out += json.dumps(schema["const"])
        elif "enum" in schema or typ in ("integer", "boolean"):
            values = self._values(schema)
            self.out += self._choose([json.dumps(v) + t for v in values for t in (terms or "\x00")])[:-1]
        elif typ == "string":
            self._string(int(schema.get("maxLength", 200)))
        elif typ == "object":
            self._object(schema)
        elif typ == "array":
            self._array(schema)
        else:
            raise ValueError(f"schema type {typ!r} is not bounded; the in-process structured decoder supports "
                             "objects, arrays, strings, enums, consts, booleans and integers with min/max")

    def _values(self, schema: dict[str, Any]) -> list[Any]:
        if "enum" in schema:
            values = list(schema["enum"])
        elif schema.get("type") == "boolean":
            values = [True, False]
        else:
            lo, hi = schema.get("minimum"), schema.get("maximum")
            if lo is None or hi is None or hi - lo + 1 > MAX_CHOICE_VALUES:
                raise ValueError(f"integer schema without a small minimum/maximum: {schema}")
            values = list(range(int(lo), int(hi) + 1))
        return values

    def _string(self, max_len: int) -> None:
        self.out += '"'
        n = max(0, min(max_len, self.budget - self.tokens))
        text = ""
        if n:
            text, used = self.ctx.generate(self.out, n, stop='"\n')
            self.tokens += used
        text = "".join(ch for ch in text.split('"')[0].split("\n")[0] if ch >= " ")[:max_len]
        self.out += json.dumps(text, ensure_ascii=False)[1:-1] + '"'

    def _object(self, schema: dict[str, Any]) -> None:
        props = list(schema.get("properties", {}).items())
        self.out += "{"
        for i, (key, sub) in enumerate(props):
            self.out += json.dumps(key) + ":"
            term = "," if i < len(props) - 1 else "}"
            self.value(sub, term)
            self.out += term
        if not props:
            self.out += "}"

    def _array(self, schema: dict[str, Any]) -> None:
        if "prefixItems" in schema:
            items = list(schema["prefixItems"])
            self.out += "["
            for i, sub in enumerate(items):
                self.out += "," if i else ""
                self.value(sub, "," if i < len(items) - 1 else "]")
            self.out += "]"
            return
        item = schema.get("items", {})
        lo = int(schema.get("minItems", 0))
        hi = int(schema.get("maxItems", max(lo, DEFAULT_MAX_ITEMS)))
        first = {"object": "{", "array": "[", "string": '"'}.get(item.get("type", ""))
        if lo != hi and first is None and "const" not in item:
            raise ValueError(f"array with a free item count needs self-delimiting items, got {item}")
        self.out += "["
        n = 0
        while n < hi:
            if n >= lo:
                opener = ("," if n else "") + (first or json.dumps(item.get("const")))
                if self._choose([opener[0], "]"]) == "]":
                    break
            if n:
                self.out += ","
            self.value(item, "," if n < hi - 1 else "]")
            n += 1
        self.out += "]"


class TransformersJudge(BaseJudge):
    """Judge running a transformers VLM in this process."""

    backend = "transformers"

    def __init__(self, cfg: TransformersJudgeConfig, model: Any = None, processor: Any = None):
        super().__init__(cfg)
        self.model, self.processor = model, processor
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._char_ids: dict[str, int] = {}
        if model is not None:
            self.device = next(model.parameters()).device
            self.dtype = next(model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def load(self) -> None:
        """Load / build the model once (thread-safe)."""
        with self._load_lock:
            if self.model is not None:
                return
            if self.cfg.pretrained:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                if torch.cuda.is_available():
                    self.device, self.dtype = torch.device("cuda"), torch.bfloat16
                log.info("loading judge %s on %s", self.cfg.pretrained, self.device)
                self.processor = AutoProcessor.from_pretrained(self.cfg.pretrained)
                model = AutoModelForImageTextToText.from_pretrained(self.cfg.pretrained, dtype=self.dtype)
            else:
                from rewards.tiny_vlm import build_tiny_vlm

                model, self.processor = build_tiny_vlm("qwen2_5_vl", seed=0)
            self.model = model.to(self.device).eval()

    def char_id(self, ch: str) -> int:
        """Token id of the single character ``ch`` (it must be one token)."""
        if ch not in self._char_ids:
            ids = self.tokenizer.encode(ch, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"character {ch!r} is not a single token for this tokenizer ({ids})")
            self._char_ids[ch] = ids[0]
        return self._char_ids[ch]

    async def check_health(self) -> None:
        await asyncio.to_thread(self.load)

    async def _run(self, fn: Any, *args: Any) -> Any:
        def call() -> Any:
            self.load()
            with self._run_lock:
                return fn(*args)

        return await asyncio.to_thread(call)

    async def _chat(self, image: PreparedImage, text: str, max_tokens: int,
                    schema: dict[str, Any] | None = None) -> Completion:
        def work() -> Completion:
            ctx = _Context(self, image, text)
            if schema is None:
                out, n = ctx.generate("", max_tokens)
                return Completion(out, ctx.prompt_len, n)
            dec = SchemaDecoder(ctx, max_tokens)
            dec.value(schema, "")
            return Completion(dec.out, ctx.prompt_len, dec.tokens)

        return await self._run(work)

    async def _next_probs(self, image: PreparedImage, text: str, assistant_prefix: str,
                          chars: Sequence[str]) -> tuple[dict[str, float], Completion, bool]:
        def work() -> tuple[dict[str, float], Completion, bool]:
            ctx = _Context(self, image, text)
            logp = ctx.next_logprobs(assistant_prefix)
            probs = {c: float(torch.exp(logp[self.char_id(c)])) for c in chars}
            return probs, Completion("", ctx.prompt_len, 1), False

        return await self._run(work)

    def _transport_counters(self) -> dict[str, Any]:
        return {"device": str(self.device), "loaded": self.model is not None}
