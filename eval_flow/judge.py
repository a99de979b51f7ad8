"""Judge-based scores through azure-ai-evaluation, when an OpenAI-compatible judge is configured.

The judge comes from EVAL_JUDGE_ENDPOINT, EVAL_JUDGE_API_KEY and EVAL_JUDGE_MODEL (config.py's fields),
read from the environment, else from the .env named by ENV_FILE, else from `.env` in the working
directory. An endpoint on *.openai.azure.com is Azure OpenAI (EVAL_JUDGE_MODEL = the deployment name);
anything else is an OpenAI-compatible base URL (https://api.openai.com/v1, a local server's /v1, ...).
Without all three the flow scores offline and reports the judge scores as skipped.
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

JUDGE_VARIABLES = ("EVAL_JUDGE_ENDPOINT", "EVAL_JUDGE_API_KEY", "EVAL_JUDGE_MODEL")
JUDGE_METRICS = ("relevance", "coherence", "fluency", "similarity")  # each 1 (worst) to 5 (best)


def judge_settings(env: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, str]]:
    """The three judge values, or None when any is missing."""
    env = os.environ if env is None else env
    values = {name: env.get(name, "") for name in JUDGE_VARIABLES}
    if not all(values.values()):
        path = Path(env.get("ENV_FILE") or ".env")
        if path.is_file():
            from dotenv import dotenv_values

            found = dotenv_values(path)
            values = {name: values[name] or (found.get(name) or "") for name in JUDGE_VARIABLES}
    return values if all(values.values()) else None


def skipped_note() -> str:
    return (f"skipped the judge scores ({', '.join(JUDGE_METRICS)}): no judge configured; set "
            f"{', '.join(JUDGE_VARIABLES)} to score with one")


@lru_cache(maxsize=1)
def _evaluators(endpoint: str, key: str, model: str) -> Dict[str, Any]:
    from azure.ai.evaluation import (AzureOpenAIModelConfiguration, CoherenceEvaluator, FluencyEvaluator,
                                     OpenAIModelConfiguration, RelevanceEvaluator, SimilarityEvaluator)

    # `type` picks the client; the TypedDicts do not fill it in themselves.
    if ".openai.azure.com" in endpoint:
        model_config: Any = AzureOpenAIModelConfiguration(type="azure_openai", azure_endpoint=endpoint, api_key=key,
                                                          azure_deployment=model)
    else:
        model_config = OpenAIModelConfiguration(type="openai", base_url=endpoint, api_key=key, model=model)
    return {
        "relevance": RelevanceEvaluator(model_config),
        "coherence": CoherenceEvaluator(model_config),
        "fluency": FluencyEvaluator(model_config),
        "similarity": SimilarityEvaluator(model_config),
    }


def judge_scores(settings: Dict[str, str], question: str, answer: str, reference: str) -> Dict[str, float]:
    evaluators = _evaluators(*(settings[name] for name in JUDGE_VARIABLES))
    results = {
        "relevance": evaluators["relevance"](query=question, response=answer),
        "coherence": evaluators["coherence"](query=question, response=answer),
        "fluency": evaluators["fluency"](response=answer),
        "similarity": evaluators["similarity"](query=question, response=answer, ground_truth=reference),
    }
    return {name: float(result[name]) for name, result in results.items()}
