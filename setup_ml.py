"""Step 2: run the fine-tune, on this machine (local backend) or as an Azure ML job.

    python setup_ml.py                              # local: fine-tune the tiny model into the local MLflow store
    python setup_ml.py --model microsoft/Phi-3-mini-4k-instruct   # local, real weights (GPU advised)
    python setup_ml.py --recipe tutorial            # the tutorial's own recipe (README: Differences from the tutorial)
    python setup_ml.py --backend azure --dry-run dryrun/   # write compute/environment/job YAML, no network
    python setup_ml.py --backend azure --check      # read-only preflight: config, credential, workspace, quota
    python setup_ml.py --backend azure              # get-or-create the cluster, submit the job, stream its logs
    python setup_ml.py --backend azure --mode serverless  # Azure fine-tunes a catalog model as a service (per token)
    python setup_ml.py --backend azure --mode catalog   # Azure's catalog fine-tuning on your cluster

Both backends run `finetuning_dir/fine_tune.py` with the same command line
(finetune_phi.training.fine_tune_command) and record the run in the local state file,
so `deploy_model.py` finds the model without anything pasted. The catalog modes fine-tune
AZURE_CATALOG_MODEL (Phi-4-mini-instruct) with Azure's own recipe instead, after reading its
retirement dates and deploy regions from the registry: a retired model stops the run before
anything is created or billed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import config
from finetune_phi import common

log = logging.getLogger("setup_ml")


def build_parser() -> argparse.ArgumentParser:
    parser = common.base_parser(__doc__)
    parser.add_argument("--model", help="local backend: base model to fine-tune (default: LOCAL_BASE_MODEL)")
    parser.add_argument(
        "--recipe", choices=sorted(config.RECIPES),
        help="train a published recipe instead of config.py's training settings: tutorial = the SDK tutorial's "
        "fine_tune.py (full fine-tuning, lr 5e-6, 3 epochs, 2,048 tokens, warmup 0.2, loss on every token, seed 0, "
        "Phi-3.5-mini-instruct as the Azure job's base)",
    )  # fmt: skip
    azure = parser.add_argument_group("azure backend")
    azure.add_argument("--mode", choices=("command", "serverless", "catalog"), default="command",
                       help="command: our fine_tune.py as a command job on your cluster; serverless: Azure fine-tunes "
                       "AZURE_CATALOG_MODEL as a service (no cluster, billed per token); catalog: Azure's catalog "
                       "fine-tuning of AZURE_CATALOG_MODEL on your cluster")
    azure.add_argument("--dry-run", metavar="DIR", type=Path,
                       help="write the Azure entities as YAML into DIR and stop (no network)")
    azure.add_argument("--check", action="store_true", help="read-only preflight of config, credential and workspace")
    azure.add_argument("--no-stream", action="store_true", help="submit the job and return without streaming logs")
    return parser


def run_local(settings: config.Settings, model: str | None) -> int:
    from finetune_phi.training import run_local_fine_tune

    result = run_local_fine_tune(settings, model=model)
    log.info(
        "done in %.1fs: MLflow run %s, model %s (recorded in %s)",
        result.seconds, result.run_id, result.model_uri, common.state_path(settings),
    )
    return 0


def run_azure(settings: config.Settings, args: argparse.Namespace) -> int:
    from finetune_phi.azure import workflow

    if args.dry_run:
        for path in workflow.dry_run_training(settings, args.dry_run, mode=args.mode):
            log.info("wrote %s", path)
        return 0
    if args.check:
        return workflow.report_check(settings, args.mode)
    job_name = workflow.submit_training(settings, mode=args.mode, stream=not args.no_stream)
    log.info("job %s recorded in %s; next: python deploy_model.py --backend azure", job_name, common.state_path(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    try:
        settings = common.settings_from_args(args)
        if args.recipe and settings.BACKEND == "azure" and args.mode != "command":
            raise config.ConfigError([
                f"--recipe {args.recipe} trains with our fine_tune.py (the local backend or --mode command); "
                f"--mode {args.mode} runs Azure's own recipe on AZURE_CATALOG_MODEL: drop one of them"])
        if args.recipe:
            settings = config.with_recipe(settings, args.recipe)
            log.info("recipe %s: %s", args.recipe,
                     ", ".join(f"{k}={v}" for k, v in config.RECIPES[args.recipe].items()))  # fmt: skip
        if settings.BACKEND == "azure":
            return run_azure(settings, args)
        return run_local(settings, args.model)
    except (config.ConfigError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
