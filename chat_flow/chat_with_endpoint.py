"""The chat flow's one tool: the conversation so far plus the new question, sent to the endpoint.

The endpoint and key come from the Prompt flow CustomConnection named in flow.dag.yaml
(phi3_endpoint; python deploy_model.py creates it). The HTTP work lives in
finetune_phi.endpoint_client; this wrapper is the only Prompt flow code.
"""

# No `from __future__ import annotations`: Prompt flow reads the real annotation objects to
# tell connection inputs apart; as strings, the connection arrives as its name.
from promptflow.connections import CustomConnection
from promptflow.core import tool

from finetune_phi.endpoint_client import EndpointError, chat, messages_from_history


@tool
def chat_with_endpoint(question: str, chat_history: list, connection: CustomConnection) -> str:
    endpoint = str(connection.configs["endpoint"]) if "endpoint" in connection.configs else ""
    key = str(connection.secrets["key"]) if "key" in connection.secrets else ""
    if not endpoint or not key:
        raise EndpointError(
            "the Prompt flow connection lacks configs.endpoint or secrets.key; run python deploy_model.py first"
        )
    return chat(endpoint, key, messages_from_history(chat_history, question))
