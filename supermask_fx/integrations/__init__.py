"""Adapters for training frameworks, imported by name so that none of them loads a framework it does not need:
``supermask_fx.integrations.huggingface`` (``Trainer``), ``supermask_fx.integrations.lightning``. Plain PyTorch,
accelerate, torchvision's and timm's reference scripts need no adapter: see the recipes in the repository's
``integrations/`` folder and docs/plugging-in.md."""
