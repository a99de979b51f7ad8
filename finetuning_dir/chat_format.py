"""Phi-3 chat format shared by training, the tiny stand-in model and serving.

This folder is uploaded as the Azure ML job's code, so it imports nothing from the repository.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

END_OF_TURN = "<|end|>"
EOS = "<|endoftext|>"
# The special tokens of Phi-3's chat format (the real vocabulary also has placeholders we never emit).
CHAT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN, EOS)
ROLES = ("system", "user", "assistant")


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS.

    Phi-3 ships pad == eos (`<|endoftext|>`); a collator that masks padding by id would then
    also mask the real EOS and the model would never learn to stop. `<unk>` is never produced
    by Phi-3's byte-fallback tokenizer, so it is a safe pad (the tutorial's choice).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    log.info("pad token set to %r (id %d)", tokenizer.pad_token, tokenizer.pad_token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated turn: `<|end|>` first (what chat turns end with), then EOS."""
    ids = []
    for token in (END_OF_TURN, tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token; it does not speak the Phi-3 chat format")
        if token_id not in ids:
            ids.append(token_id)
    return ids


def require_maskable_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail before training, not after, when assistant-only loss cannot be computed.

    trl masks with a `{% generation %}`-marked twin of the template; it ships one for Phi-3's
    template (matched byte for byte) and refuses templates it does not know.
    """
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError as exc:
        raise ValueError(
            f"assistant-only loss needs a chat template trl can mark up ({exc}); use a Phi-3 tokenizer, "
            "or pass --no-assistant-only-loss to learn from every token"
        ) from exc
