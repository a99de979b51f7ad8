"""Generation for the local endpoint: chat formatting, stop tokens, sampling params, batching.

The Engine holds the model and tokenizer and turns conversations into token rows and token rows into
replies. batcher.py decodes with continuous batching (continuous.py) where the model's layout is
covered; elsewhere `Engine.generate_ids` runs ONE `model.generate` over a left-padded batch of one
request's rows (the fallback path).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from finetune_phi.training import job_module

if TYPE_CHECKING:
    import torch

    from finetune_phi.endpoint.loading import LoadPolicy

log = logging.getLogger(__name__)
# Template, stop and pad tokens, default generation settings: the training job's, so that the model is
# served exactly as it was trained and saved.
chat_format = job_module("chat_format")

Message = dict[str, str]  # {"role": "user" | "system" | "assistant", "content": "..."}
# The engine answers a conversation (rendered with the tokenizer's chat template: what
# /v1/chat/completions sends) or a prompt string (wrapped in the model's MLflow prompt template,
# exactly as MLflow's text-generation pipeline, and so Azure's scoring of the model, does: /score).

# The hard ceiling a request cannot exceed: generation is O(tokens) on CPU, so an unbounded
# max_new_tokens would let one request hog the server.
MAX_NEW_TOKENS_CAP = 2048
# Dividing logits by a temperature near 0 overflows to inf and NaN probabilities; that close to 0,
# sampling is greedy decoding anyway.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class ScoreDefaults(chat_format.GenerationDefaults):
    """What a /score request that leaves a param out gets: the model's MLflow params-schema defaults.

    MLflow (and so Azure's scoring script) fills every param a request omits with its schema default,
    so these are read from the saved signature (Engine.from_mlflow); a model saved without a schema
    gets chat_format's, the ones fine_tune.py saves.
    """

    @classmethod
    def from_params_schema(cls, schema: Any) -> "ScoreDefaults":
        """The defaults of an MLflow ParamSchema (None: chat_format's)."""
        if schema is None:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        values = {p.name: p.default for p in schema.params if p.name in known and p.default is not None}
        return cls(**values)

    def names(self) -> tuple[str, ...]:
        return tuple(self.__dataclass_fields__)


class InputTooLong(ValueError):
    """A conversation leaves no room in the model's context for the requested new tokens."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = chat_format.DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = chat_format.GENERATION_DEFAULTS.do_sample
    temperature: float = chat_format.GENERATION_DEFAULTS.temperature
    top_p: float = chat_format.GENERATION_DEFAULTS.top_p
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # OpenAI's penalties, as vLLM applies them (apply_openai_penalties): on the tokens generated so far.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def openai_penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @classmethod
    def resolve(
        cls,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        do_sample: bool | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
    ) -> "SamplingParams":
        """Map request fields onto generate(): temperature 0 (below MIN_TEMPERATURE) or do_sample false means greedy.

        With no do_sample, a positive temperature asks for sampling (as with the OpenAI API and
        HF pipelines given a temperature); with neither, decoding is greedy and reproducible.
        """
        sample = do_sample if do_sample is not None else (temperature is not None and temperature > 0)
        if temperature is not None and temperature < MIN_TEMPERATURE:
            sample = False
        return cls(
            max_new_tokens=max_new_tokens if max_new_tokens is not None else chat_format.DEFAULT_MAX_NEW_TOKENS,
            do_sample=sample,
            temperature=temperature if temperature and temperature >= MIN_TEMPERATURE else 1.0,
            top_p=top_p if top_p is not None else 1.0,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            presence_penalty=float(presence_penalty or 0.0),
            frequency_penalty=float(frequency_penalty or 0.0),
        )


def apply_openai_penalties(
    scores: "torch.Tensor", generated: "torch.Tensor", presence: float, frequency: float
) -> "torch.Tensor":
    """OpenAI's presence and frequency penalties, as vLLM applies them (its `apply_penalties`): from each
    token's logit subtract `frequency` × how often the reply so far holds it and `presence` once if it
    holds it at all. Only generated tokens count, not the prompt. `scores` [rows, vocab];
    `generated` [rows, n] token ids (n may be 0); after the repetition penalty, before temperature."""
    if not presence and not frequency:
        return scores
    import torch  # the engine module itself loads without torch

    counts = torch.zeros_like(scores)
    if generated.numel():
        counts.scatter_add_(1, generated.to(scores.device), torch.ones_like(generated, dtype=scores.dtype, device=scores.device))
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


class OpenAIPenalties:
    """apply_openai_penalties as a generate() logits processor; the prompt is the first `width` ids.

    generate() runs custom processors after its repetition penalty and before temperature, top-k and
    top-p: vLLM's order."""

    def __init__(self, width: int, presence: float, frequency: float) -> None:
        self.width, self.presence, self.frequency = width, presence, frequency

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        return apply_openai_penalties(scores, input_ids[:, self.width :], self.presence, self.frequency)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn reached) or "length" (max_new_tokens reached)


class Engine:
    """A loaded causal LM and its tokenizer; thread-safe (one generate at a time)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "model",
        prompt_template: str | None = None,
        score_defaults: ScoreDefaults | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.prompt_template = prompt_template
        self.score_defaults = score_defaults or ScoreDefaults()
        # Left padding keeps every prompt's last token at the end of the row, where generation starts.
        self.tokenizer.padding_side = "left"
        if not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template; formatting prompts with Phi-3's")
            self.tokenizer.chat_template = chat_format.PHI3_CHAT_TEMPLATE
        self.pad_token_id = chat_format.padding_id(tokenizer)
        # chat_format's one stop-token policy: a tokenizer without <|end|> is refused, with the fix.
        self.stop_token_ids = chat_format.generation_stop_ids(tokenizer, model.generation_config.eos_token_id)
        self.max_context = int(
            getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 4096)
        )
        self._lock = threading.Lock()
        log.info(
            "engine ready: %s, stop tokens %s, pad %s, context %d",
            type(model).__name__,
            self.stop_token_ids,
            self.pad_token_id,
            self.max_context,
        )

    @classmethod
    def from_mlflow(cls, model_uri: str, name: str | None = None, policy: "LoadPolicy | None" = None) -> "Engine":
        """Load a transformers model logged with MLflow (e.g. `models:/NAME/VERSION`).

        Besides weights and tokenizer, the MLmodel gives what MLflow's own serving (and Azure's
        scoring script) applies to a prompt string: the prompt template and the params-schema defaults.
        `policy` (loading.py) sets device, dtype and context; before any weight is read, the
        weights plus the KV cache its limits allow are checked against free memory (NotEnoughMemory).
        """
        from pathlib import Path

        import mlflow.artifacts
        import mlflow.transformers
        import torch
        from mlflow.models import Model

        from finetune_phi.endpoint.loading import LoadPolicy, apply_plan, plan_load

        policy = policy or LoadPolicy()
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
        plan = plan_load(Path(local), policy)
        # The dtype goes to from_pretrained, so weights are converted as they load (no second copy).
        components = mlflow.transformers.load_model(local, return_type="components", torch_dtype=getattr(torch, plan.dtype))
        saved = Model.load(local)
        config = (saved.flavors.get("python_function") or {}).get("config") or {}
        if config.get("return_full_text"):
            log.warning("the model was saved with return_full_text; this endpoint returns the generated text only")
        signature = saved.signature
        engine = cls(
            apply_plan(components["model"], plan),
            components["tokenizer"],
            name=name or served_name(model_uri),
            prompt_template=(saved.metadata or {}).get("prompt_template"),
            score_defaults=ScoreDefaults.from_params_schema(signature.params if signature else None),
        )
        if plan.context < engine.max_context:
            log.info("context limited to %d tokens (prompt + new tokens) by the load policy", plan.context)
            engine.max_context = plan.context
        return engine

    @property
    def device(self) -> Any:
        """The model's device: build input tensors there."""
        return self.model.device

    def render(self, conversation: Sequence[Message] | str) -> str:
        """The prompt text for one conversation or prompt string, ending with the assistant's turn header."""
        if isinstance(conversation, str):
            if self.prompt_template is not None:
                return self.prompt_template.format(prompt=conversation)  # what MLflow does with it
            conversation = [{"role": "user", "content": conversation}]
        return self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)

    def encode(self, conversation: Sequence[Message] | str) -> list[int]:
        """Prompt token ids. A prompt string is tokenized as MLflow's text-generation pipeline does
        (the tokenizer's own add_special_tokens default); a conversation's chat template already
        wrote every special token the model expects. Phi-3's tokenizers add no BOS either way."""
        text = self.render(conversation)
        if isinstance(conversation, str) and self.prompt_template is not None:
            return list(self.tokenizer(text)["input_ids"])
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, conversations: Sequence[Sequence[Message] | str]) -> list[list[int]]:
        """Prompt token ids for each conversation or prompt string (CPU work the server runs off its event loop)."""
        encoded = [self.encode(c) for c in conversations]
        longest = max((len(ids) for ids in encoded), default=0)
        if longest >= self.max_context:
            raise InputTooLong(
                f"the prompt is {longest} tokens but the model's context holds {self.max_context}: shorten the input"
            )
        return encoded

    def row_limit(self, prompt_len: int, params: SamplingParams) -> int:
        """New tokens a prompt may get: max_new_tokens, but never past the end of the context."""
        return max(0, min(params.max_new_tokens, self.max_context - prompt_len))

    def generate(self, conversations: Sequence[Sequence[Message] | str], params: SamplingParams) -> list[Completion]:
        """One reply per conversation, from a single batched `model.generate` call."""
        if not conversations:
            return []
        rows = self.prepare(conversations)
        limits = [self.row_limit(len(r), params) for r in rows]
        new_ids = self.generate_ids(rows, limits, params)
        return [self.completion(ids, len(r), n) for ids, r, n in zip(new_ids, rows, limits)]

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        limits: Sequence[int],
        params: SamplingParams,
        cancelled: Callable[[], Sequence[bool]] | None = None,
        on_step: Callable[[list[int]], None] | None = None,
    ) -> list[list[int]]:
        """The new token ids for each prompt row, from ONE `model.generate` over the left-padded rows.

        Row i stops after `limits[i]` new tokens (rows of different requests may ask for different
        lengths); `cancelled()`, polled once per step, marks rows whose caller has gone, so a batch
        whose callers all left stops early. Each row's result is cut at its own limit: what a row
        holds after it finished (padding) is never returned. Greedy rows come out the same as when
        generated alone: left padding plus the attention mask, from which generate() derives
        position ids, make padding invisible to the model.

        Streaming hook: `on_step(ids)`, if given, is called on this thread after every decoding step
        with the one new token id of each row (a finished row gets padding, as in the result).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if len(rows) != len(limits):
            raise ValueError("one limit per row")
        if not rows:
            return []
        width = max(len(r) for r in rows)
        # Positions stay within each row's own length, but the padded tensor must still fit the context.
        steps = min(max(limits), self.max_context - width)
        if steps <= 0:
            return [[] for _ in rows]
        device = self.model.device  # inputs where the weights are (CUDA when loading.py put the model there)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long, device=device)
                attention_mask[i, width - len(row) :] = 1
        row_limits = torch.tensor(limits, dtype=torch.long, device=device)

        class RowDone(StoppingCriteria):
            def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = (ids.shape[1] - width) >= row_limits
                if cancelled is not None:
                    done = done | torch.tensor(list(cancelled()), dtype=torch.bool, device=device)
                return done

        kwargs: dict[str, Any] = {
            "max_new_tokens": steps,
            "do_sample": params.do_sample,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_token_id,
            "stopping_criteria": StoppingCriteriaList([RowDone()]),
        }
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        else:
            # Unset sampling knobs that a saved generation_config may carry, so greedy stays greedy
            # without transformers warning that they are ignored.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.repetition_penalty is not None:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.openai_penalised:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(
                [OpenAIPenalties(width, params.presence_penalty, params.frequency_penalty)]
            )
        if on_step is not None:
            kwargs["streamer"] = _StepStreamer(on_step)
        with self._lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return [output[i, width : width + limits[i]].tolist() for i in range(len(rows))]

    def completion(self, new_ids: list[int], prompt_tokens: int, limit: int | None = None) -> Completion:
        """Decode one row's new ids; `limit` cuts what generate() appended after the row was done."""
        if limit is not None:
            new_ids = new_ids[:limit]
        stop = next((i for i, t in enumerate(new_ids) if t in self.stop_token_ids), None)
        if stop is None:
            kept, counted, reason = new_ids, len(new_ids), "length"
        else:
            # The stop token was generated (it counts) but is not part of the reply.
            kept, counted, reason = new_ids[:stop], stop + 1, "stop"
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Completion(text=text, prompt_tokens=int(prompt_tokens), completion_tokens=counted, finish_reason=reason)


class _StepStreamer:
    """transformers' streamer protocol (put the prompt once, then each step's tokens; end) as a callback."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        self.on_step([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


def served_name(model_uri: str) -> str:
    """`models:/NAME/VERSION` -> NAME: the id the OpenAI-style routes report."""
    if model_uri.startswith("models:/"):
        return model_uri[len("models:/") :].split("/")[0].split("@")[0] or "model"
    return model_uri.rstrip("/").split("/")[-1] or "model"


# --- decode speed against the request timeout -------------------------------------------------------

WARMUP_PROMPT = "Hello"
WARMUP_NEW_TOKENS = 16


def check_decode_speed(engine: Engine, request_timeout_s: float, max_new_tokens: int | None = None) -> float:
    """Seconds per new token from one short greedy generate (which also warms the model up).

    Warns when `max_new_tokens` (default: what a request gets when it names none) at that speed
    would take longer than `request_timeout_s`: such requests would be answered 408.
    """
    from finetune_phi.endpoint.loading import DTYPE_SETTING, TIMEOUT_SETTING

    wanted = max_new_tokens if max_new_tokens is not None else engine.score_defaults.max_new_tokens
    engine.generate([WARMUP_PROMPT], SamplingParams(max_new_tokens=2))  # first call: one-time costs
    started = time.perf_counter()
    [done] = engine.generate([WARMUP_PROMPT], SamplingParams(max_new_tokens=WARMUP_NEW_TOKENS))
    elapsed = time.perf_counter() - started
    per_token = elapsed / max(1, done.completion_tokens)  # a reply that stops early overstates it: errs safe
    projected = per_token * wanted
    if projected > request_timeout_s:
        log.warning(
            "decoding runs at %.1f tokens/s here, so %d new tokens (a request's default max_new_tokens) take ~%.0f s, "
            "longer than %s=%g: such requests will time out (408). Raise %s, ask for fewer tokens, or use a faster "
            "device/dtype (%s)",
            1 / per_token, wanted, projected, TIMEOUT_SETTING, request_timeout_s, TIMEOUT_SETTING, DTYPE_SETTING,
        )  # fmt: skip
    else:
        log.info(
            "decoding runs at %.1f tokens/s: %d new tokens take ~%.1f s (%s=%g); at most %d fit in it",
            1 / per_token, wanted, projected, TIMEOUT_SETTING, request_timeout_s, int(request_timeout_s / per_token),
        )  # fmt: skip
    return per_token
