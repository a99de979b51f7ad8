"""A ~1M-parameter Phi-3 built offline: the local backend's stand-in for microsoft/Phi-3-mini-4k-instruct.

Same architecture class (Phi3ForCausalLM, so LoRA targets and serving code paths are the real
ones), same chat template and special tokens, but random weights and a byte-level BPE tokenizer
trained on the training file itself. Deterministic given the seed and the data.

    python tiny_model.py --train-file ../data/train_data.jsonl --out /tmp/tiny   # build and save one
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chat_format import CHAT_SPECIAL_TOKENS, EOS, PHI3_CHAT_TEMPLATE, read_chat_rows

if TYPE_CHECKING:
    from transformers import Phi3ForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Same names as the real Phi-3 vocabulary; `<pad>` is ours so that pad != eos.
BOS, UNK, PAD = "<s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, "</s>", PAD, *CHAT_SPECIAL_TOKENS]


@dataclass(frozen=True)
class TinySpec:
    # 2 layers x 128 wide with a 2k vocabulary is ~1.1M parameters: big enough to memorise a
    # hundred short Q/A pairs in seconds on two CPU cores, small enough to save and serve instantly.
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 4096  # Phi-3-mini-4k's context, so --max-seq-length means the same


def corpus_from_rows(rows: list[list[dict[str, str]]]) -> list[str]:
    return [message["content"] for messages in rows for message in messages]


def build_tokenizer(texts: list[str], vocab_size: int = TinySpec.vocab_size) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, carrying Phi-3's special tokens and chat template.

    Byte-level means any text round-trips (no unknown characters at inference), whatever the
    training text covered.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("cannot train the tiny tokenizer on no text: the training file has no messages")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_SPECIAL_TOKENS[:-1]),
        model_max_length=TinySpec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, spec: TinySpec = TinySpec()) -> Phi3ForCausalLM:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    from chat_format import stop_token_ids

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Seed here, not only in the trainer: the weights are drawn before training starts.
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),  # stop at <|end|> like the real Phi-3
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def build_tiny(train_file: Path, seed: int, spec: TinySpec = TinySpec()) -> tuple[Phi3ForCausalLM, PreTrainedTokenizerFast]:
    """The tiny model and its tokenizer for `train_file` (a JSON-lines chat file)."""
    tokenizer = build_tokenizer(corpus_from_rows(read_chat_rows(train_file)), spec.vocab_size)
    model = build_model(tokenizer, seed, spec)
    log.info(
        "built tiny Phi-3: %d parameters, vocabulary %d (trained on %s)",
        model.num_parameters(),
        len(tokenizer),
        train_file,
    )
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to save_pretrained the model and tokenizer into")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = build_tiny(args.train_file, args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"tiny Phi-3 ({model.num_parameters()} parameters) saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
