"""Continuous batching over the KV cache: one decoding step for every running row at once.

    stepper = Stepper(engine)                       # None-free only for Phi-3-layout models (supports())
    row = stepper.start(prompt_ids, limit, params)  # preallocates the row's own KV cache
    stepper.step([row, ...], max_tokens)            # one packed forward; appends one token per decoding row

Every row keeps its own cache (one preallocated [heads, prompt + limit, head_dim] buffer per layer),
its own sampling parameters and its own random generator. A step packs the new tokens of all rows
into ONE sequence — one token for a decoding row, a chunk of the prompt for a row still in prefill —
so the linear layers (where a real model spends its time) run once over exactly the real tokens:
nothing is padded to a neighbour's length. Attention runs per row over that row's own cache.
A row that joins mid-way simply starts its prefill at the next step.

The forward reuses the model's own modules (embedding, RMSNorms, qkv/o projections, MLP, rotary
embedding, lm_head) and torch's scaled_dot_product_attention, as transformers' sdpa path does, so a
greedy row gives the tokens `model.generate` gives it alone (tests/test_batching.py checks this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from finetune_phi.endpoint.engine import Engine, SamplingParams


def supports(model: Any) -> bool:
    """True for models laid out like Phi3ForCausalLM (fused qkv_proj, RMSNorm layers, rotary_emb)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not len(layers) or not hasattr(model, "lm_head"):
        return False
    layer = layers[0]
    attn = getattr(layer, "self_attn", None)
    return (
        hasattr(inner, "embed_tokens")
        and hasattr(inner, "rotary_emb")
        and hasattr(inner, "norm")
        and attn is not None
        and hasattr(attn, "qkv_proj")
        and hasattr(attn, "o_proj")
        and hasattr(layer, "input_layernorm")
        and hasattr(layer, "post_attention_layernorm")
        and hasattr(layer, "mlp")
    )


@dataclass(eq=False)
class Row:
    """One prompt being answered: its tokens, its cache, its sampling state."""

    prompt: list[int]
    limit: int
    params: SamplingParams
    keys: list[torch.Tensor]  # per layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    done: bool = False
    finish: str | None = None  # "stop" | "length" | "cancelled"
    owner: Any = None  # the batcher's request
    index: int = 0  # the row's place in its request

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    @property
    def capacity(self) -> int:
        return len(self.prompt) + self.limit

    def release(self) -> None:
        self.keys, self.values = [], []


class Stepper:
    """Runs packed steps for an engine's model (Phi-3 layout). Not thread-safe: one caller thread."""

    def __init__(self, engine: Engine) -> None:
        model = engine.model
        if not supports(model):
            raise TypeError(f"{type(model).__name__} is not laid out like Phi3ForCausalLM")
        self.engine = engine
        self.model = model
        self.inner = model.model
        config = model.config
        self.layers = list(self.inner.layers[: config.num_hidden_layers])
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.layers[0].self_attn.scaling if hasattr(self.layers[0].self_attn, "scaling") else self.head_dim**-0.5
        self.window = getattr(config, "sliding_window", None)
        self.stop_ids = set(engine.stop_token_ids)
        self.param = next(model.parameters())
        self.forwards = 0  # packed forwards run (tests, logs)
        self.last_tokens = 0  # tokens in the latest forward

    # --- rows ---------------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int], limit: int, params: SamplingParams, owner: Any = None, index: int = 0) -> Row:
        prompt = list(prompt)
        capacity = len(prompt) + max(limit, 0)
        shape = (self.kv_heads, max(capacity, 1), self.head_dim)
        dtype, device = self.param.dtype, self.param.device
        keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        generator = None
        if params.do_sample and params.seed is not None:
            # Its own generator: a seeded row draws the same numbers whoever it runs beside, the
            # draws `torch.manual_seed(seed)` + `generate()` make for it alone.
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        row = Row(prompt=prompt, limit=max(limit, 0), params=params, keys=keys, values=values, generator=generator, owner=owner, index=index)
        if row.limit == 0 or not prompt:
            row.done, row.finish = True, "length"
            row.release()
        return row

    # --- one step -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, rows: Sequence[Row], max_tokens: int) -> list[Row]:
        """One packed forward over `rows` (not done); returns the rows that got a new token.

        Decoding rows take one token each; rows in prefill share what is left of `max_tokens`
        (oldest first), so a long prompt is fed over several steps instead of one huge forward.
        A row always gets at least one token when nothing else runs.
        """
        segments: list[tuple[Row, int, int]] = []  # (row, start in its sequence, n tokens)
        budget = max_tokens
        for row in rows:
            if not row.prefilling:
                segments.append((row, row.cached, 1))
                budget -= 1
        for row in rows:
            if row.prefilling:
                left = len(row.prompt) - row.cached
                n = min(left, budget) if segments else min(left, max(budget, 1))
                if n <= 0:
                    continue
                segments.append((row, row.cached, n))
                budget -= n
        if not segments:
            return []
        ids: list[int] = []
        positions: list[int] = []
        for row, start, n in segments:
            if row.prefilling:
                ids.extend(row.prompt[start : start + n])
            else:
                ids.append(row.generated[-1] if row.generated else row.prompt[-1])
            positions.extend(range(start, start + n))
        device = self.param.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)
        hidden = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        total = len(ids)
        q_width = self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            h = layer.input_layernorm(hidden)
            qkv = attn.qkv_proj(h)
            q = qkv[..., :q_width].view(1, total, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_width : q_width + kv_width].view(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_width + kv_width :].view(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, k, cos, sin)
            outputs = []
            offset = 0
            for row, start, n in segments:
                end = start + n
                row.keys[index][:, start:end].copy_(k[0, :, offset : offset + n])
                row.values[index][:, start:end].copy_(v[0, :, offset : offset + n])
                outputs.append(self._attend(q[:, :, offset : offset + n], row.keys[index][:, :end], row.values[index][:, :end], start, n))
                offset += n
            out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            out = out.transpose(1, 2).reshape(1, total, q_width)
            hidden = residual + attn.o_proj(out)  # the residual dropouts are identities in eval mode
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        # Logits only where a row's next token is decided: the last token of its segment, when that
        # segment finishes the prompt (or the row is decoding).
        last: list[int] = []
        emitting: list[Row] = []
        offset = 0
        for row, start, n in segments:
            offset += n
            row.cached = start + n
            if row.cached >= len(row.prompt):
                last.append(offset - 1)
                emitting.append(row)
        self.forwards += 1
        self.last_tokens = total
        if not emitting:
            return []
        hidden = self.inner.norm(hidden[0, last])
        logits = self.model.lm_head(hidden).float()
        tokens = self._choose(emitting, logits)
        for row, token in zip(emitting, tokens):
            row.generated.append(token)
            if token in self.stop_ids:
                row.done, row.finish = True, "stop"
            elif len(row.generated) >= row.limit:
                row.done, row.finish = True, "length"
            if row.done:
                row.release()
        return emitting

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, n: int) -> torch.Tensor:
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        length = start + n
        window = self.window
        if window is not None and length > window:
            # Query at position i sees keys j with i - window < j <= i (transformers' sliding window).
            qpos = torch.arange(start, length).unsqueeze(1)
            kpos = torch.arange(length).unsqueeze(0)
            mask = (kpos <= qpos) & (kpos > qpos - window)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.device), scale=self.scale)
        if n == 1:
            return F.scaled_dot_product_attention(q, keys, values, scale=self.scale)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale)
        # A later prefill chunk: causal, aligned to the end of the keys.
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    def _choose(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row, under that row's own sampling parameters."""
        plain = [i for i, r in enumerate(rows) if not r.params.do_sample and not _penalised(r.params)]
        out = [0] * len(rows)
        if plain:
            picked = logits[plain].argmax(dim=-1).tolist() if len(plain) < len(rows) else logits.argmax(dim=-1).tolist()
            for i, t in zip(plain, picked):
                out[i] = t
        for i, row in enumerate(rows):
            if not row.params.do_sample and not _penalised(row.params):
                continue
            out[i] = _sample_one(row, logits[i : i + 1])
        return out


def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty is not None and params.repetition_penalty != 1.0


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (partial rotary included), on [1, heads, T, dim]."""
    dim = cos.shape[-1]
    if dim == q.shape[-1]:
        return q * cos + _half(q) * sin, k * cos + _half(k) * sin
    q_rot, q_pass = q[..., :dim], q[..., dim:]
    k_rot, k_pass = k[..., :dim], k[..., dim:]
    return (
        torch.cat([q_rot * cos + _half(q_rot) * sin, q_pass], dim=-1),
        torch.cat([k_rot * cos + _half(k_rot) * sin, k_pass], dim=-1),
    )


def _half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sample_one(row: Row, scores: torch.Tensor) -> int:
    """generate()'s processing for one row: repetition penalty, then temperature, top-k, top-p, draw.

    The same operations, in the same order, as transformers' RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, so a seeded row alone draws
    what `generate()` draws for it.
    """
    params = row.params
    if _penalised(params):
        seen = torch.tensor([row.prompt + row.generated], dtype=torch.long, device=scores.device)
        score = torch.gather(scores, 1, seen)
        penalty = float(params.repetition_penalty)  # type: ignore[arg-type]
        score = torch.where(score < 0, score * penalty, score / penalty)
        scores = scores.scatter(1, seen, score)
    if not params.do_sample:
        return int(scores.argmax(dim=-1).item())
    if params.temperature != 1.0:
        scores = scores / params.temperature
    top_k = params.top_k or 0
    if top_k > 0:
        k = min(top_k, scores.size(-1))
        threshold = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < threshold, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = 0  # min_tokens_to_keep = 1
        remove = remove.scatter(1, sorted_indices, remove)
        scores = scores.masked_fill(remove, -math.inf)
    probs = F.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=row.generator).item())
