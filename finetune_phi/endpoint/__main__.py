"""Run the local endpoint in the foreground.

    FINETUNE_PHI_ENDPOINT_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \
        python -m finetune_phi.endpoint --model-uri models:/finetune-phi3-model/1 --host 127.0.0.1 --port 5001

MLFLOW_TRACKING_URI must point at the registry holding the model. The socket is bound with
SO_REUSEPORT so that a new version can start on the same port while the old one still serves;
with --load-before-listen it accepts connections only once the model is loaded, so such a
hand-over never routes a request to a server that would answer 503.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from finetune_phi.endpoint import KEY_ENV

log = logging.getLogger("finetune_phi.endpoint")

EXIT_LOAD_FAILED = 1
EXIT_USAGE = 2
EXIT_PORT_BUSY = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_phi.endpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-uri", required=True, help="MLflow model URI, e.g. models:/NAME/VERSION")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=5001, help="TCP port (default: %(default)s)")
    parser.add_argument("--served-model-name", help="model id reported by /v1/models (default: NAME from the URI)")
    parser.add_argument(
        "--load-before-listen",
        action="store_true",
        help="load the model before accepting connections (used when replacing a running endpoint)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that a second server may share during a hand-over."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Old and new servers append to one log during a hand-over: the pid tells their lines apart.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    key = os.environ.get(KEY_ENV, "")
    if not key:
        log.error("set %s to the endpoint key (deploy_model.py does this for you)", KEY_ENV)
        return EXIT_USAGE
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("port %d on %s is in use by another program: stop it or set LOCAL_ENDPOINT_PORT", args.port, args.host)
            return EXIT_PORT_BUSY
        raise

    import uvicorn

    from finetune_phi.common import redact
    from finetune_phi.endpoint.engine import Engine, served_name
    from finetune_phi.endpoint.server import create_app

    name = args.served_model_name or served_name(args.model_uri)
    log.info("serving %s as %r on http://%s:%d (key %s)", args.model_uri, name, args.host, args.port, redact(key))
    server: uvicorn.Server | None = None

    def stop(_: BaseException) -> None:
        if server is not None:  # the load failed: exit non-zero rather than serve 503 forever
            server.should_exit = True

    if args.load_before_listen:
        try:
            engine = Engine.from_mlflow(args.model_uri, name)
        except Exception as exc:  # any load failure ends this process; the deployer shows this log
            log.error("could not load %s: %s", args.model_uri, exc, exc_info=exc)
            log.error("not serving: could not load %s (%s)", args.model_uri, exc)
            return EXIT_LOAD_FAILED
        app = create_app(key, engine=engine, model_name=name)
    else:
        app = create_app(key, loader=lambda: Engine.from_mlflow(args.model_uri, name), model_name=name, on_load_error=stop)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # keep the format set above
        timeout_graceful_shutdown=30,  # let an in-flight generation finish on SIGTERM (local_deploy waits 40 s)
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return EXIT_LOAD_FAILED if app.state.runtime.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
