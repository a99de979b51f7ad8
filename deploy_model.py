"""Step 4: register the fine-tuned model, deploy it to an online endpoint, hand its URI and key to the flows.

    python deploy_model.py                          # local: register in the local MLflow registry, start the local endpoint
    python deploy_model.py --teardown               # local: stop the local endpoint
    python deploy_model.py --rotate-key             # local: re-deploy with a fresh key
    python deploy_model.py --force                  # deploy although the gate finds the model worse (either backend)
    python deploy_model.py --backend azure --dry-run dryrun/   # write model/endpoint/deployment YAML, no network
    python deploy_model.py --backend azure --check  # read-only preflight
    python deploy_model.py --backend azure          # register, create/update endpoint + deployment, route 100% traffic
                                                    # (after --mode serverless: a serverless endpoint, pay per token)
    python deploy_model.py --backend azure --teardown   # delete the endpoint(s) and scale the cluster to 0

Before anything is registered, the gate (finetune_phi/gate.py) compares the run's evaluation with its
base model and with the deployed model's run, and refuses a worse model unless --force.
Either way the scoring URI, key and deployment kind land in ENV_FILE (default `.env`;
AZURE_ML_ENDPOINT / AZURE_ML_API_KEY / AZURE_ML_ENDPOINT_KIND, mode 0600) and in the Prompt flow
connection named PROMPTFLOW_CONNECTION_NAME (configs.endpoint, configs.kind, secrets.key), so the
flows work unchanged against a local, an Azure MLflow, an Azure model-catalog or a serverless deployment.
Locally, one deploy or teardown runs at a time per STATE_DIR: a second exits 1 naming the one that runs. A re-deploy starts the new endpoint beside the old one on the same
port and stops the old one only once the new one is ready; an endpoint that died is restarted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import config
from finetune_phi import common

log = logging.getLogger("deploy_model")


def build_parser() -> argparse.ArgumentParser:
    parser = common.base_parser(__doc__)
    parser.add_argument("--teardown", action="store_true", help="stop/delete the endpoint instead of deploying")
    parser.add_argument("--no-connection", action="store_true", help="do not create/update the Prompt flow connection")
    parser.add_argument("--force", action="store_true",
                        help="deploy even when the gate finds the model worse than its base model or the deployed one "
                        "(EVAL_PRIMARY_METRIC, stop rate); the decision is recorded as forced")
    parser.add_argument("--rotate-key", action="store_true",
                        help="local: serve with a fresh key (written to ENV_FILE and the connection); the old key stops working")
    azure = parser.add_argument_group("azure backend")
    azure.add_argument("--job-name", help="register the model from this job (default: the job setup_ml.py recorded)")
    azure.add_argument("--dry-run", metavar="DIR", type=Path,
                       help="write the Azure entities as YAML into DIR and stop (no network)")
    azure.add_argument("--check", action="store_true", help="read-only preflight of config, credential and workspace")
    return parser


def publish(
    settings: config.Settings,
    scoring_uri: str,
    key: str,
    kind: str,
    chat_format: str = config.Settings.AZURE_ML_CHAT_FORMAT,
    connection: bool = True,
) -> None:
    """Hand the endpoint to the flows: .env for the SDK variant, a CustomConnection for the Studio variant.

    `kind` (config.ENDPOINT_KINDS) tells the flows which request shape the endpoint answers, and
    `chat_format` (config.CHAT_FORMATS) how they write a conversation as the one prompt our model takes.
    """
    if kind not in config.ENDPOINT_KINDS:
        raise config.ConfigError([f"deployment kind {kind!r}: use one of {', '.join(config.ENDPOINT_KINDS)}"])
    if chat_format not in config.CHAT_FORMATS:
        raise config.ConfigError([f"chat format {chat_format!r}: use one of {', '.join(config.CHAT_FORMATS)}"])
    common.write_dotenv(
        settings.env_file,
        {"AZURE_ML_ENDPOINT": scoring_uri, "AZURE_ML_API_KEY": key, "AZURE_ML_ENDPOINT_KIND": kind,
         "AZURE_ML_CHAT_FORMAT": chat_format},
    )  # fmt: skip
    log.info("wrote AZURE_ML_ENDPOINT=%s, AZURE_ML_API_KEY=%s, AZURE_ML_ENDPOINT_KIND=%s and AZURE_ML_CHAT_FORMAT=%s "
             "to %s", scoring_uri, common.redact(key), kind, chat_format, settings.env_file)  # fmt: skip
    if connection:
        from finetune_phi.pf_connection import upsert_connection

        upsert_connection(settings, endpoint=scoring_uri, key=key, kind=kind, chat_format=chat_format)
        log.info("Prompt flow connection %r now points at %s (%s)",
                 settings.PROMPTFLOW_CONNECTION_NAME, scoring_uri, kind)


def run_local(settings: config.Settings, args: argparse.Namespace) -> int:
    from finetune_phi import local_deploy

    if args.teardown:
        log.info("%s", local_deploy.teardown(settings))
        return 0
    info = local_deploy.deploy(settings, rotate_key=args.rotate_key, force=args.force)
    chat_format = local_deploy.chat_format_of(settings, info.model_uri)
    publish(settings, info.scoring_uri, info.key, "local", chat_format, connection=not args.no_connection)
    log.info("endpoint serving %s at %s (pid %s, log %s)", info.model_uri, info.scoring_uri, info.pid, info.log_path)
    return 0


def run_azure(settings: config.Settings, args: argparse.Namespace) -> int:
    from finetune_phi.azure import workflow

    if args.dry_run:
        for path in workflow.dry_run_deployment(settings, args.dry_run, job_name=args.job_name):
            log.info("wrote %s", path)
        return 0
    if args.check:
        return workflow.report_check(settings, deploying=True)
    if args.teardown:
        for line in workflow.teardown(settings):
            log.info("%s", line)
        return 0
    info = workflow.deploy(settings, job_name=args.job_name, force=args.force)
    from finetune_phi.training import job_module

    # The registered model is in the workspace, not here: its family follows from the id of the model
    # it was fine-tuned from (a catalog model for the catalog modes, BASE_MODEL for a command job).
    base = common.read_state(settings).get("training", {}).get("catalog_model") or settings.BASE_MODEL
    chat_format = job_module("chat_format").turn_format_of_model_id(str(base))
    publish(settings, info.scoring_uri, info.key, info.kind, chat_format, connection=not args.no_connection)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    try:
        settings = common.settings_from_args(args)
        if settings.BACKEND == "azure":
            return run_azure(settings, args)
        return run_local(settings, args)
    except (config.ConfigError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
