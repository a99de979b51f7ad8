"""Run the local endpoint in the foreground.

    FINETUNE_PHI_ENDPOINT_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \
        python -m finetune_phi.endpoint --model-uri models:/finetune-phi3-model/1 --host 127.0.0.1 --port 5001

MLFLOW_TRACKING_URI must point at the registry holding the model. The socket is bound with
SO_REUSEPORT so that a new version can start on the same port while the old one still serves;
with --load-before-listen it accepts connections only once the model is loaded, so such a
hand-over never routes a request to a server that would answer 503. Once it listens, it steers
every new connection of the port to itself (Linux: a one-instruction reuseport BPF program), so
the old server's accept queue only drains and closing it resets nobody.

Bound to anything but a loopback address it logs a warning: the key is then all that stands
between the model and the network. SIGTERM (or Ctrl-C) stops accepting connections, lets the
requests in flight finish for up to --graceful-shutdown-s seconds, then exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, Iterator

from finetune_phi.endpoint import KEY_ENV
from finetune_phi.endpoint.caps import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_STEP_TOKENS, BatchCaps
from finetune_phi.endpoint.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_REQUEST_TIMEOUT_S
from finetune_phi.endpoint.loading import DTYPES, LoadPolicy, NotEnoughMemory, valid_device

if TYPE_CHECKING:
    import uvicorn

    from finetune_phi.endpoint.engine import Engine

log = logging.getLogger("finetune_phi.endpoint")

EXIT_LOAD_FAILED = 1
EXIT_USAGE = 2
EXIT_PORT_BUSY = 3

DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0  # local_deploy waits 40 s after SIGTERM before it sends SIGKILL


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


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
    limits = parser.add_argument_group("limits (what an Azure deployment's request_settings set)")
    limits.add_argument(
        "--max-concurrent-requests",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        help="generation requests served at once; more are answered 429 with Retry-After (default: %(default)s)",
    )
    limits.add_argument(
        "--request-timeout-s",
        type=_positive_float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="a request running longer is answered 408 and its generation cancelled (default: %(default)s)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413 before they are read (default: %(default)s)",
    )
    limits.add_argument(
        "--graceful-shutdown-s",
        type=_positive_float,
        default=DEFAULT_GRACEFUL_SHUTDOWN_S,
        help="on SIGTERM, how long requests in flight may still run (default: %(default)s)",
    )
    load = parser.add_argument_group("load policy (finetune_phi/endpoint/loading.py)")
    load.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype: auto = bfloat16 on CUDA; on a CPU float32 unless it has native bf16 and the "
        "weights were saved in 16 bits (default: %(default)s; ENDPOINT_DTYPE)",
    )
    load.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s; ENDPOINT_DEVICE)")
    load.add_argument(
        "--max-context-tokens",
        type=_non_negative_int,
        default=0,
        help="prompt + new tokens per conversation; 0 = the model's context (default: %(default)s; ENDPOINT_MAX_CONTEXT_TOKENS)",
    )
    load.add_argument(
        "--memory-budget-mb",
        type=_non_negative_int,
        default=0,
        help="memory the model may use (weights + KV cache for --max-concurrent-requests full contexts); "
        "0 = what is free on the device (default: %(default)s; ENDPOINT_MEMORY_BUDGET_MB)",
    )
    load.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        help="prompt + new tokens all running rows may hold in KV cache at once (default: the batcher's, "
        "16384; ENDPOINT_MAX_BATCH_TOKENS)",
    )
    load.add_argument(
        "--max-step-tokens",
        type=_positive_int,
        help="tokens of one packed forward; longer prefills are chunked (default: the batcher's, 1024; "
        "ENDPOINT_MAX_STEP_TOKENS)",
    )
    load.add_argument(
        "--packed-weights", choices=("auto", "on", "off"),
        # The one variable read here rather than passed as a flag: a benchmark's switch, not a setting.
        default={"1": "on", "0": "off"}.get(os.environ.get("ENDPOINT_PACKED_WEIGHTS", "").strip(), "auto"),
        help="prepacked oneDNN weights for the decoder's linears on CPU; auto decides from the model "
        "(default: %(default)s; ENDPOINT_PACKED_WEIGHTS=1/0)",
    )  # fmt: skip
    load.add_argument(
        "--no-memory-check", action="store_true", help="start even when the estimate says the model does not fit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def load_policy(args: argparse.Namespace) -> LoadPolicy:
    return LoadPolicy(
        dtype=args.dtype,
        device=args.device,
        max_concurrent_requests=args.max_concurrent_requests,
        max_context_tokens=args.max_context_tokens,
        memory_budget_mb=args.memory_budget_mb,
        check_memory=not args.no_memory_check,
        max_batch_tokens=args.max_batch_tokens or 0,
    )


def batch_caps(args: argparse.Namespace) -> BatchCaps:
    """The batcher's caps, once, from the flags (unset: caps.py's defaults)."""
    packed = {"on": True, "off": False}.get(args.packed_weights)
    return BatchCaps(max_step_tokens=args.max_step_tokens or DEFAULT_MAX_STEP_TOKENS,
                     max_batch_tokens=args.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, packed_weights=packed)  # fmt: skip


def load_engine(args: argparse.Namespace, name: str) -> "Engine":
    """The engine under the load policy, warmed up by one short generate that also checks the timeout."""
    from finetune_phi.endpoint.engine import Engine, check_decode_speed

    engine = Engine.from_mlflow(args.model_uri, name, policy=load_policy(args))
    check_decode_speed(engine, args.request_timeout_s)
    return engine


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(host: str) -> bool:
    """Log a warning when `host` is reachable from other machines; True if it is."""
    if is_loopback(host):
        return False
    log.warning(
        "binding %s: the endpoint is reachable from other machines, guarded only by its key "
        "(use --host 127.0.0.1 to keep it on this machine)",
        host,
    )
    return True


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that a second server may share during a hand-over."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # Nagle's algorithm meets the client's delayed ACK and every response stalls ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# Linux's SO_ATTACH_REUSEPORT_CBPF (include/uapi/asm-generic/socket.h); Python names it only on some builds.
SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
BPF_RET_K = 0x06  # classic BPF: return the constant k
LISTEN_BACKLOG = 2048  # uvicorn's default; asyncio listens again with it, which only resets the backlog
# A port's SO_REUSEPORT group lists its listeners in the order they started listening: during a
# hand-over the old endpoint is 0 and the new one 1 (local_deploy stops any stray before it starts a
# new one). Alone, index 1 does not exist and the kernel falls back to its usual hash: one listener.
NEWEST_LISTENER = 1


def steer_new_connections(sock: socket.socket, index: int = NEWEST_LISTENER) -> bool:
    """Make the port's reuseport group hand every new connection to listener `index`; False if unsupported.

    Without it the kernel spreads connections over the old and the new server by a hash of the
    client's address, and those waiting in the old server's accept queue when it closes its socket
    are reset (ConnectionResetError for the client). With it, the old server receives nothing new
    from the moment the new one listens, so by the time it is stopped its queue is empty.
    Classic BPF on a socket needs no privilege; the program belongs to the group, not this socket.
    """
    if not sys.platform.startswith("linux"):
        return False
    insn = ctypes.create_string_buffer(struct.pack("HBBI", BPF_RET_K, 0, 0, index))  # struct sock_filter
    fprog = struct.pack("HP", 1, ctypes.addressof(insn))  # struct sock_fprog {len; *filter}, native alignment
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:  # an old or locked-down kernel: hand-overs then may reset queued connections
        log.warning("cannot steer new connections to this server (%s): a hand-over may reset a few", exc)
        return False
    return True


def graceful_server(app: Any, **config: Any) -> "uvicorn.Server":
    """A uvicorn server that exits 0 after a graceful stop.

    uvicorn re-raises the SIGTERM it handled once it has drained, so the process would die of the
    signal (-15) even after a clean stop; a supervisor should see a clean stop as exit 0."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return GracefulServer(uvicorn.Config(app, **config))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Old and new servers append to one log during a hand-over: the pid tells their lines apart.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warn_if_exposed(args.host)
    if not valid_device(args.device):
        log.error("--device %s: use auto, cpu, cuda or cuda:N", args.device)
        return EXIT_USAGE
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

    from finetune_phi.common import redact
    from finetune_phi.endpoint.engine import served_name
    from finetune_phi.endpoint.server import create_app

    name = args.served_model_name or served_name(args.model_uri)
    log.info("serving %s as %r on http://%s:%d (key %s)", args.model_uri, name, args.host, args.port, redact(key))
    server: uvicorn.Server | None = None

    def stop(_: BaseException) -> None:
        if server is not None:  # the load failed: exit non-zero rather than serve 503 forever
            server.should_exit = True

    limits: dict[str, Any] = {
        "max_concurrent_requests": args.max_concurrent_requests,
        "request_timeout_s": args.request_timeout_s,
        "max_body_bytes": args.max_body_bytes,
        "batch_caps": batch_caps(args),
    }
    if args.load_before_listen:
        try:
            engine = load_engine(args, name)
        except NotEnoughMemory as exc:  # the message says what to change: no traceback
            log.error("%s", exc)
            return EXIT_LOAD_FAILED
        except Exception as exc:  # any load failure ends this process; the deployer shows this log
            log.error("could not load %s: %s", args.model_uri, exc, exc_info=exc)
            log.error("not serving: could not load %s (%s)", args.model_uri, exc)
            return EXIT_LOAD_FAILED
        app = create_app(key, engine=engine, model_name=name, **limits)
    else:
        app = create_app(
            key, loader=lambda: load_engine(args, name), model_name=name, on_load_error=stop, **limits
        )
    log.info(
        "limits: %d requests in flight, %g s per request, %d-byte bodies; %g s to finish on SIGTERM",
        args.max_concurrent_requests,
        args.request_timeout_s,
        args.max_body_bytes,
        args.graceful_shutdown_s,
    )
    server = graceful_server(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # keep the format set above
        timeout_graceful_shutdown=args.graceful_shutdown_s,
    )
    sock.listen(LISTEN_BACKLOG)
    steer_new_connections(sock)
    server.run(sockets=[sock])
    return EXIT_LOAD_FAILED if app.state.runtime.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
