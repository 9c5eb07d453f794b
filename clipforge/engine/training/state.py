"""The state of a training as it goes: what a checkpoint records and a resumed run starts from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """``step`` optimizer steps done, the last of them in ``epoch``; ``samples`` and ``history``
    (each step's metrics) count this attempt only: a resumed run starts them afresh."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
