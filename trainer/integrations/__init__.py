"""Panda inside training frameworks: each module imports its framework, ``trainer`` never does.

* :mod:`~trainer.integrations.lightning`: ``PandaCallback`` for PyTorch Lightning;
* :mod:`~trainer.integrations.huggingface`: ``PandaCallback`` for ``transformers.Trainer``.
"""
