"""Step 1: the data. Writes the train and test JSONL files the fine-tune reads.

    python download_dataset.py                          # 1% of HuggingFaceH4/ultrachat_200k train_sft (needs internet)
    python download_dataset.py --source demo            # the built-in demo set, offline
    python download_dataset.py --source rows.jsonl      # your own data (.jsonl, .json, .parquet, or a directory)

Rows keep the ultrachat_200k schema (prompt, prompt_id, messages) and are split train/test with a
fixed seed, so the same input and seed always give byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import config
from finetune_phi import common
from finetune_phi.data import DEMO_SOURCE, HUB_SOURCE, DataError, prepare_dataset

log = logging.getLogger("download_dataset")


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a percentage such as 1 or 12.5") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 100]; give a percentage such as 1 or 12.5")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.2") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1); give a fraction such as 0.2")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a seed such as 42") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a seed >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = common.base_parser(__doc__)
    parser.add_argument(
        "--source",
        default=HUB_SOURCE,
        help=f"'{HUB_SOURCE}' (default: DATASET_NAME from the Hugging Face hub), '{HUB_SOURCE}:OWNER/NAME' "
        f"(another hub dataset), '{DEMO_SOURCE}' (the built-in demo set), or a local .jsonl / .json (array) / "
        ".parquet file or a directory of them (all such files, sorted by name)",
    )
    parser.add_argument("--split", default=None, help="hub split to read (default: DATASET_SPLIT from config)")
    parser.add_argument(
        "--percent",
        type=_percent,
        default=None,
        help="take the first P%% of the rows, rounded to the nearest row as datasets' 'split[:P%%]' does. "
        "Hub sources default to DATASET_PERCENT from config; local and demo sources use every row "
        "unless --percent is given",
    )
    parser.add_argument(
        "--test-size", type=_fraction, default=None, help="test fraction (default: TEST_SIZE from config)"
    )
    parser.add_argument("--seed", type=_seed, default=None, help="split seed (default: SEED from config)")
    parser.add_argument("--train-file", type=Path, default=None, help="train output (default: TRAIN_DATA_PATH)")
    parser.add_argument("--test-file", type=Path, default=None, help="test output (default: TEST_DATA_PATH)")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="drop invalid rows (and log how many) instead of stopping with the list of them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    try:
        settings = common.settings_from_args(args)
    except config.ConfigError as exc:
        log.error("%s", exc)
        return 1
    is_hub = args.source == HUB_SOURCE or args.source.startswith(HUB_SOURCE + ":")
    percent = args.percent if args.percent is not None else (settings.DATASET_PERCENT if is_hub else None)
    try:
        result = prepare_dataset(
            args.source,
            train_path=args.train_file or settings.train_data_path,
            test_path=args.test_file or settings.test_data_path,
            dataset_name=settings.DATASET_NAME,
            split=args.split or settings.DATASET_SPLIT,
            percent=percent,
            test_size=args.test_size if args.test_size is not None else settings.TEST_SIZE,
            seed=args.seed if args.seed is not None else settings.SEED,
            skip_invalid=args.skip_invalid,
        )
    except DataError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s", result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
