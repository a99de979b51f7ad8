"""The deployment kinds the flows answer, and settings made by hand (the tutorials' way: only an endpoint and a key).

Real HTTP servers on 127.0.0.1: a stand-in of a serverless endpoint's chat route (OpenAI chat
completions, streamed or not), of a catalog deployment's /score, and a /score that answers like our
MLflow model. What the stand-ins cannot show is in their docstrings (tests/catalog_standin.py).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

import config
from catalog_standin import CatalogStandIn, Exchange, RecordingServer, ServerlessStandIn
from chat_flow import endpoint_client as ec

KEY = "serverless-key-0123456789abcdef"
HISTORY = [
    {"role": "user", "content": "Who founded Microsoft?"},
    {"role": "assistant", "content": "Bill Gates and Paul Allen."},
    {"role": "user", "content": "Where?"},
]


class MlflowScore(RecordingServer):
    """A /score that answers as Azure's MLflow scoring of our model: a list of strings for
    {"input_data": [prompt], "params"}, a 500 for anything else (what azmlinfsrv answers the catalog shape)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def handle(self, raw: bytes, headers: Any) -> tuple[Exchange, bytes]:
        body = json.loads(raw or b"null")
        ok = isinstance(body, dict) and isinstance(body.get("input_data"), list)
        status, answer = (200, [f"mlflow reply to {len(body['input_data'])} prompt"]) if ok else \
            (500, {"message": "An unexpected error occurred in scoring script."})  # fmt: skip
        return Exchange(body, headers.get("Authorization", ""), status, answer), json.dumps(answer).encode()


@pytest.fixture()
def serverless() -> Iterator[ServerlessStandIn]:
    server = ServerlessStandIn(KEY).start()
    yield server
    server.stop()


@pytest.fixture()
def catalog() -> Iterator[CatalogStandIn]:
    server = CatalogStandIn(KEY).start()
    yield server
    server.stop()


@pytest.fixture()
def mlflow_score() -> Iterator[MlflowScore]:
    server = MlflowScore(KEY).start()
    yield server
    server.stop()


def base_uri(server: RecordingServer) -> str:
    """The URI Azure reports for a serverless endpoint: its host, no route."""
    return server.url.removesuffix("/score")


# --- the serverless kind ----------------------------------------------------------------------------------


def test_serverless_chat_posts_openai_messages_to_the_v1_route_under_the_uri(serverless: ServerlessStandIn) -> None:
    reply = ec.chat(base_uri(serverless), KEY, HISTORY, kind="azure-serverless", params={"max_new_tokens": 40})
    assert reply == "Serverless reply 2 to: Where?"
    (sent,) = serverless.exchanges
    assert sent.status == 200 and sent.authorization == f"Bearer {KEY}"
    assert sent.request["messages"] == HISTORY  # the history as role messages, not one flattened prompt
    assert sent.request["max_tokens"] == 40 and sent.request["temperature"] == 0.0
    assert "input_data" not in sent.request and "stream" not in sent.request


def test_serverless_chat_stream_yields_the_events_pieces(serverless: ServerlessStandIn) -> None:
    pieces = list(ec.chat_stream(base_uri(serverless), KEY, HISTORY, kind="azure-serverless"))
    assert len(pieces) > 3 and "".join(pieces) == ec.chat(base_uri(serverless), KEY, HISTORY, kind="azure-serverless")
    assert serverless.exchanges[0].request["stream"] is True


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/chat/completions"])
def test_serverless_uri_with_or_without_the_route(serverless: ServerlessStandIn, suffix: str) -> None:
    assert ec.ask(base_uri(serverless) + suffix, KEY, "hi", kind="azure-serverless") == "Serverless reply 1 to: hi"
    assert ec.openai_url(base_uri(serverless) + suffix).endswith(":%d/v1/chat/completions" % serverless.httpd.server_port)


def test_serverless_wrong_key_says_so(serverless: ServerlessStandIn) -> None:
    with pytest.raises(ec.EndpointError, match="rejected the key") as err:
        ec.ask(base_uri(serverless), "wrong", "hi", kind="azure-serverless")
    assert "wrong" not in str(err.value)


# --- what a URL tells ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "from_env", "from_connection"), [
    ("https://phi-4-mini-ft-abcd.eastus2.models.ai.azure.com", "azure-serverless", "azure-serverless"),
    ("https://phi-4-mini-ft-abcd.eastus2.models.ai.azure.com/v1/chat/completions", "azure-serverless",
     "azure-serverless"),
    ("http://127.0.0.1:8000/v1", "azure-serverless", "azure-serverless"),
    ("http://127.0.0.1:5001/score", "local", "local"),
    ("http://localhost:5001/score", "local", "local"),
    # A managed online endpoint: the URL cannot tell an MLflow model from a catalog model, so each
    # tutorial's own shape: the SDK tutorial's .env sends the MLflow shape, the Studio tutorial's connection the catalog's.
    ("https://my-endpoint.eastus2.inference.ml.azure.com/score", "azure-mlflow", "azure-catalog"),
])  # fmt: skip
def test_guess_kind_from_the_url(url: str, from_env: str, from_connection: str) -> None:
    assert ec.guess_kind(url) == from_env
    assert ec.guess_kind(url, ec.CONNECTION_KIND) == from_connection
    assert from_env in config.ENDPOINT_KINDS and from_connection in config.ENDPOINT_KINDS


def test_a_recorded_kind_is_never_second_guessed(serverless: ServerlessStandIn) -> None:
    endpoint = ec.endpoint_from_connection({"endpoint": "https://x.eastus2.models.ai.azure.com", "kind": "azure-catalog"},
                                           {"key": KEY})  # fmt: skip
    assert (endpoint.kind, endpoint.guessed_from) == ("azure-catalog", "")


# --- a connection or .env with only an endpoint and a key ---------------------------------------------------------


def test_connection_with_only_endpoint_and_key_to_a_serverless_endpoint_answers_and_streams(
    serverless: ServerlessStandIn,
) -> None:
    endpoint = ec.endpoint_from_connection({"endpoint": base_uri(serverless)}, {"key": KEY})
    assert endpoint.kind == "azure-serverless"
    assert ec.ask(endpoint.url, endpoint.key, "Who founded Microsoft?", **endpoint.options()) == \
        "Serverless reply 1 to: Who founded Microsoft?"  # fmt: skip
    assert len(list(ec.chat_stream(endpoint.url, endpoint.key, HISTORY, **endpoint.options()))) > 1


def test_env_with_only_endpoint_and_key_to_the_local_endpoint_gets_its_shape(mlflow_score: MlflowScore) -> None:
    endpoint = ec.endpoint_from_environment({"AZURE_ML_ENDPOINT": mlflow_score.url, "AZURE_ML_API_KEY": KEY}, folders=[])
    assert ec.ask(endpoint.url, endpoint.key, "hi", **endpoint.options()) == "mlflow reply to 1 prompt"


def test_a_guessed_shape_the_endpoint_refuses_is_one_line_naming_kind_and_its_values(
    catalog: CatalogStandIn, mlflow_score: MlflowScore,
) -> None:
    # A catalog deployment on this machine, named by a connection without a kind: the URL says
    # "local", the catalog scoring refuses our model's shape.
    endpoint = ec.endpoint_from_connection({"endpoint": catalog.url}, {"key": KEY})
    with pytest.raises(ec.EndpointError) as err:
        ec.ask(endpoint.url, endpoint.key, "hi", **endpoint.options())
    message = str(err.value)
    assert "\n" not in message and "HTTP 400" in message and "the local request" in message
    assert f"set {ec.CONNECTION_KIND} to one of local" in message
    for kind in config.ENDPOINT_KINDS:
        assert kind in message
    assert [e.status for e in catalog.exchanges] == [400]  # one request: no other shape tried behind the user's back
    # Set, it answers.
    fixed = ec.endpoint_from_connection({"endpoint": catalog.url, "kind": "azure-catalog"}, {"key": KEY})
    assert ec.ask(fixed.url, fixed.key, "hi", **fixed.options()) == " Catalog reply 1 to: hi"
    # The catalog shape sent to our MLflow model (Azure answers it with a 500): the same one line.
    wrong = ec.Endpoint(mlflow_score.url, KEY, "azure-catalog", guessed_from=ec.KIND_VARIABLE)
    with pytest.raises(ec.EndpointError, match=r"HTTP 500.*azure-catalog request.*set AZURE_ML_ENDPOINT_KIND to one of"):
        ec.chat(wrong.url, wrong.key, HISTORY, **wrong.options())


def test_a_guess_never_hides_a_wrong_key_or_a_busy_endpoint(serverless: ServerlessStandIn) -> None:
    endpoint = ec.endpoint_from_connection({"endpoint": base_uri(serverless)}, {"key": "not-the-key"})
    with pytest.raises(ec.EndpointError, match="rejected the key") as err:
        ec.ask(endpoint.url, endpoint.key, "hi", **endpoint.options())
    assert ec.CONNECTION_KIND not in str(err.value)


def test_a_serverless_endpoint_named_as_local_by_hand_gets_the_kind_line_in_the_stream(serverless: ServerlessStandIn) -> None:
    # A serverless endpoint has no /score: the MLflow shape to it is a 404, reported as the kind's problem.
    wrong = ec.Endpoint(base_uri(serverless) + "/score", KEY, "azure-mlflow", guessed_from=ec.KIND_VARIABLE)
    with pytest.raises(ec.EndpointError, match="HTTP 404.*azure-mlflow request"):
        list(ec.chat_stream(wrong.url, wrong.key, HISTORY, **wrong.options()))


def test_the_kind_help_names_every_kind() -> None:
    assert ec.KINDS == config.ENDPOINT_KINDS
    for kind in ec.KINDS:
        assert f"{kind} (" in ec.KIND_HELP
