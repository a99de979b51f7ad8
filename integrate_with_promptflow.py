"""Step 5: the Prompt flow tool of the standard flow (flow.dag.yml): one question in, the model's reply out.

    pf flow test --flow . --inputs input_data="Who founded Microsoft?"
    pf flow serve --source . --port 8080 --host 127.0.0.1          # then POST {"input_data": "..."} to /score
    pf run create --flow . --data data/test_data.jsonl --column-mapping input_data='${data.prompt}' --stream
    pf flow validate --source .

Run `eval "$(python -m finetune_phi.pf_env)"` first so that pf uses this project's Prompt flow home
(offline, with the connection deploy_model.py created) and finds the .env (it exports ENV_FILE);
see chat_flow/ for the chat version, and chat_flow/README.md for running either on Azure.

Where the endpoint comes from:
  * SDK variant (default): AZURE_ML_ENDPOINT, AZURE_ML_API_KEY and AZURE_ML_ENDPOINT_KIND from the
    environment, else from the .env python deploy_model.py wrote: ENV_FILE when set, else `.env` in
    the working directory or beside this file. A batch run works in a snapshot without the .env
    (.amlignore keeps it out), hence ENV_FILE.
  * Studio variant: pass a CustomConnection (configs.endpoint, configs.kind, secrets.key) as `connection`.

The flow's snapshot is the repository minus .amlignore: this file, flow.dag.yml, chat_flow/ (whose
endpoint_client.py does the HTTP work and whose requirements.txt this flow uses too) and
finetuning_dir/chat_format.py (the Phi-3 chat format endpoint_client.py loads), but not finetune_phi/
or config.py. So nothing here imports them, and the flow runs unchanged on an Azure Prompt flow
runtime, where it reads the connection or the runtime's environment variables. (No
additional_includes here, unlike chat_flow/: pf would copy this whole folder, virtual environments
included, into a temporary one on every run.)
"""

# No `from __future__ import annotations`: Prompt flow reads the real annotation objects to
# tell connection inputs apart; as strings, the connection arrives as its name.
from pathlib import Path
from typing import Optional

from promptflow.connections import CustomConnection
from promptflow.core import tool

from chat_flow.endpoint_client import Endpoint, ask, endpoint_from_connection, endpoint_from_environment


def find_endpoint(connection: Optional[CustomConnection] = None) -> Endpoint:
    """The endpoint from the connection when given, else from the environment / .env."""
    if connection is not None:
        return endpoint_from_connection(connection.configs, connection.secrets)
    return endpoint_from_environment(folders=[Path.cwd(), Path(__file__).resolve().parent])


@tool
def integrate_with_promptflow(input_data: str, connection: Optional[CustomConnection] = None) -> str:
    endpoint = find_endpoint(connection)
    return ask(endpoint.url, endpoint.key, input_data, **endpoint.options())
