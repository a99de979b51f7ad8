"""The chat flow's one tool: the conversation so far plus the new question, sent to the endpoint.

    pf flow test --flow chat_flow --interactive
    pf flow test --flow chat_flow --ui                 # the chat page shows the reply as it streams
    pf flow serve --source chat_flow --port 8080       # Accept: text/event-stream streams the answer
    pf run create --flow chat_flow --data chat_flow/data.jsonl --stream \
        --column-mapping question='${data.question}' chat_history='${data.chat_history}'

The endpoint, its key and its kind (local, azure-mlflow, azure-catalog or azure-serverless) come from the Prompt flow
CustomConnection named in flow.dag.yaml (phi3_endpoint: configs.endpoint, configs.kind, secrets.key),
which python deploy_model.py creates; the whole history goes to the endpoint on every turn, in the
request shape of that kind. The tool yields the reply as it arrives (a generator: Prompt flow streams
it where the caller asks for an event stream and joins it everywhere else); the local and serverless
kinds stream, Azure's managed online deployments yield their reply whole. This folder is self-contained (the tool,
endpoint_client.py and requirements.txt), so it runs unchanged on an Azure Prompt flow runtime. The
HTTP work lives in endpoint_client.py; this wrapper is the only Prompt flow code.
"""

# No `from __future__ import annotations`: Prompt flow reads the real annotation objects to
# tell connection inputs apart; as strings, the connection arrives as its name.
from typing import Iterator

from promptflow.connections import CustomConnection
from promptflow.core import tool

# This folder is on sys.path when Prompt flow runs the flow (locally and on an Azure runtime).
from endpoint_client import chat_stream, endpoint_from_connection, messages_from_history


@tool
def chat_with_endpoint(question: str, chat_history: list, connection: CustomConnection) -> Iterator[str]:
    endpoint = endpoint_from_connection(connection.configs, connection.secrets)
    yield from chat_stream(endpoint.url, endpoint.key, messages_from_history(chat_history, question),
                           **endpoint.options())
