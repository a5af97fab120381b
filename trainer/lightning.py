"""``from trainer.lightning import PandaCallback``: the Lightning integration's short name."""

from trainer.integrations.lightning import PandaCallback, batch_loss, validation_name

__all__ = ["PandaCallback", "batch_loss", "validation_name"]
