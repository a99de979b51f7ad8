"""The Phi chat formats, in one place: templates, roles and special tokens, the one-string prompt of our
MLflow model, stop and pad tokens, and the generation settings a request gets when it names none.

Who imports it, and how each finds this file:
  * the training job (fine_tune.py, evaluation.py, tiny_model.py): this folder is the Azure ML job's
    code, uploaded as is, so this file imports nothing from the repository;
  * the local endpoint (finetune_phi/endpoint/): through finetune_phi.training.job_module;
  * the flows' client (chat_flow/endpoint_client.py): the chat flow's flow.dag.yaml carries this file
    into its snapshot (additional_includes) and the standard flow's snapshot keeps
    finetuning_dir/chat_format.py (the root .amlignore lets it through). So everything the client
    touches here runs on the standard library alone: transformers appears only in type hints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Byte for byte the template microsoft/Phi-3-mini-4k-instruct ships. trl recognises it by identity
# and swaps in its `{% generation %}`-marked twin for assistant-only loss, so keep it exact.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)

# Byte for byte the template microsoft/Phi-4-mini-instruct ships (its tokenizer_config.json): the same role
# tokens and <|end|> as Phi-3, without the newlines, and a system turn that may carry tools.
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
# Its twin for assistant-only loss: the same text, with each assistant turn's content and <|end|> inside
# `{% generation %}` (the tokens the loss learns from), and the closing EOS too when the conversation
# ends with the assistant, as trl's twins for Phi-3 and Phi-3.5 (the only ones it ships) mark them.
PHI4_MINI_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}{% generation %}"
    "{{ message['content'] + '<|end|>' }}{% endgeneration %}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% elif messages[-1]['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ eos_token }}{% endif %}"
)
# Published template -> our training twin, for the supported families trl has none for.
TRAINING_TEMPLATES = {PHI4_MINI_CHAT_TEMPLATE: PHI4_MINI_TRAINING_TEMPLATE}

END_OF_TURN = "<|end|>"
EOS = "<|endoftext|>"
# The special tokens of Phi-3's chat format (the real vocabulary also has placeholders we never emit).
CHAT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN, EOS)
ROLES = ("system", "user", "assistant")

# Phi-3's user turn and the assistant's turn header: the prompt template a Phi-3 (or Phi-3.5) MLflow
# model is saved with (fine_tune.py derives each model's from its tokenizer: prompt_template()). MLflow,
# and so Azure's scoring of the model, wraps every input string in it.
PROMPT_TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
_PROMPT_MARK = "\x00prompt\x00"


# How each supported family writes a conversation as text: the header of a ROLE's turn and the end of a
# turn. The conversation contract of encode_prompt, for the client, which knows the family by this name
# (deploy_model.py records it as AZURE_ML_CHAT_FORMAT) and imports nothing beyond the standard library.
TURN_FORMATS: dict[str, tuple[str, str]] = {
    "phi3": ("<|{role}|>\n", "<|end|>\n"),  # Phi-3-mini, Phi-3.5-mini
    "phi4-mini": ("<|{role}|>", "<|end|>"),  # Phi-4-mini
}
DEFAULT_TURN_FORMAT = "phi3"


def turn_format_of(template: str) -> str:
    """The TURN_FORMATS name whose user turn and assistant header make up this MLflow prompt template."""
    for name, (header, end) in TURN_FORMATS.items():
        if header.format(role="user") + "{prompt}" + end + header.format(role="assistant") == template:
            return name
    raise ValueError(
        f"the chat template's turn {template!r} is none of the supported Phi families' ({', '.join(TURN_FORMATS)}): "
        "fine-tune Phi-3-mini-4k-instruct, Phi-3.5-mini-instruct or Phi-4-mini-instruct"
    )


def turn_format_of_model_id(model: str) -> str:
    """The family of a Hub or catalog model id, where only its name is at hand (an Azure deployment)."""
    return "phi4-mini" if "phi-4-mini" in model.lower() else DEFAULT_TURN_FORMAT


def prompt_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The MLflow prompt template of a model: its own chat template's rendering of one user turn holding
    `{prompt}`, then the assistant's turn header. Phi-3 and Phi-3.5 give PROMPT_TEMPLATE; Phi-4-mini
    `<|user|>{prompt}<|end|><|assistant|>`."""
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT_MARK}], add_generation_prompt=True,
                                             tokenize=False))  # fmt: skip
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):  # the tokenizer adds BOS itself when it encodes
        text = text[len(bos):]
    if text.count(_PROMPT_MARK) != 1:
        raise ValueError("the tokenizer's chat template does not render a user message's content once: "
                         "it is not a chat template this project can package")  # fmt: skip
    return text.replace("{", "{{").replace("}", "}}").replace(_PROMPT_MARK, "{prompt}")


def training_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Our `{% generation %}`-marked twin of the tokenizer's template, where trl has none; else None."""
    return TRAINING_TEMPLATES.get(getattr(tokenizer, "chat_template", None) or "")


def published_template(template: str) -> str:
    """The published template a training twin stands for (any other template: itself)."""
    return next((published for published, twin in TRAINING_TEMPLATES.items() if twin == template), template)

# What a request that names no generation setting gets, on every path: the MLflow model's params
# schema (whose defaults MLflow and Azure's scoring script fill in), the local endpoint's /score and
# /v1/chat/completions, and the client, which sends them explicitly because a model-catalog deployment
# has defaults of its own.
# 128 new tokens: the default deployment serves Phi-3-mini in fp32 on CPU (Standard_E8s_v3), where
# each new token reads all ~15 GB of weights, a few tokens per second at best. 128 tokens then take
# tens of seconds, inside the local endpoint's 90 s request timeout and the client's 120 s read
# timeout; 256 would not reliably fit (the endpoint's start-up decode-speed check warns when even
# the default does not). Longer answers: ask for max_new_tokens. The before/after evaluation keeps
# its own limit (EVAL_MAX_NEW_TOKENS), on the training GPU.
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationDefaults:
    """Greedy decoding, MLflow's text-generation default: the same question gets the same answer from
    every path (the demo's check greps one exact sentence). As in MLflow, temperature, top_p and top_k
    matter only with do_sample true."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0


GENERATION_DEFAULTS = GenerationDefaults()


def encode_prompt(messages: Iterable[Mapping[str, str]], turn_format: str = DEFAULT_TURN_FORMAT) -> str:
    """A conversation as the ONE prompt string that the model's prompt template wraps: our model's
    conversation contract, in `turn_format` (a TURN_FORMATS name: the model's family).

    The first user message's content, then END + HEADER(role) + CONTENT for each following message
    (Phi-3: "<|end|>\n<|ROLE|>\nCONTENT"); inside the template that is byte for byte what the family's
    chat template makes of the messages (with add_generation_prompt). A leading system message is
    folded into the first user message ("SYSTEM\n\nUSER"): the template opens with the user's turn,
    so a system turn cannot be expressed.
    """
    if turn_format not in TURN_FORMATS:
        raise ValueError(f"chat format {turn_format!r}: use one of {', '.join(TURN_FORMATS)}")
    header, end = TURN_FORMATS[turn_format]
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        if not msgs or msgs[0]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        msgs[0] = {"role": "user", "content": f"{system}\n\n{msgs[0]['content']}"}
    if not msgs or msgs[0]["role"] != "user":
        raise ValueError("the conversation must start with a user message (after an optional system message)")
    prompt = msgs[0]["content"]
    for m in msgs[1:]:
        prompt += end + header.format(role=m["role"]) + m["content"]
    return prompt


class DataError(ValueError):
    """A training or evaluation file that is not a chat dataset; the message names the file, row and fix."""


def read_chat_rows(path: Path) -> list[list[dict[str, str]]]:
    """The `messages` of every row of a JSON-lines chat file, validated.

    Other columns are dropped on purpose: ultrachat rows also carry `prompt`, and trl would then
    treat the data as prompt/completion and fail looking for `completion`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --train-file/--eval-file pointing at a JSON-lines chat file")
    rows: list[list[dict[str, str]]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            rows.append(_validate_messages(record, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path}: no rows; each line must be {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
    return rows


def _validate_messages(record: Any, where: str) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: needs a non-empty `messages` list of {{\"role\", \"content\"}} objects")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
            message.get("content"), str
        ):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": one of {ROLES}, \"content\": str}}")
        cleaned.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in cleaned):
        raise DataError(f"{where}: has no assistant message, so there is nothing to learn from it")
    return cleaned


def pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The token to pad with: the tokenizer's own pad when distinct from EOS, else `<unk>`; None when
    neither exists (a new one must be added).

    Phi-3 ships pad == eos (`<|endoftext|>`); a collator that masks padding by id would then also
    mask the real EOS and the model would never learn to stop. `<unk>` is never produced by Phi-3's
    byte-fallback tokenizer, so it is a safe pad (the tutorial's choice).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return str(tokenizer.pad_token)
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        return str(tokenizer.unk_token)
    return None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Before training: give the tokenizer the pad_token() choice, adding `<pad>` when there is none."""
    chosen = pad_token(tokenizer)
    if chosen is not None and chosen == tokenizer.pad_token:
        return
    if chosen is not None:
        tokenizer.pad_token = chosen
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    log.info("pad token set to %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad a generation batch with: the pad_token() choice, else EOS.

    When generating, the attention mask hides padding, so EOS does no harm there, and a trained
    model cannot be given a new token.
    """
    token = pad_token(tokenizer) or tokenizer.eos_token
    if token is None:
        raise ValueError("the tokenizer has no pad, unk or eos token to pad a batch with; it is not a Phi-3 tokenizer")
    return int(tokenizer.convert_tokens_to_ids(token))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated turn: `<|end|>` first (what chat turns end with), then EOS.

    The one policy, for training, evaluation and serving alike: a tokenizer without either is
    refused, because a model that cannot emit `<|end|>` never ends its turn and talks until the
    token limit cuts it off.
    """
    ids = []
    for token in (END_OF_TURN, tokenizer.eos_token):
        token_id = None if token is None else tokenizer.convert_tokens_to_ids(token)
        # A token the vocabulary lacks comes back as the unknown token's id, unless it IS the unknown
        # token: Phi-4-mini's <|endoftext|> is its EOS, BOS, pad and unk at once.
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(
                f"the tokenizer has no {token or 'EOS'!r} token: it does not speak the Phi chat format, so its "
                f"replies would not stop at the end of a turn. Use a Phi tokenizer (Phi-3-mini-4k-instruct's, "
                f"Phi-3.5-mini-instruct's, Phi-4-mini-instruct's, or the tiny model's), which has {END_OF_TURN} and an EOS"
            )
        if token_id not in ids:
            ids.append(token_id)
    return ids


def generation_stop_ids(tokenizer: PreTrainedTokenizerBase, configured: int | Sequence[int] | None = None) -> list[int]:
    """stop_token_ids, then those a model's generation config adds (the hub's Phi-3 also stops at
    `<|assistant|>`): what fine_tune.py saves as the model's eos_token_id, and what serving stops at."""
    extra = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys(stop_token_ids(tokenizer) + [int(i) for i in extra]))
