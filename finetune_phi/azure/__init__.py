"""The Azure ML backend: entities (each defined once), client/credential handling, preflight, workflow.

`setup_ml.py --backend azure` and `deploy_model.py --backend azure` call `finetune_phi.azure.workflow`;
nothing in this package configures logging or touches the network at import time.
"""
