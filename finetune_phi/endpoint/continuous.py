"""Continuous batching over the KV cache: one decoding step for every running row at once.

    stepper = Stepper(engine)                       # None-free only for Phi-3-layout models (supports())
    row = stepper.start(prompt_ids, limit, params)  # preallocates the row's own KV cache
    stepper.step([row, ...], max_tokens)            # one packed forward; appends one token per decoding row

Every row keeps its own cache (one preallocated [1, kv_heads, prompt + limit, head_dim] buffer per layer),
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

from finetune_phi.endpoint.engine import Engine, SamplingParams, apply_openai_penalties


# Prepacked oneDNN weights for the decoder layers' linears. Measured on the 2-core AMD EPYC (MKL
# takes its generic AVX2 path there): a [16, 768] x [768, 4096] product took 8-10 ms prepacked
# against 12-15 ms through nn.Linear, and 16 ms against 26-33 ms at 64 rows; at 1 row it is slower
# (3-5 ms against 2.5-3.7), so a step of fewer than PACKED_MIN_TOKENS tokens keeps nn.Linear. The
# packed copy costs as much memory as those weights again: only for fp32 CPU models whose layer
# weights take under PACKED_MAX_BYTES. caps.BatchCaps.packed_weights (--packed-weights) forces it off/on.
PACKED_MIN_TOKENS = 4
PACKED_BATCH_HINT = 16
PACKED_MAX_BYTES = 2 * 1024**3
# The tiny demo model's layers (~2 MB) gain nothing from it (bench/batching_bench.py: 74 vs 89
# requests per CPU-second at 16 clients with and without), so small models keep nn.Linear.
PACKED_MIN_BYTES = 64 * 1024**2


def _packing_wanted(model: Any) -> bool:
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    return PACKED_MIN_BYTES <= layer_bytes <= PACKED_MAX_BYTES


# RoPE variants whose cos/sin the step reproduces exactly (tests/test_batcher_layouts.py): plain RoPE
# (Phi-3-mini-4k) and LongRoPE (Phi-3.5-mini, Phi-4-mini), whose factors depend on the sequence length.
COVERED_ROPE = ("default", "longrope")


def supports(model: Any) -> bool:
    """True for models laid out like Phi3ForCausalLM (fused qkv_proj, RMSNorm layers, rotary_emb) with a
    RoPE variant in COVERED_ROPE; any other model is served by one generate() per request."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not len(layers) or not hasattr(model, "lm_head"):
        return False
    layer = layers[0]
    attn = getattr(layer, "self_attn", None)
    return (
        hasattr(inner, "embed_tokens")
        and getattr(getattr(inner, "rotary_emb", None), "rope_type", "default") in COVERED_ROPE
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
    keys: list[torch.Tensor]  # per layer [1, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    done: bool = False
    finish: str | None = None  # "stop" | "length" | "cancelled"
    owner: Any = None  # the batcher's request
    index: int = 0  # the row's place in its request
    # Tokens to (re)compute the cache of, when not the prompt: a LongRoPE row crossing its original
    # context recomputes its whole sequence with the long factors (Stepper._switch_to_long_factors).
    refeed: list[int] | None = None

    @property
    def fed(self) -> list[int]:
        """The tokens a prefill feeds: the prompt, or the whole sequence being recomputed."""
        return self.prompt if self.refeed is None else self.refeed

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.fed)

    @property
    def capacity(self) -> int:
        return len(self.prompt) + self.limit

    def release(self) -> None:
        self.keys, self.values = [], []


class Stepper:
    """Runs packed steps for an engine's model (Phi-3 layout). Not thread-safe: one caller thread."""

    def __init__(self, engine: Engine, packed_weights: bool | None = None) -> None:
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
        # LongRoPE: its factors follow the sequence length (_rope_per_row), and a row that reaches the
        # original context recomputes its cache (_switch_to_long_factors), as generate() does.
        self.longrope = getattr(self.inner.rotary_emb, "rope_type", "default") == "longrope"
        self.original_context: int | None = getattr(config, "original_max_position_embeddings", None) or None
        self.stop_ids = set(engine.stop_token_ids)
        self.param = next(model.parameters())
        # oneDNN-prepacked copies of the decoder layers' weights (see PACKED_* above), or none.
        self.packed: dict[int, torch.Tensor] = {}
        if packed_weights if packed_weights is not None else _packing_wanted(model):
            self._pack()
        self._rope = self._rope_table()
        norm = self.layers[0].input_layernorm
        self._fused_norm = (
            hasattr(F, "rms_norm")
            and self.param.dtype == torch.float32
            and type(norm).__name__ == "Phi3RMSNorm"
            and hasattr(norm, "variance_epsilon")
        )
        self.forwards = 0  # packed forwards run (tests, logs)
        self.last_tokens = 0  # tokens in the latest forward

    def _pack(self) -> None:
        for layer in self.layers:
            for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                self.packed[id(module)] = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACKED_BATCH_HINT)

    def _rope_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin for every position, [1, 1, positions, dim], computed once by the model's own rotary
        embedding (elementwise per position, so the values are the ones it computes each step).
        Only for plain RoPE: scaled variants (longrope, dynamic) depend on the sequence length."""
        rotary = self.inner.rotary_emb
        if getattr(rotary, "rope_type", None) != "default":
            return None
        positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if not 0 < positions <= 131072:
            return None
        probe = torch.empty(1, 1, dtype=self.param.dtype, device=self.param.device)
        with torch.inference_mode():
            cos, sin = rotary(probe, position_ids=torch.arange(positions, device=self.param.device)[None])
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _rope_per_row(self, hidden: torch.Tensor, segments: Sequence[tuple[Row, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for LongRoPE, whose factors (short or long) follow the length of the sequence the model
        sees: generate() prefills a prompt of L tokens in one forward (factors of L) and then decodes
        position p alone (factors of p + 1). A packed step holds several rows and a prompt may arrive in
        chunks, so each segment asks the rotary embedding for its own positions plus, while prefilling,
        the prompt's last position (dropped again), which makes it pick the factors generate() picks."""
        rotary = self.inner.rotary_emb
        device = hidden.device
        cos_parts, sin_parts = [], []
        for row, start, n in segments:
            positions = list(range(start, start + n))
            if row.prefilling:
                positions.append(len(row.fed) - 1)
            cos, sin = rotary(hidden, position_ids=torch.tensor([positions], device=device))
            cos_parts.append(cos[:, :n])
            sin_parts.append(sin[:, :n])
        return torch.cat(cos_parts, dim=1).unsqueeze(1), torch.cat(sin_parts, dim=1).unsqueeze(1)

    def _switch_to_long_factors(self, row: Row) -> None:
        """What Phi3ForCausalLM.prepare_inputs_for_generation does when a sequence first outgrows the
        original context: it drops the cache (built with the short factors) and recomputes the whole
        sequence with the long ones. The row about to feed position `original` re-prefills its prompt and
        the tokens generated so far instead, so that it keeps giving the tokens generate() gives."""
        if not row.done and not row.prefilling and row.cached == self.original_context and row.generated:
            row.refeed = row.prompt + row.generated
            row.cached = 0

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        """Phi3RMSNorm.forward as torch's fused rms_norm (same values on fp32; hooks-free modules only)."""
        if self._fused_norm and not norm._forward_hooks and not norm._forward_pre_hooks:
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        return norm(x)

    def _linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed.get(id(module)) if x.shape[-2] >= PACKED_MIN_TOKENS else None
        if packed is None:
            if module._forward_hooks or module._forward_pre_hooks:
                return module(x)
            return F.linear(x, module.weight, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [None], "")

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        if not self.packed or x.shape[-2] < PACKED_MIN_TOKENS or not hasattr(mlp, "gate_up_proj"):
            return mlp(x)
        gate, up = self._linear(mlp.gate_up_proj, x).chunk(2, dim=-1)  # Phi3MLP.forward, over packed weights
        return self._linear(mlp.down_proj, up * mlp.activation_fn(gate))

    # --- rows ---------------------------------------------------------------------------------------

    def start(self, prompt: Sequence[int], limit: int, params: SamplingParams, owner: Any = None, index: int = 0) -> Row:
        prompt = list(prompt)
        capacity = len(prompt) + max(limit, 0)
        shape = (1, self.kv_heads, max(capacity, 1), self.head_dim)
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
        if self.longrope and self.original_context is not None:
            for row in rows:
                self._switch_to_long_factors(row)
        segments: list[tuple[Row, int, int]] = []  # (row, start in its sequence, n tokens)
        budget = max_tokens
        for row in rows:
            if not row.prefilling:
                segments.append((row, row.cached, 1))
                budget -= 1
        for row in rows:
            if row.prefilling:
                left = len(row.fed) - row.cached
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
                ids.extend(row.fed[start : start + n])
            else:
                ids.append(row.generated[-1] if row.generated else row.prompt[-1])
            positions.extend(range(start, start + n))
        device = self.param.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)
        hidden = self.inner.embed_tokens(input_ids)
        if self._rope is not None and max(positions) < self._rope[0].shape[2]:
            cos, sin = self._rope[0][:, :, position_ids[0]], self._rope[1][:, :, position_ids[0]]
        elif self.longrope:
            cos, sin = self._rope_per_row(hidden, segments)
        else:
            cos, sin = self.inner.rotary_emb(hidden, position_ids=position_ids)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        total = len(ids)
        sizes = [n for _, _, n in segments]
        q_width = self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            h = self._norm(layer.input_layernorm, hidden)
            qkv = self._linear(attn.qkv_proj, h)
            q = qkv[..., :q_width].view(1, total, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_width : q_width + kv_width].view(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_width + kv_width :].view(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, k, cos, sin)
            qs, ks, vs = q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2)
            outputs = []
            for (row, start, n), q_i, k_i, v_i in zip(segments, qs, ks, vs):
                end = start + n
                keys, values = row.keys[index], row.values[index]
                keys[:, :, start:end].copy_(k_i)
                values[:, :, start:end].copy_(v_i)
                if n == 1 and (self.window is None or end <= self.window) and self.kv_heads == self.heads:
                    outputs.append(F.scaled_dot_product_attention(q_i, keys[:, :, :end], values[:, :, :end], scale=self.scale))
                else:
                    outputs.append(self._attend(q_i, keys[:, :, :end], values[:, :, :end], start, n))
            out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            out = out.transpose(1, 2).reshape(1, total, q_width)
            hidden = residual + self._linear(attn.o_proj, out)  # the residual dropouts are identities in eval mode
            hidden = hidden + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, hidden))
        # Logits only where a row's next token is decided: the last token of its segment, when that
        # segment finishes the prompt (or the row is decoding).
        last: list[int] = []
        emitting: list[Row] = []
        offset = 0
        for row, start, n in segments:
            offset += n
            row.cached = start + n
            if row.cached >= len(row.fed):
                last.append(offset - 1)
                emitting.append(row)
        self.forwards += 1
        self.last_tokens = total
        if not emitting:
            return []
        hidden = self._norm(self.inner.norm, hidden[0, last])
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
    return (params.repetition_penalty is not None and params.repetition_penalty != 1.0) or params.openai_penalised


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
    """generate()'s processing for one row: repetition penalty, OpenAI's penalties, then temperature,
    top-k, top-p, draw.

    The same operations, in the same order, as transformers' RepetitionPenaltyLogitsProcessor, the
    engine's OpenAIPenalties, TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, so a
    seeded row alone draws what `generate()` draws for it.
    """
    params = row.params
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        seen = torch.tensor([row.prompt + row.generated], dtype=torch.long, device=scores.device)
        score = torch.gather(scores, 1, seen)
        penalty = float(params.repetition_penalty)
        score = torch.where(score < 0, score * penalty, score / penalty)
        scores = scores.scatter(1, seen, score)
    if params.openai_penalised:
        generated = torch.tensor([row.generated], dtype=torch.long, device=scores.device)
        scores = apply_openai_penalties(scores, generated, params.presence_penalty, params.frequency_penalty)
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
