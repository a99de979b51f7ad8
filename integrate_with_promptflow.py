"""Step 5: the Prompt flow tool of the standard flow (flow.dag.yml): one question in, the model's reply out.

    pf flow test --flow . --inputs input_data="Who founded Microsoft?"
    pf flow serve --source . --port 8080 --host 127.0.0.1          # then POST {"input_data": "..."} to /score
    pf run create --flow . --data data/test_data.jsonl --column-mapping input_data='${data.prompt}' --stream

Run `eval "$(python -m finetune_phi.pf_env)"` first so that pf uses this project's Prompt flow home
(offline, with the connection deploy_model.py created); see chat_flow/ for the chat version.

Where the endpoint comes from:
  * SDK variant (default): AZURE_ML_ENDPOINT and AZURE_ML_API_KEY from the environment or .env,
    both written by `python deploy_model.py`;
  * Studio variant: pass a CustomConnection with configs.endpoint and secrets.key as `connection`.

The HTTP work lives in finetune_phi.endpoint_client; this wrapper is the only Prompt flow code.
"""

# No `from __future__ import annotations`: Prompt flow reads the real annotation objects to
# tell connection inputs apart; as strings, the connection arrives as its name.
from typing import Optional

from promptflow.connections import CustomConnection
from promptflow.core import tool

import config
from finetune_phi.endpoint_client import EndpointError, ask


def endpoint_and_key(connection: Optional[CustomConnection] = None) -> tuple[str, str]:
    """The scoring URI and key: from the connection when given, else from the environment / .env."""
    if connection is not None:
        endpoint = str(connection.configs["endpoint"]) if "endpoint" in connection.configs else ""
        key = str(connection.secrets["key"]) if "key" in connection.secrets else ""
        if not endpoint or not key:
            raise EndpointError(
                "the Prompt flow connection lacks configs.endpoint or secrets.key; run python deploy_model.py first"
            )
        return endpoint, key
    settings = config.load()
    return settings.AZURE_ML_ENDPOINT, settings.AZURE_ML_API_KEY


@tool
def integrate_with_promptflow(input_data: str, connection: Optional[CustomConnection] = None) -> str:
    endpoint, key = endpoint_and_key(connection)
    return ask(endpoint, key, input_data)
