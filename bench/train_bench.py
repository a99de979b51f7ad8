"""Training speed: this project's recipe (finetuning_dir/fine_tune.py) against the original tutorial's.

Every recipe trains the same model (built from the same seed) on the same rows for the same number
of optimizer steps at the same sequence length, each in its own process (so peak RSS is its own),
and the bench prints ONE JSON line. The headline is `ratio_total_tok_s`: every non-pad token each
recipe pushed through forward and backward per second, ours over the peer's.

    .venv/bin/python bench/train_bench.py                  # CPU, tiny model, 200 steps of 4x1024: ~8 min on 2 idle cores
    .venv/bin/python bench/train_bench.py --steps 10       # a sanity run (~40 s)
    .venv/bin/python bench/train_bench.py --peer-bfd       # adds the tutorial with TRL 1.x's default packing
    python bench/train_bench.py --model phi3-mini-shape    # CUDA only: Phi-3-mini-sized, random init, seq 2048

The peer is the tutorial's fine_tune.py (Phi-3CookBook, "Fine-tune and Integrate custom Phi-3
models with Prompt flow") moved to TRL 1.x: full fine-tune, every row rendered to text with an
empty system turn, pad = unk, eager attention, gradient checkpointing, lr 5e-6, cosine, warm-up
0.2, batch 4, `SFTConfig(max_length=L, packing=True, packing_strategy="wrapped",
dataset_text_field="text")`, seed 0, where L is --seq-len (the tutorial's is 2048). "wrapped" is
TRL 1.x's nearest to the tutorial's TRL 0.8 `ConstantLengthDataset`: the texts, each ended with
EOS, concatenated and cut into full L-token rows, attention across the cuts, padded batches with
an attention mask. TRL 1.x's default ("bfd") packs padding-free, which its docs support only with
FlashAttention: with eager attention the batch becomes one 4·L-token sequence with (4·L)² scores
per head. That variant runs only with --peer-bfd, as its own labelled `peer_bfd_*` fields.

Ours is whatever `fine_tune.prepare()` builds (the trainer a real run uses) at --max-seq-length L:
each conversation truncated to L (trl drops a row whose assistant turns all fall beyond L),
padded batches, loss on assistant turns only.

Data: every row of the file but the last 4 trains, those 4 are held out. With the default 20 real
ultrachat_200k rows, 200 steps cycle over them many times (the line states each recipe's epochs):
a throughput measurement, not a study of what the model learns.

Counted per optimizer step, from the batches it trained on, the first step left out (warm-up) and
evaluation time subtracted: `*_total_tok_s` every non-pad token, `*_supervised_tok_s` the tokens
with a label (assistant turns for ours, every token for the peer). Eval loss is the same for every
recipe: mean NLL of the assistant tokens of the held-out rows (their first L tokens), each row
formatted the way that recipe formats its training rows, before and after training.

A fixture the workload needs (the ultrachat rows, the Phi-3 tokenizer for phi3-mini-shape) that is
missing stops the bench with testkit.fixtures' message; it never swaps in other data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FINETUNING_DIR = REPO / "finetuning_dir"
MODELS = ("tiny", "phi3-mini-shape")
RECIPES = ("ours", "peer", "peer_bfd")
# Defaults per model. Tiny on 2 idle CPU cores, 1 thread, 4x1024 tokens a step: ours 0.7 s, the
# peer 1.4 s (eager attention, gradient checkpointing), so 200 steps take ~2.5 and ~5 min with
# start-up and evaluations. At the tutorial's 2048 a peer step took ~5 s (machine loaded): 100
# steps alone would be ~8 min. phi3-mini-shape keeps the tutorial's 2048 (a GPU runs it in minutes).
DEFAULT_STEPS = {"tiny": 200, "phi3-mini-shape": 100}
DEFAULT_SEQ_LEN = {"tiny": 1024, "phi3-mini-shape": 2048}
BATCH_SIZE = 4  # the tutorial's per-device batch, and fine_tune.py's default
EVAL_ROWS = 4
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM bf16 dense peak; the H200 is the same chip (GH100)
TUTORIAL_LR = 5e-6

log = logging.getLogger("train_bench")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"optimizer steps per recipe, the same for all (default: {DEFAULT_STEPS['tiny']})",
    )  # fmt: skip
    parser.add_argument(
        "--seq-len", type=int, default=None,
        help=f"max_length of every recipe (default: {DEFAULT_SEQ_LEN['tiny']} tiny, "
        f"{DEFAULT_SEQ_LEN['phi3-mini-shape']} phi3-mini-shape)",
    )  # fmt: skip
    parser.add_argument(
        "--data", type=Path, default=None,
        help="ultrachat-style JSON lines, the last 4 rows the eval set "
        "(default: the 20 real ultrachat_200k rows, testkit.fixtures.ultrachat_first20())",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="Phi-3 tokenizer folder for phi3-mini-shape (default: testkit.fixtures.phi3_tokenizer_dir())",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, the same for every recipe")
    parser.add_argument("--seed", type=int, default=42, help="model init seed, the same for every recipe")
    parser.add_argument(
        "--peer-bfd", action="store_true",
        help="also run the tutorial recipe with TRL 1.x's default 'bfd' (padding-free) packing, as peer_bfd_* fields",
    )  # fmt: skip
    parser.add_argument(
        "--ours-packing", choices=("auto", "on", "off"), default="auto",
        help="fine_tune.py --packing for our recipe (on: padding-free packing, to measure it against padding)",
    )  # fmt: skip
    # Child mode: one recipe, on the split the parent made, its result as JSON in --out.
    parser.add_argument("--recipe", choices=RECIPES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--train-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval-file", type=Path, help=argparse.SUPPRESS)
    return parser


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.model]
    if args.seq_len is None:
        args.seq_len = DEFAULT_SEQ_LEN[args.model]
    return args


def validate(args: argparse.Namespace) -> None:
    problems = []
    if args.steps is not None and args.steps < 2:
        problems.append(f"--steps must be >= 2: the first step is warm-up and not timed (got {args.steps})")
    if args.seq_len is not None and args.seq_len < 64:
        problems.append(f"--seq-len must be >= 64 (got {args.seq_len})")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1 (got {args.threads})")
    if args.data is not None and not args.data.is_file():
        problems.append(f"--data {args.data}: no such file; pass an ultrachat-style JSON-lines file")
    if args.model == "phi3-mini-shape":
        if args.tokenizer is not None and not args.tokenizer.is_dir():
            problems.append(f"--tokenizer {args.tokenizer}: not a folder; pass the Phi-3 tokenizer folder")
        import torch

        if not torch.cuda.is_available():
            problems.append("--model phi3-mini-shape needs CUDA (a 3.8B-parameter model); run the default tiny bench here")
    if problems:
        raise SystemExit("train_bench.py: " + "; ".join(problems))


def resolve_fixtures(args: argparse.Namespace) -> None:
    """Fill --data (and --tokenizer for phi3-mini-shape) from the shared fixtures, or stop.

    A missing fixture ends the bench with the fixture module's how-to message: measuring on other
    data would print a line that looks like the benchmark's and is not.
    """
    if args.data is not None and (args.model == "tiny" or args.tokenizer is not None):
        return
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from testkit import fixtures

    try:
        if args.data is None:
            args.data = fixtures.ultrachat_first20()
        if args.model == "phi3-mini-shape" and args.tokenizer is None:
            args.tokenizer = fixtures.phi3_tokenizer_dir()
    except fixtures.FixtureUnavailable as exc:
        raise SystemExit(f"train_bench.py: the benchmark's workload is unavailable, nothing was measured:\n{exc}") from exc


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Result:
    recipe: str
    device: str
    model: str
    parameters: int
    steps: int  # optimizer steps the trainer ran (trainer.state.global_step)
    timed_steps: int
    epochs: float  # passes over the training examples (trainer.state.epoch)
    train_examples: int  # rows after the recipe's preparation: conversations for ours, packed rows for the peer
    train_sha256: str  # of the file this process trained on
    seconds: float
    supervised_tokens: int
    total_tokens: int
    supervised_tok_s: float
    total_tok_s: float
    peak_mib: float  # peak RSS on CPU, peak allocated GPU memory on CUDA
    eval_loss_before: float
    eval_loss: float
    settings: dict[str, Any]
    mfu: float | None = None


class StepMeter:
    """Tokens of every optimizer step and the time between steps, evaluation time subtracted."""

    def __init__(self, trainer: Any, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.step_tokens: list[tuple[int, int]] = []
        self.step_ends: list[float] = []
        self.eval_seconds_at_step: list[float] = []
        self._pending = [0, 0]
        self._eval_seconds = 0.0
        self._wrap(trainer)

    def _wrap(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        compute_loss, evaluate = trainer.compute_loss, trainer.evaluate

        def counting_compute_loss(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if model.training:
                labels = inputs["labels"]
                self._pending[0] += int((labels != -100).sum())
                if "attention_mask" in inputs:
                    self._pending[1] += int(inputs["attention_mask"].sum())
                else:  # padding-free: one flattened row, no padding unless pad_to_multiple_of
                    self._pending[1] += int((inputs["input_ids"] != self.pad_token_id).sum())
            return compute_loss(model, inputs, *args, **kwargs)

        def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                self._eval_seconds += time.perf_counter() - start

        # Instance attributes shadow the methods the training loop calls through `self.`.
        trainer.compute_loss, trainer.evaluate = counting_compute_loss, timed_evaluate
        meter = self

        class OnStepEnd(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter._synchronize()
                meter.step_ends.append(time.perf_counter())
                meter.eval_seconds_at_step.append(meter._eval_seconds)
                meter.step_tokens.append((meter._pending[0], meter._pending[1]))
                meter._pending = [0, 0]

        trainer.add_callback(OnStepEnd())

    @staticmethod
    def _synchronize() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def rates(self) -> tuple[int, float, int, int]:
        """(timed steps, seconds, supervised tokens, total tokens) from the end of step 1 to the last."""
        if len(self.step_ends) < 2:
            raise RuntimeError(f"only {len(self.step_ends)} optimizer step(s) ran; the bench needs at least 2")
        evals = self.eval_seconds_at_step[-1] - self.eval_seconds_at_step[0]
        seconds = self.step_ends[-1] - self.step_ends[0] - evals
        supervised = sum(s for s, _ in self.step_tokens[1:])
        total = sum(t for _, t in self.step_tokens[1:])
        return len(self.step_ends) - 1, seconds, supervised, total


def assistant_nll(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int = 2048) -> float:
    """Mean NLL per assistant token (content and its <|end|>) in each row's first `max_length` tokens,
    the same definition for every recipe."""
    import torch
    from trl.chat_template_utils import get_training_chat_template

    template = get_training_chat_template(tokenizer)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            encoded = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = torch.tensor(encoded["input_ids"][:max_length], device=device)[None]
            mask = torch.tensor(encoded["assistant_masks"][:max_length], device=device, dtype=torch.bool)[None]
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            target = mask[0, 1:]
            total_nll += float(nll[target].sum())
            total_tokens += int(target.sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError(f"the eval rows have no assistant tokens inside their first {max_length} tokens")
    return total_nll / total_tokens


def peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- data and models ------------------------------------------------------------------------------


def split_rows(data: Path, workdir: Path) -> tuple[Path, Path]:
    """The first rows train, the last EVAL_ROWS are held out; written once, read by every recipe."""
    sys.path.insert(0, str(FINETUNING_DIR))
    from chat_format import read_chat_rows

    rows = read_chat_rows(data)
    if len(rows) <= EVAL_ROWS:
        raise SystemExit(f"--data {data}: needs more than {EVAL_ROWS} rows (the last {EVAL_ROWS} are the eval set)")
    train, evaluation = workdir / "train.jsonl", workdir / "eval.jsonl"
    for path, part in ((train, rows[:-EVAL_ROWS]), (evaluation, rows[-EVAL_ROWS:])):
        path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in part), encoding="utf-8")
    return train, evaluation


def build_model(name: str, train_file: Path, tokenizer_dir: Path | None, seed: int, dtype_name: str) -> tuple[Any, Any]:
    """The same weights for every recipe: built from `seed` (tiny: and the train file)."""
    import torch

    if name == "tiny":
        from tiny_model import build_tiny

        return build_tiny(train_file, seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Phi3Config(  # the defaults are Phi-3-mini's shape: 32 layers x 3072, 32064 vocabulary
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    return model, tokenizer


def read_eval(eval_file: Path) -> list[list[dict[str, str]]]:
    from chat_format import read_chat_rows

    return read_chat_rows(eval_file)


# --- the recipes ----------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, train_file: Path, eval_file: Path, workdir: Path) -> tuple[Any, Any, dict[str, Any]]:
    import fine_tune

    argv = ["--train-file", str(train_file), "--eval-file", str(eval_file), "--model_output_dir", str(workdir / "model"),
            "--model", "tiny" if args.model == "tiny" else "phi3-mini-shape", "--max-steps", str(args.steps),
            "--max-seq-length", str(args.seq_len), "--batch-size", str(BATCH_SIZE),
            "--packing", args.ours_packing]  # fmt: skip
    ft_args = fine_tune.make_parser().parse_args(argv)
    if args.model == "tiny":
        prepared = fine_tune.prepare(ft_args, workdir / "ckpt")
        trainer, tokenizer, recipe = prepared.trainer, prepared.tokenizer, prepared.recipe
    else:
        from chat_format import ensure_pad_token

        device = fine_tune.detect_device()
        peft = fine_tune.resolve_peft(ft_args.peft, ft_args.model)
        attention = fine_tune.choose_attention(ft_args.attn_implementation, device)
        model, tokenizer = build_model(args.model, train_file, args.tokenizer, args.seed, "bfloat16")
        model.set_attn_implementation(attention)
        model.config.use_cache = False
        ensure_pad_token(tokenizer)
        recipe = fine_tune.choose_recipe(ft_args, model, device, peft, attention)
        train_ds, eval_ds = fine_tune.load_datasets(train_file, eval_file)
        trainer = fine_tune.make_trainer(
            ft_args, model, tokenizer, train_ds, eval_ds, device=device, peft=peft, recipe=recipe,
            checkpoint_dir=workdir / "ckpt", total_steps=args.steps,
        )  # fmt: skip
    settings = {"peft": fine_tune.resolve_peft(ft_args.peft, ft_args.model), "lr": ft_args.learning_rate,
                "batch_size": ft_args.batch_size, "loss_on": "assistant turns",
                "truncation": "each conversation to seq_len", **asdict(recipe)}  # fmt: skip
    return trainer, tokenizer, settings


def tutorial_text(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The tutorial's apply_chat_template(): an empty system turn first, rendered to text."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def run_peer(args: argparse.Namespace, train_file: Path, eval_file: Path, workdir: Path) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from chat_format import read_chat_rows

    # "wrapped" is the peer (the tutorial's TRL 0.8 packing); "bfd" is TRL 1.x's default, kept as a
    # labelled extra row because it is what the tutorial's code does today if moved over unchanged.
    packing_strategy = "bfd" if args.recipe == "peer_bfd" else "wrapped"
    cuda = torch.cuda.is_available()
    # The tutorial loads bf16 weights and trains with bf16=True. On CPU the peer keeps fp32: bf16
    # there is slower without native bf16 units, and pure-bf16 weights would round lr-5e-6 updates to zero.
    model, tokenizer = build_model(args.model, train_file, args.tokenizer, args.seed, "bfloat16" if cuda else "float32")
    model.set_attn_implementation("eager")
    model.config.use_cache = False
    tokenizer.model_max_length = args.seq_len
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    train_ds = Dataset.from_list([{"text": tutorial_text(m, tokenizer)} for m in read_chat_rows(train_file)])
    eval_ds = Dataset.from_list([{"text": tutorial_text(m, tokenizer)} for m in read_chat_rows(eval_file)])
    config = SFTConfig(
        output_dir=str(workdir / "peer"),
        bf16=cuda,
        use_cpu=not cuda,
        eval_strategy="epoch",
        learning_rate=TUTORIAL_LR,
        logging_steps=20,
        lr_scheduler_type="cosine",
        num_train_epochs=3,
        max_steps=args.steps,  # changed: the same number of optimizer steps as ours
        per_device_eval_batch_size=BATCH_SIZE,
        per_device_train_batch_size=BATCH_SIZE,
        save_strategy="no",  # the tutorial saves every 500 steps; the bench measures training, not saving
        seed=0,
        gradient_checkpointing=True,
        gradient_accumulation_steps=1,
        warmup_steps=0.2,  # warmup_ratio=0.2 in transformers 4
        max_length=args.seq_len,  # changed: the bench's length, the same for every recipe (tutorial: 2048)
        dataset_text_field="text",
        packing=True,
        packing_strategy=packing_strategy,
        report_to="none",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    # Read back from the trainer, not from our arguments: what it will actually do.
    settings = {"peft": "full", "lr": TUTORIAL_LR, "batch_size": trainer.args.per_device_train_batch_size,
                "attention": model.config._attn_implementation, "packing": trainer.args.packing,
                "packing_strategy": trainer.args.packing_strategy, "padding_free": bool(trainer.padding_free),
                "gradient_checkpointing": trainer.args.gradient_checkpointing, "loss_on": "every token",
                "dtype": "bfloat16" if cuda else "float32"}  # fmt: skip
    return trainer, tokenizer, settings


def eval_conversations(recipe: str, eval_file: Path) -> list[list[dict[str, str]]]:
    rows = read_eval(eval_file)
    if recipe != "ours":  # scored on the rows as the peer formats them for training
        rows = [m if m[0]["role"] == "system" else [{"role": "system", "content": ""}, *m] for m in rows]
    return rows


def run_child(args: argparse.Namespace) -> Result:
    import torch

    sys.path.insert(0, str(FINETUNING_DIR))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        workdir = Path(tmp)
        train_file, eval_file = args.train_file, args.eval_file
        runner = run_ours if args.recipe == "ours" else run_peer
        trainer, tokenizer, settings = runner(args, train_file, eval_file, workdir)
        torch.set_num_threads(args.threads)  # fine_tune.prepare() pins the tiny model to 1 thread
        conversations = eval_conversations(args.recipe, eval_file)
        before = assistant_nll(trainer.model, tokenizer, conversations, args.seq_len)
        meter = StepMeter(trainer, tokenizer.pad_token_id)
        trainer.train()
        peak = peak_mib()
        timed_steps, seconds, supervised, total = meter.rates()
        after = assistant_nll(trainer.model, tokenizer, conversations, args.seq_len)
        parameters = trainer.model.num_parameters()
    total_tok_s = total / seconds
    mfu = None
    if torch.cuda.is_available():
        # 6·N FLOPs per token (forward 2N, backward 4N), the convention MFU is quoted in, for every
        # recipe; LoRA skips the frozen weights' gradients (~4N), so its real utilisation is lower.
        mfu = 6 * parameters * total_tok_s / H100_BF16_DENSE_FLOPS
    return Result(
        recipe=args.recipe,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        model=args.model,
        parameters=parameters,
        steps=trainer.state.global_step,
        timed_steps=timed_steps,
        epochs=round(float(trainer.state.epoch or 0.0), 2),
        train_examples=len(trainer.train_dataset),
        train_sha256=sha256_of(train_file),
        seconds=round(seconds, 3),
        supervised_tokens=supervised,
        total_tokens=total,
        supervised_tok_s=round(supervised / seconds, 1),
        total_tok_s=round(total_tok_s, 1),
        peak_mib=round(peak, 1),
        eval_loss_before=round(before, 4),
        eval_loss=round(after, 4),
        settings=settings,
        mfu=None if mfu is None else round(mfu, 4),
    )


# --- the parent: one process per recipe -----------------------------------------------------------


def run_recipe(args: argparse.Namespace, recipe: str, train_file: Path, eval_file: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{recipe}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--recipe", recipe, "--out", str(out), "--model", args.model,
            "--train-file", str(train_file), "--eval-file", str(eval_file), "--threads", str(args.threads),
            "--seed", str(args.seed), "--ours-packing", args.ours_packing, "--steps", str(args.steps),
            "--seq-len", str(args.seq_len)]  # fmt: skip
    if args.tokenizer is not None:
        argv += ["--tokenizer", str(args.tokenizer)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}  # fmt: skip
    log.info("running the %s recipe (%d steps at %d tokens)", recipe, args.steps, args.seq_len)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train_bench.py: the {recipe} recipe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    log.info("%s recipe done in %.0f s (process wall time)", recipe, time.perf_counter() - start)
    return json.loads(out.read_text(encoding="utf-8"))


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def summary(args: argparse.Namespace, results: dict[str, dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    ours, peer = results["ours"], results["peer"]
    line: dict[str, Any] = {
        "bench": "train",
        "headline": "ratio_total_tok_s",
        "device": ours["device"],
        "model": ours["model"],
        "parameters": ours["parameters"],
        "threads": args.threads,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "batch_size": BATCH_SIZE,
        "data": data,
        "ratio_total_tok_s": ratio(ours["total_tok_s"], peer["total_tok_s"]),
        "ratio_supervised_tok_s": ratio(ours["supervised_tok_s"], peer["supervised_tok_s"]),
        "ratio_peak_mib": ratio(ours["peak_mib"], peer["peak_mib"]),
        "timed_steps": ours["timed_steps"],
    }
    for name, r in results.items():
        line |= {
            f"{name}_total_tok_s": r["total_tok_s"],
            f"{name}_supervised_tok_s": r["supervised_tok_s"],
            f"{name}_peak_mib": r["peak_mib"],
            f"{name}_eval_loss_before": r["eval_loss_before"],
            f"{name}_eval_loss": r["eval_loss"],
            f"{name}_steps": r["steps"],
            f"{name}_epochs": r["epochs"],
            f"{name}_train_examples": r["train_examples"],
            f"{name}_train_sha256": r["train_sha256"],
            f"{name}_seconds": r["seconds"],
        }
        if r.get("mfu") is not None:
            line[f"{name}_mfu"] = r["mfu"]
    if "peer_bfd" in results:
        line["ratio_total_tok_s_vs_peer_bfd"] = ratio(ours["total_tok_s"], results["peer_bfd"]["total_tok_s"])
    line |= {name: r["settings"] for name, r in results.items()}
    line |= {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    return line


def main(argv: list[str] | None = None) -> int:
    args = fill_defaults(make_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    validate(args)
    if args.recipe:
        result = run_child(args)
        args.out.write_text(json.dumps(asdict(result)), encoding="utf-8")
        return 0
    resolve_fixtures(args)
    recipes = [r for r in RECIPES if r != "peer_bfd" or args.peer_bfd]
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        train_file, eval_file = split_rows(args.data, Path(tmp))
        train_rows = sum(1 for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip())
        data = {"file": str(args.data), "sha256": sha256_of(args.data), "train_rows": train_rows,
                "eval_rows": EVAL_ROWS, "train_sha256": sha256_of(train_file)}  # fmt: skip
        results = {recipe: run_recipe(args, recipe, train_file, eval_file, Path(tmp)) for recipe in recipes}
    # A ratio over unequal work would be meaningless: refuse to print one.
    mismatched = {name: r["steps"] for name, r in results.items() if r["steps"] != args.steps}
    if mismatched:
        raise SystemExit(f"train_bench.py: recipes ran other step counts than --steps {args.steps}: {mismatched}")
    other_data = [name for name, r in results.items() if r["train_sha256"] != data["train_sha256"]]
    if other_data:
        raise SystemExit(f"train_bench.py: {other_data} trained on another file than the split of {args.data}")
    print(json.dumps(summary(args, results, data)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
