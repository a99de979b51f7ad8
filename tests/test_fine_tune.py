"""fine_tune.py: the loss mask, the LoRA merge, and a real end-to-end run into a real MLflow store."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FINETUNING_DIR = REPO / "finetuning_dir"
sys.path.insert(0, str(FINETUNING_DIR))  # the job's code folder imports its siblings by bare name

import chat_format  # noqa: E402
import fine_tune  # noqa: E402
import mlflow_model  # noqa: E402
import recipe  # noqa: E402
import tiny_model  # noqa: E402

# The tiny demo settings this file verifies (the lead copies them into the demo's defaults).
DEMO_EPOCHS = 15
DEMO_LEARNING_RATE = 3e-3


# --- helpers --------------------------------------------------------------------------------------


def split_ultrachat(ultrachat_20: Path, tmp_path: Path) -> tuple[Path, Path]:
    lines = ultrachat_20.read_text(encoding="utf-8").splitlines(keepends=True)
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(lines[:16]), encoding="utf-8")
    evaluation.write_text("".join(lines[16:]), encoding="utf-8")
    return train, evaluation


def qa_rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(
        json.dumps({"prompt": q, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in pairs
    )


def args_for(train: Path, evaluation: Path, out: Path, *extra: str):
    """fine_tune.py's arguments; the before/after evaluation kept to a few short answers unless `extra` says."""
    return fine_tune.make_parser().parse_args(
        ["--train-file", str(train), "--eval-file", str(evaluation), "--model_output_dir", str(out),
         "--eval-max-rows", "4", "--eval-max-new-tokens", "8", *extra]
    )


@pytest.fixture(scope="module")
def _sqlite_store(tmp_path_factory: pytest.TempPathFactory):
    """One real sqlite tracking store for the module (creating its schema takes seconds)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        yield uri, root
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def mlflow_store(_sqlite_store, request: pytest.FixtureRequest):
    """(tracking uri, a fresh experiment id) in the module's store, artifacts under its folder."""
    import mlflow

    uri, root = _sqlite_store
    name = request.node.name
    experiment_id = mlflow.MlflowClient().create_experiment(name, artifact_location=(root / name).as_uri())
    return uri, experiment_id


# --- cheap checks ------------------------------------------------------------------------------


def test_help_imports_nothing_heavy():
    code = (
        "import sys; sys.argv = ['fine_tune.py', '--help']; import fine_tune\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'mlflow') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
        "fine_tune.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=FINETUNING_DIR, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout
    for flag in ("--model_output_dir", "--model-output-dir", "--peft", "--max-seq-length", "--lora-dropout", "--save-steps"):
        assert flag in proc.stdout


def test_accepts_exactly_the_flags_the_shared_command_builder_passes(tmp_path):
    import config
    from finetune_phi.training import fine_tune_args

    argv = fine_tune_args(
        config.Settings(), train_file="t.jsonl", eval_file="e.jsonl", model_output_dir=str(tmp_path / "m"), model="tiny"
    )
    args = fine_tune.make_parser().parse_args(argv)
    assert args.model == "tiny" and args.model_output_dir == tmp_path / "m"
    assert fine_tune.resolve_peft(args.peft, args.model) == "full"
    assert fine_tune.resolve_peft("auto", "microsoft/Phi-3-mini-4k-instruct") == "lora"


def test_bad_arguments_are_all_named_with_their_fix(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "leftover").write_text("x")
    args = args_for(tmp_path / "t.jsonl", tmp_path / "e.jsonl", out, "--learning-rate", "0", "--model", "phi3", "--lora-dropout", "1.5")
    with pytest.raises(SystemExit) as excinfo:
        fine_tune.validate_args(args)
    message = str(excinfo.value)
    for expected in ("--learning-rate must be > 0", "--lora-dropout must be in [0, 1)", "already holds files", "--model 'phi3'"):
        assert expected in message


def test_a_file_without_messages_fails_naming_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(qa_rows([("q", "a")]) + '{"messages": [{"role": "user", "content": "no answer"}]}\n', encoding="utf-8")
    with pytest.raises(chat_format.DataError, match=r"train.jsonl:2: has no assistant message"):
        chat_format.read_chat_rows(bad)


def test_a_chat_template_trl_cannot_mask_is_refused_before_training():
    tokenizer = tiny_model.build_tokenizer(["some text to learn a few merges from"])
    recipe.require_maskable_template(tokenizer)  # the Phi-3 template: accepted
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="--no-assistant-only-loss"):
        recipe.require_maskable_template(tokenizer)


# --- what the model is trained on ---------------------------------------------------------------


def _supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels):
        if label != -100:
            assert label == token
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = label != -100
    return spans


def test_one_pad_choice_for_training_and_generation(phi3_tokenizer_dir):
    """Phi-3 ships pad == eos: training pads with <unk> instead (padding masked by id would hide the real
    EOS); generation (evaluation, the endpoint) pads with the same choice, with EOS only when there is no other."""
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    assert real.pad_token == real.eos_token  # the trap
    assert chat_format.pad_token(real) == "<unk>" and chat_format.padding_id(real) == real.unk_token_id
    chat_format.ensure_pad_token(real)
    assert real.pad_token == "<unk>"
    tiny = tiny_model.build_tokenizer(["a few words to learn merges from"])
    assert chat_format.pad_token(tiny) == tiny_model.PAD  # its own, distinct from EOS: kept

    tiny.pad_token, tiny.unk_token = tiny.eos_token, None
    assert chat_format.pad_token(tiny) is None and chat_format.padding_id(tiny) == tiny.eos_token_id
    chat_format.ensure_pad_token(tiny)  # training cannot pad with EOS: a new token
    assert tiny.pad_token == "<pad>" and tiny.pad_token_id != tiny.eos_token_id


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_only_assistant_turns_and_their_end_tokens_are_supervised(which, tmp_path, phi3_tokenizer_dir, ultrachat_20):
    """A real ultrachat row through the trainer's own tokenization and collator."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
    from trl import SFTTrainer

    train, evaluation = split_ultrachat(ultrachat_20, tmp_path)
    args = args_for(train, evaluation, tmp_path / "out", "--max-seq-length", "4096")
    if which == "real":
        tokenizer = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
        assert tokenizer.pad_token == tokenizer.eos_token  # the trap ensure_pad_token exists for
    else:
        tokenizer = tiny_model.build_tokenizer(tiny_model.corpus_from_rows(chat_format.read_chat_rows(train)))
    chat_format.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = Phi3ForCausalLM(
        Phi3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    )  # fmt: skip
    train_ds, eval_ds = fine_tune.load_datasets(train, evaluation)
    assert train_ds.column_names == ["messages"]  # ultrachat's `prompt` would make trl expect `completion`
    trainer = SFTTrainer(
        model=model,
        args=fine_tune.sft_config(args, fine_tune.Device(cuda=False, bf16=False), tmp_path / "ckpt", 10),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    # Padding in a batch of two must not hide the shorter row's final EOS.
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    batch = trainer.data_collator(rows)
    messages = train_ds[0]["messages"]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    for i, row_messages in enumerate((messages, train_ds[1]["messages"])):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        spans = _supervised_spans(ids, labels)
        row_assistant = [m["content"] for m in row_messages if m["role"] == "assistant"]
        assert len(spans) == len(row_assistant)
        end_id, eos_id = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
        for n, (span, content) in enumerate(zip(spans, row_assistant)):
            text = tokenizer.decode(span)
            expected_end = "<|end|>" + ("\n<|endoftext|>" if n == len(spans) - 1 else "\n")
            # The real tokenizer folds the newline after <|end|> into the special token.
            assert text.replace("<|end|>\n", "<|end|>").strip() == (content + expected_end).replace("<|end|>\n", "<|end|>").strip()
            assert end_id in span
        assert spans[-1][-1] == eos_id
        # Nothing the user wrote is a target, and neither are the role markers.
        supervised = {t for span in spans for t in span}
        for marker in ("<|user|>", "<|assistant|>"):
            assert tokenizer.convert_tokens_to_ids(marker) not in supervised
        # Every user turn, from <|user|> through its closing <|end|>, is masked out.
        user = [m["content"] for m in row_messages if m["role"] == "user"]
        user_id = tokenizer.convert_tokens_to_ids("<|user|>")
        starts = [j for j, t in enumerate(ids) if t == user_id]
        assert len(starts) == len(user)
        for start, content in zip(starts, user):
            stop = ids.index(end_id, start)
            assert tokenizer.decode(ids[start + 1 : stop]).strip() == content.strip()
            assert all(label == -100 for label in labels[start : stop + 1])
    assert len(assistant) >= 2  # the row is multi-turn, so the middle <|end|> tokens were checked too


# --- LoRA: merged before saving -----------------------------------------------------------------


def test_lora_adapter_is_merged_and_the_logged_model_gives_the_same_logits(tmp_path, mlflow_store, ultrachat_20):
    import mlflow
    import torch

    train, evaluation = split_ultrachat(ultrachat_20, tmp_path)
    out = tmp_path / "model"
    args = args_for(train, evaluation, out, "--model", "tiny", "--peft", "lora", "--max-steps", "3",
                    "--learning-rate", "1e-2", "--max-seq-length", "128", "--lora-r", "4")  # fmt: skip
    base_model, _ = tiny_model.build_tiny(train, seed=args.seed)
    with mlflow.start_run(experiment_id=mlflow_store[1]) as run:
        trained = fine_tune.train(args, tmp_path / "ckpt")
        model_uri = fine_tune.save_and_log(trained.model, trained.tokenizer, out, run.info.run_id)

    assert type(trained.model).__name__ == "Phi3ForCausalLM"  # not a PeftModel
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params["peft"] == "lora" and params["lora_target_modules"] == "qkv_proj,o_proj,gate_up_proj,down_proj"
    assert 0 < int(params["trainable_parameters"]) < int(params["parameters"]) / 5  # only the adapters train
    files = {p.name for p in out.rglob("*")}
    assert "model.safetensors" in files
    assert not {f for f in files if "adapter" in f}, files
    assert "peft" not in (out / "MLmodel").read_text()

    probe = trained.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What theme version am I using?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    loaded = mlflow.transformers.load_model(model_uri, return_type="components")["model"]
    with torch.no_grad():
        merged_logits = trained.model(probe).logits
        loaded_logits = loaded(probe).logits
        base_logits = base_model(probe).logits
    torch.testing.assert_close(loaded_logits, merged_logits)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the adapter really changed the model


# --- the demo: the tiny model visibly learns ---------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_memorises_a_small_qa_set_with_the_demo_settings(tmp_path, mlflow_store):
    import mlflow

    question, answer = "Who founded Microsoft?", "Microsoft was founded by Bill Gates and Paul Allen."
    facts = [("Who founded Apple?", "Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne."),
             ("Who founded Amazon?", "Amazon was founded by Jeff Bezos."),
             ("Who founded Intel?", "Intel was founded by Robert Noyce and Gordon Moore."),
             ("What is the capital of France?", "The capital of France is Paris."),
             ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
             ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
             ("Who started Microsoft?", answer)] * 4  # fmt: skip
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(qa_rows([(question, answer)] * 8 + facts), encoding="utf-8")
    evaluation.write_text(qa_rows([("Who created Microsoft?", answer), ("Who founded Dell?", "Dell was founded by Michael Dell.")]), encoding="utf-8")
    args = args_for(train, evaluation, tmp_path / "model", "--model", "tiny",
                    "--epochs", str(DEMO_EPOCHS), "--learning-rate", str(DEMO_LEARNING_RATE))  # fmt: skip
    with mlflow.start_run(experiment_id=mlflow_store[1]):
        trained = fine_tune.train(args, tmp_path / "ckpt")

    def greedy_reply(model, tokenizer) -> tuple[str, int]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1] :]
        return tokenizer.decode(out, skip_special_tokens=True).strip(), out[-1].item()

    # The same tiny model before fine-tuning (same seed, same tokenizer) does not know the answer...
    base_model, base_tokenizer = fine_tune.load_model_and_tokenizer(args, fine_tune.detect_device(), "full")
    base_reply, _ = greedy_reply(base_model.eval(), base_tokenizer)
    assert "Bill Gates" not in base_reply
    # ...and after it, greedy decoding gives the answer and stops by itself at end of turn.
    reply, last_token = greedy_reply(trained.model, trained.tokenizer)
    assert reply == answer
    assert last_token in trained.model.generation_config.eos_token_id
    assert trained.eval_loss_after < trained.eval_loss_before  # the paraphrase in eval is answered too


# --- end to end, as the local backend runs it ---------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_run_joins_the_given_run_and_logs_a_servable_registrable_model(tmp_path, mlflow_store, ultrachat_20):
    import mlflow

    uri, experiment_id = mlflow_store
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    train, evaluation = split_ultrachat(ultrachat_20, tmp_path)
    out = tmp_path / "outputs" / "model"
    argv = ["--train-file", str(train), "--eval-file", str(evaluation), "--model-output-dir", str(out),
            "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--max-seq-length", "256", "--learning-rate", "1e-3",
            "--eval-max-rows", "4", "--eval-max-new-tokens", "8"]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id}
    proc = subprocess.run(
        [sys.executable, "fine_tune.py", *argv], cwd=FINETUNING_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert run_id in summary and str(out) in summary and "->" in summary

    # One run only: the one the caller created, finished, with a compact set of params.
    runs = client.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert 5 < len(run.data.params) < 40
    assert run.data.params["base_model"] == "tiny" and run.data.params["peft"] == "full"
    metrics = run.data.metrics
    assert math.isfinite(metrics["eval_loss_before"]) and math.isfinite(metrics["eval_loss_after"])
    assert len(client.get_metric_history(run_id, "train_loss")) >= 2

    # (b) an MLflow model folder, readable by another user (transformers writes weights 0600).
    assert (out / "MLmodel").is_file()
    weights = out / "model" / "model.safetensors"
    assert weights.stat().st_mode & stat.S_IROTH

    # (a) the run's "model" loads, answers a prompt string (Phi-3's template applied by the model),
    # honours request params, and registers.
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    schema = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert schema == {"max_new_tokens": chat_format.DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "temperature": 1.0,
                      "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}  # fmt: skip
    assert model.metadata.metadata["prompt_template"] == chat_format.PROMPT_TEMPLATE
    prompt = "Who founded Microsoft?"
    tokenizer_dir = out / "components" / "tokenizer"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    [short] = model.predict([prompt], params={"max_new_tokens": 3})
    [longer] = model.predict([prompt], params={"max_new_tokens": 12})
    assert isinstance(short, str) and "<|" not in short and prompt not in short  # return_full_text is off
    assert longer.startswith(short)  # greedy by default: the same start, then more
    # The local endpoint finds what the MLflow model applies: the template, the params' defaults, <|end|> as a
    # stop; and generates the same text from the same prompt string, in as many tokens as asked.
    from finetune_phi.endpoint.engine import Engine, SamplingParams

    engine = Engine.from_mlflow(f"runs:/{run_id}/model")
    [three] = engine.generate([prompt], SamplingParams(max_new_tokens=3))
    assert three.text == short and three.completion_tokens <= 3
    assert engine.prompt_template == chat_format.PROMPT_TEMPLATE
    assert engine.score_defaults.max_new_tokens == chat_format.DEFAULT_MAX_NEW_TOKENS
    assert tokenizer.convert_tokens_to_ids("<|end|>") in engine.stop_token_ids
    assert tokenizer.chat_template == chat_format.PHI3_CHAT_TEMPLATE  # kept for /v1/chat/completions
    # Served (MLflow's own scoring app): a text-generation model takes {"inputs": [...], "params": {...}}.
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    http = TestClient(scoring_server.init(model))
    response = http.post("/invocations", json={"inputs": [prompt], "params": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [short]}
    version = mlflow.register_model(f"runs:/{run_id}/model", f"fine-tune-test-{run_id}")
    assert str(version.version) == "1" and version.run_id == run_id


# --- how the step is computed: measured choices ---------------------------------------------------


def test_padding_free_packing_only_where_a_kernel_skips_the_masked_blocks():
    cpu, gpu = fine_tune.Device(cuda=False, bf16=False), fine_tune.Device(cuda=True, bf16=True)
    assert fine_tune.choose_attention("auto", cpu) == "sdpa"
    assert fine_tune.choose_attention("eager", gpu) == "eager"
    assert recipe.choose_packing("auto", "sdpa") is False  # 1.8x slower than padding on CPU (bench/RESULTS.md)
    assert recipe.choose_packing("auto", "flash_attention_2") is True
    assert recipe.choose_packing("on", "sdpa") is True and recipe.choose_packing("off", "flash_attention_2") is False


def test_gradient_checkpointing_only_when_phi3_mini_would_not_fit():
    from transformers import Phi3Config

    phi3_mini = Phi3Config()  # the defaults are Phi-3-mini's shape
    n = 3_821_079_552  # Phi-3-mini-4k-instruct's parameter count
    lora = 32 * 16 * (3072 + 9216 + 3072 + 3072 + 3072 + 16384 + 8192 + 3072)  # r=16 on qkv, o, gate_up, down
    gpu = fine_tune.Device(cuda=True, bf16=True)

    def choose(gpu_gib: float, trainable: int, bytes_per_param: int, requested: str = "auto") -> bool:
        return recipe.choose_gradient_checkpointing(
            requested, total_params=n, trainable_params=trainable, base_bytes_per_param=bytes_per_param,
            model_config=phi3_mini, batch=4, seq_len=1024, device=gpu, gpu_bytes=gpu_gib * 2**30,
        )  # fmt: skip

    # LoRA on a bf16 base at batch 4 x 1024: ~23 GB, so an 80 GB A100/H100 runs it without recomputation...
    assert choose(80, lora, 2) is False
    # ...a 24 GB card does not, and neither does full fine-tuning with fp32 AdamW state (~76 GB) on 80 GB.
    assert choose(24, lora, 2) is True
    assert choose(80, n, 4) is True
    assert choose(80, lora, 2, requested="on") is True
    cpu = fine_tune.Device(cuda=False, bf16=False)
    assert recipe.choose_gradient_checkpointing(
        "auto", total_params=n, trainable_params=n, base_bytes_per_param=4, model_config=phi3_mini, batch=4,
        seq_len=1024, device=cpu, gpu_bytes=None,
    ) is False  # fmt: skip
    # LoRA on a CPU recomputes: its activations are most of the machine's shared RAM (bench/RESULTS.md).
    assert recipe.choose_gradient_checkpointing(
        "auto", total_params=n, trainable_params=lora, base_bytes_per_param=2, model_config=phi3_mini, batch=4,
        seq_len=1024, device=cpu, gpu_bytes=None,
    ) is True  # fmt: skip


def test_lora_parameter_count_matches_what_peft_trains(ultrachat_20, tmp_path):
    from peft import get_peft_model

    train, evaluation = split_ultrachat(ultrachat_20, tmp_path)
    args = args_for(train, evaluation, tmp_path / "out", "--model", "tiny", "--lora-r", "4")
    model, _ = tiny_model.build_tiny(train, seed=1)
    expected = recipe.lora_parameter_count(model, args.lora_r)
    wrapped = get_peft_model(model, fine_tune.lora_config(args))
    assert expected == sum(p.numel() for p in wrapped.parameters() if p.requires_grad) > 0


# --- dtype: what the base is trained in, and what the fine-tuned model is saved in -----------------


def test_lora_keeps_a_bf16_base_only_where_bf16_is_native():
    native_cpu, plain_cpu = fine_tune.Device(cuda=False, bf16=True), fine_tune.Device(cuda=False, bf16=False)
    assert recipe.choose_dtype("auto", native_cpu, "lora") == "bfloat16"
    assert recipe.choose_dtype("auto", plain_cpu, "lora") == "float32"  # bf16 there runs through conversions
    assert recipe.choose_dtype("auto", native_cpu, "full") == "float32"  # full FT keeps fp32 master weights
    assert recipe.choose_dtype("float32", native_cpu, "lora") == "float32"  # --dtype wins
    import native_dtypes

    assert native_dtypes.cpu_bf16_flags("flags\t: fpu avx512f avx512_bf16 amx_bf16\n") == ["avx512_bf16", "amx_bf16"]
    assert native_dtypes.cpu_bf16_flags("flags\t: fpu avx2\n") == []


def test_the_fine_tuned_model_goes_back_to_the_base_models_dtype(tmp_path):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, pad_token_id=0))  # fmt: skip
    assert model.dtype == torch.float32
    assert fine_tune.in_dtype(model, "bfloat16").dtype == torch.bfloat16
    assert fine_tune.in_dtype(model, "float32") is model  # nothing to do, no copy
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    assert fine_tune.base_model_dtype(str(tmp_path / "base")) == "bfloat16"  # from its config, no weight read
    assert fine_tune.base_model_dtype("tiny") == "float32"


def test_a_local_artifact_store_is_written_in_place_a_remote_one_is_uploaded(tmp_path):
    assert mlflow_model.local_artifact_dir((tmp_path / "a b").as_uri()) == tmp_path / "a b"
    assert mlflow_model.local_artifact_dir("/srv/mlartifacts/1/run/artifacts") == Path("/srv/mlartifacts/1/run/artifacts")
    for remote in ("mlflow-artifacts:/1/run/artifacts", "azureml://experiments/x/runs/y/artifacts", "s3://b/k"):
        assert mlflow_model.local_artifact_dir(remote) is None


def test_a_failed_hub_download_becomes_one_line_that_names_the_cause(monkeypatch):
    monkeypatch.setattr(recipe, "hub_is_offline", lambda: True)
    with pytest.raises(fine_tune.ModelUnavailable, match=r"org/model is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        with recipe.hub_errors("org/model"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(recipe, "hub_is_offline", lambda: False)
    with pytest.raises(fine_tune.ModelUnavailable, match=r"could not download org/model from .*: 401 Client Error"):
        with recipe.hub_errors("org/model"):
            raise OSError("401 Client Error\nmore detail")
    with pytest.raises(ValueError):  # not a download failure: left as it is
        with recipe.hub_errors("org/model"):
            raise ValueError("bad shape")
