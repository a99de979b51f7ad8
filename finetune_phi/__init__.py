"""finetune-phi: fine-tune Phi-3 and chat with it through Prompt flow, locally or on Azure ML."""

__version__ = "0.1.0"
