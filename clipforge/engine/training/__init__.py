"""Training, split by concern as open_clip_train is: ``optim`` (parameter groups, the learning-rate
schedule), ``runtime`` (device, precision, DDP), ``checkpoints``, ``warm_start`` (init_from,
WiSE-FT), ``step`` (the loss over accumulated micro-batches) and ``loop`` (the loop over a
:class:`~clipforge.engine.training.state.TrainState`)."""

from clipforge.engine.training.loop import StepCallback, train

__all__ = ["StepCallback", "train"]
