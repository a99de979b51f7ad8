"""The local online endpoint: serves a registered MLflow model over Azure ML's HTTP contract.

    FINETUNE_PHI_ENDPOINT_KEY=... python -m finetune_phi.endpoint --model-uri models:/NAME/VERSION --port 5001

`python deploy_model.py` starts it for you (detached, with a generated key); see local_deploy.py.
"""

KEY_ENV = "FINETUNE_PHI_ENDPOINT_KEY"  # the key travels in the environment: argv shows in `ps`
