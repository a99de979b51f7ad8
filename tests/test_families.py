"""Model families beside Phi-3: the chat format comes from the tokenizer's own template.

Phi-4-mini-instruct has Phi-3's role tokens and <|end|> but its own template (no newlines), one token
(<|endoftext|>) for BOS, EOS, pad and unk, and trl ships no `{% generation %}` twin of its template for
assistant-only loss. The tiny Phi-4-mini here has Phi-4-mini's attention layout (grouped-query
attention, partial rotary, LongRoPE, tied embeddings) and its real tokenizer where testkit.fixtures
finds it (`make fixtures` fetches it from a public copy, pinned by hash); elsewhere the project's
stand-in vocabulary dressed in Phi-4-mini's published special tokens, flags and template
(helpers_model.stand_in_phi4_mini_tokenizer_dir, checked against the real tokenizer_config.json here
when it resolves).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import config
from finetune_phi.training import job_module
from helpers_endpoint import AUTH, KEY, ThreadServer
from conftest import require
from helpers_model import PHI4_MINI_ADDED_TOKENS, PHI4_MINI_ROLES, phi4_mini_tokenizer_dir, stand_in_tokenizer_dir
from testkit import fixtures
from helpers_pf import flow_answers, pipeline_env, run
from test_azure_serving import azmlinfsrv, azureml_python  # noqa: F401 (azureml_python: a fixture)

chat_format = job_module("chat_format")
PF = str(Path(sys.executable).parent / "pf")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
     {"role": "assistant", "content": "D"}],
]  # fmt: skip


def tokenizer_with(template: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stand_in_tokenizer_dir())
    tokenizer.chat_template = template
    return tokenizer


def test_phi3s_prompt_template_is_its_tokenizers_rendering_of_one_user_turn(phi3_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert chat_format.prompt_template(AutoTokenizer.from_pretrained(phi3_tokenizer_dir)) == chat_format.PROMPT_TEMPLATE


def test_the_prompt_template_is_the_tokenizers_own_rendering_of_one_user_turn() -> None:
    assert chat_format.prompt_template(tokenizer_with(chat_format.PHI3_CHAT_TEMPLATE)) == chat_format.PROMPT_TEMPLATE
    phi4 = tokenizer_with(chat_format.PHI4_MINI_CHAT_TEMPLATE)
    assert chat_format.prompt_template(phi4) == "<|user|>{prompt}<|end|><|assistant|>"
    with pytest.raises(ValueError, match="does not render a user message's content once"):
        chat_format.prompt_template(tokenizer_with("{{ 'no content here' }}"))


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_the_phi4_training_twin_renders_the_published_text_and_masks_only_assistant_turns(generation_prompt: bool) -> None:
    from trl.chat_template_utils import get_training_chat_template

    published, twin = tokenizer_with(chat_format.PHI4_MINI_CHAT_TEMPLATE), tokenizer_with(chat_format.PHI4_MINI_TRAINING_TEMPLATE)
    for conversation in CONVERSATIONS:
        assert twin.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt) == \
            published.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)  # fmt: skip
    assert chat_format.training_template(published) == chat_format.PHI4_MINI_TRAINING_TEMPLATE
    assert chat_format.published_template(chat_format.PHI4_MINI_TRAINING_TEMPLATE) == chat_format.PHI4_MINI_CHAT_TEMPLATE
    assert get_training_chat_template(twin) is None  # trl takes it as it is
    encoded = twin.apply_chat_template(CONVERSATIONS[2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    learned = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    # The assistant's words, its ends of turn and the closing EOS, nothing else: what trl's Phi-3 twins mark.
    assert twin.decode(learned) == "B<|end|>D<|end|><|endoftext|>"


def published_template(name: str) -> str:
    """A family's published chat template: ours where we keep a copy, else trl's byte-exact one."""
    if name == "phi3_5":  # trl recognises Phi-3.5-mini-instruct's template by identity, so it holds it verbatim
        from trl.chat_template_utils import phi3_5_chat_template

        return str(phi3_5_chat_template)
    return str(getattr(chat_format, name))


@pytest.mark.parametrize("family, template", [("phi3", "PHI3_CHAT_TEMPLATE"), ("phi3", "phi3_5"),
                                              ("phi4-mini", "PHI4_MINI_CHAT_TEMPLATE")])  # fmt: skip
def test_a_conversation_as_one_prompt_is_the_familys_own_rendering(family: str, template: str) -> None:
    tokenizer = tokenizer_with(published_template(template))
    wrapper = chat_format.prompt_template(tokenizer)
    assert chat_format.turn_format_of(wrapper) == family
    for conversation in CONVERSATIONS:
        asked = [*conversation, {"role": "user", "content": "And?"}] if conversation[-1]["role"] == "assistant" else conversation
        expected = tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=False)
        if asked[0]["role"] == "system":  # folded into the first user turn (the wrapper opens with it)
            folded = [{"role": "user", "content": f"{asked[0]['content']}\n\n{asked[1]['content']}"}, *asked[2:]]
            expected = tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=False)
        assert wrapper.format(prompt=chat_format.encode_prompt(asked, family)) == expected
    with pytest.raises(ValueError, match="none of the supported Phi families"):
        chat_format.turn_format_of("### User: {prompt}\n### Assistant:")
    assert chat_format.turn_format_of_model_id("microsoft/Phi-4-mini-instruct") == "phi4-mini"
    assert chat_format.turn_format_of_model_id("microsoft/Phi-3.5-mini-instruct") == "phi3"


def test_phi35_minis_template_trains_on_trls_twin_and_packages_phi3s_prompt() -> None:
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = tokenizer_with(published_template("phi3_5"))
    assert tokenizer.chat_template != chat_format.PHI3_CHAT_TEMPLATE  # its own template, not Phi-3's
    assert chat_format.prompt_template(tokenizer) == chat_format.PROMPT_TEMPLATE
    assert chat_format.training_template(tokenizer) is None  # trl has the twin: we add none
    twin = tokenizer_with(get_training_chat_template(tokenizer))
    for conversation in CONVERSATIONS:
        assert twin.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(conversation, tokenize=False)
    encoded = twin.apply_chat_template(CONVERSATIONS[2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    learned = twin.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])
    assert learned == "B<|end|>\nD<|end|>\n<|endoftext|>"  # the assistant's turns and the closing EOS only


def test_the_client_reads_the_family_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    from chat_flow.endpoint_client import EndpointError, endpoint_from_environment, request_body

    env = {"AZURE_ML_ENDPOINT": "http://127.0.0.1:1/score", "AZURE_ML_API_KEY": "k" * 32}
    assert endpoint_from_environment({**env, "ENV_FILE": str(tmp_path / "none")}).chat_format == "phi3"  # an older .env
    assert endpoint_from_environment({**env, "AZURE_ML_CHAT_FORMAT": "phi4-mini"}).chat_format == "phi4-mini"
    with pytest.raises(EndpointError, match="AZURE_ML_CHAT_FORMAT='phi5'"):
        endpoint_from_environment({**env, "AZURE_ML_CHAT_FORMAT": "phi5"})
    turns = CONVERSATIONS[2] + [{"role": "user", "content": "E"}]
    assert request_body("azure-mlflow", turns, None, "phi4-mini")["input_data"] == ["A<|end|><|assistant|>B<|end|><|user|>C<|end|><|assistant|>D<|end|><|user|>E"]


def test_the_phi4_mini_stand_in_wears_the_published_special_tokens_flags_and_template() -> None:
    published = json.loads((require(fixtures.phi4_mini_tokenizer_dir) / "tokenizer_config.json").read_text())
    assert published["chat_template"] == chat_format.PHI4_MINI_CHAT_TEMPLATE
    flags = tuple((t["content"], t["rstrip"], t["special"]) for _, t in sorted(published["added_tokens_decoder"].items(),
                                                                             key=lambda item: int(item[0])))  # fmt: skip
    assert flags == PHI4_MINI_ADDED_TOKENS
    assert {name: published[name] for name in PHI4_MINI_ROLES} == PHI4_MINI_ROLES


def test_phi4_minis_tokenizer_stops_at_end_and_eos_although_eos_is_also_its_unknown_token() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi4_mini_tokenizer_dir())
    assert tokenizer.unk_token == tokenizer.eos_token == tokenizer.pad_token == chat_format.EOS
    end, eos = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN), tokenizer.eos_token_id
    assert chat_format.stop_token_ids(tokenizer) == [end, eos]
    assert chat_format.prompt_template(tokenizer) == "<|user|>{prompt}<|end|><|assistant|>"
    assert chat_format.pad_token(tokenizer) is None  # pad is EOS: training pads with a token of its own
    assert chat_format.padding_id(tokenizer) == eos  # generation pads with EOS behind the attention mask
    # Its role tokens strip the whitespace after them, as the published flags say: a reply written with a
    # leading space encodes as the one without it.
    spaced, plain = (tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
                                                   return_dict=True)["input_ids"] for reply in (" Yes.", "Yes."))  # fmt: skip
    assert spaced == plain
    # The control: a word that is not in the vocabulary still comes back as the unknown token's id.
    assert tokenizer.convert_tokens_to_ids("<|not-a-token|>") == tokenizer.unk_token_id


@pytest.fixture(scope="module")
def phi4_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of Phi-4-mini's layout and template, saved as a local folder (a user's download)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi4_mini_tokenizer_dir())
    end, eos = tokenizer.convert_tokens_to_ids(chat_format.END_OF_TURN), tokenizer.convert_tokens_to_ids(chat_format.EOS)
    rotary = int(16 * 0.75)
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True, max_position_embeddings=8192,
        original_max_position_embeddings=4096, rope_scaling={"rope_type": "longrope",
        "short_factor": [1.0] * (rotary // 2), "long_factor": [1.5] * (rotary // 2)},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=eos, eos_token_id=[eos, end],
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("phi4-tiny") / "Phi-4-mini-instruct-tiny"
    Phi3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)  # published in bf16, as Phi-4-mini is
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Chain:
    env: dict[str, str]
    settings: config.Settings
    model_dir: Path  # the MLflow model folder the fine-tune wrote (the one Azure's job registers)


@pytest.fixture(scope="module")
def phi4_chain(phi4_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """data -> setup_ml.py on the Phi-4-mini-shaped folder (LoRA, the CPU defaults), as a user runs them."""
    from finetune_phi.common import read_state

    env = pipeline_env(os.environ, tmp_path_factory.mktemp("phi4-chain"), LOCAL_BASE_MODEL=str(phi4_tiny))
    assert run([sys.executable, "download_dataset.py", "--source", "demo"], env).returncode == 0
    trained = run([sys.executable, "setup_ml.py"], env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    settings = config.load(env=env)
    return Chain(env, settings, Path(read_state(settings)["training"]["model_output_dir"]))


@pytest.mark.slow
def test_a_phi4_mini_shaped_model_goes_through_fine_tune_deploy_and_both_flows(phi4_chain: Chain) -> None:
    import yaml

    from finetune_phi.pf_env import subprocess_env

    env, settings, model_dir = phi4_chain.env, phi4_chain.settings, phi4_chain.model_dir
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["metadata"]["prompt_template"] == "<|user|>{prompt}<|end|><|assistant|>"  # Phi-4-mini's turn
    saved = json.loads((model_dir / "components" / "tokenizer" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (model_dir / "components" / "tokenizer" / "chat_template.jinja").read_text()
    assert template == chat_format.PHI4_MINI_CHAT_TEMPLATE  # the published one, not the training twin
    try:
        deployed = run([sys.executable, "deploy_model.py", "--force"], env)
        assert deployed.returncode == 0, deployed.stderr[-4000:]
        published = config.load(env={k: v for k, v in env.items() if not k.startswith("AZURE_ML_")})
        assert published.AZURE_ML_CHAT_FORMAT == "phi4-mini"  # recorded from the packaged model's prompt template
        # A conversation through /score, written in Phi-4-mini's format, gets the greedy reply the OpenAI route
        # gives the same messages (rendered by the tokenizer's own template): the two paths agree.
        from chat_flow.endpoint_client import chat, chat_stream

        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Who founded Microsoft?"}]  # fmt: skip
        url, key = published.AZURE_ML_ENDPOINT, published.AZURE_ML_API_KEY
        greedy = {"max_new_tokens": 12}
        by_score = chat(url, key, turns, kind="local", params=greedy, chat_format_name="phi4-mini")
        by_messages = "".join(chat_stream(url, key, turns, kind="local", params=greedy))
        assert by_score == by_messages
        answers = flow_answers(PF, subprocess_env(settings, env), {
            "standard": (".", "input_data=Who founded Microsoft?"),
            "chat": ("chat_flow", "question=Who founded Microsoft?"),
        })  # fmt: skip
        assert all(isinstance(answer, str) for answer in answers.values()), answers
    finally:
        run([sys.executable, "deploy_model.py", "--teardown"], env)


@pytest.mark.slow
def test_azures_scoring_stack_serves_the_phi4_mini_shaped_model_as_the_local_endpoint_does(
    phi4_chain: Chain, azureml_python: Path, tmp_path: Path
) -> None:
    from finetune_phi.endpoint.engine import Engine
    from finetune_phi.endpoint.loading import LoadPolicy
    from finetune_phi.endpoint.server import create_app

    # The SDK tutorial's request, greedy so that both must give the same words.
    body = {"input_data": ["Who founded Microsoft?"], "params": {"max_new_tokens": 8, "do_sample": False}}
    with azmlinfsrv(azureml_python, phi4_chain.model_dir, tmp_path) as server:
        azure = httpx.post(f"{server.base}/score", json=body, timeout=60)
    assert azure.status_code == 200, azure.text
    # Azure loads it in the dtype MLflow recorded (float32); the local endpoint, told the same, must agree.
    engine = Engine.from_mlflow(str(phi4_chain.model_dir), policy=LoadPolicy(dtype="float32"))
    with ThreadServer(create_app(KEY, engine=engine)) as local:
        mine = httpx.post(f"{local.base}/score", json=body, headers=AUTH, timeout=60)
    assert mine.status_code == 200, mine.text
    [reply] = azure.json()
    assert isinstance(reply, str) and azure.json() == mine.json()
