"""The two flows on Microsoft Agent Framework, from a terminal (in their own venv, `make agent-framework`).

    .venv-maf/bin/python -m maf_flows ask "Who founded Microsoft?"   # the standard flow: {"answer": "..."}
    .venv-maf/bin/python -m maf_flows chat                           # the chat flow, streamed (make chat-maf)

The endpoint comes from AZURE_ML_ENDPOINT / AZURE_ML_API_KEY / AZURE_ML_ENDPOINT_KIND in the environment
or the .env python deploy_model.py wrote (ENV_FILE moves it), as the standard Prompt flow reads it.
Exit status 1 with one line on stderr when the endpoint cannot answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from maf_flows import workflows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maf_flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="one question, one answer (the standard flow), as JSON")
    ask.add_argument("input_data", help="the question")
    commands.add_parser("chat", help="a conversation in the terminal (the chat flow); the reply streams")
    return parser


async def chat_loop(endpoint: Any, stdin: TextIO, stdout: TextIO) -> None:
    """`User: ` prompts until end of input (or an empty line twice), each reply printed as it streams."""
    history: list[dict[str, Any]] = []
    blank = 0
    while True:
        stdout.write("User: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        question = line.strip()
        if not question:
            blank += 1
            if blank == 2:
                return
            continue
        blank = 0
        stdout.write("Bot: ")
        stdout.flush()
        pieces = []
        async for piece in workflows.chat_stream(endpoint, question, history):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"inputs": {"question": question}, "outputs": {"answer": "".join(pieces)}})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        endpoint = workflows.load_endpoint()
        if args.command == "ask":
            print(json.dumps(workflows.answer(endpoint, args.input_data), ensure_ascii=False, indent=4))
        else:
            asyncio.run(chat_loop(endpoint, sys.stdin, sys.stdout))
    except workflows.FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
