"""The run's tracker seen from one stage of a multi-stage run (multi-teacher stages, KDEP's distillation and
fine-tunings, zero-shot's students)."""
from __future__ import annotations


class StageTracker:
    """The stage's trainer steps are offset by the steps of the stages before it (metrics.jsonl stays monotonic,
    and resuming a stage truncates only that stage's lines), and every line carries the stage number."""

    def __init__(self, base, offset: int, stage: int):
        self.base, self.offset, self.stage = base, int(offset), int(stage)

    @property
    def run_id(self):
        return getattr(self.base, "run_id", None)

    def log(self, metrics, step: int) -> None:
        if self.base is not None:
            self.base.log({**metrics, "stage": self.stage}, self.offset + int(step))

    def truncate_after(self, step: int) -> None:
        if self.base is not None:
            self.base.truncate_after(self.offset + int(step))
