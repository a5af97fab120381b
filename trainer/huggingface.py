"""``from trainer.huggingface import PandaCallback``: the transformers integration, short."""

from trainer.integrations.huggingface import PandaCallback, output_loss, validation_metrics

__all__ = ["PandaCallback", "output_loss", "validation_metrics"]
