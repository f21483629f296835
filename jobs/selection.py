"""Model selection and early stopping: which epoch is the run's model, and when training ends.

Every validation compares train.select_metric with the best so far. The best epoch's weights are
the run's model: the test split is read once from them at the end, and they are what the
checkpoints hold as model.safetensors. With train.patience > 0 the run ends once that many
validations in a row failed to beat the best by train.min_delta. The state travels in every
checkpoint, so a resumed run keeps its best epoch and its patience count.
"""

import math
from dataclasses import asdict, dataclass, field


@dataclass
class ModelSelection:
    metric: str
    """The validation metric, higher is better (train.select_metric)."""
    patience: int
    """Validations in a row without improvement that end the run; 0: never end early."""
    min_delta: float
    """The least gain that counts as an improvement."""
    best: float = -math.inf
    """The best value of the metric so far."""
    best_epoch: int = 0
    """The epoch (1-based) that reached it; 0 before the first validation."""
    best_metrics: dict = field(default_factory=dict)
    """All validation metrics of the best epoch."""
    since_best: int = 0
    """Validations since the best one."""

    @classmethod
    def for_run(cls, train, saved: dict | None = None) -> "ModelSelection":
        """A fresh selection for a TrainConfig, or the one a checkpoint saved (its metric and patience
        settings give way to the config's, so a resumed run may be given more patience)."""
        selection = cls(**saved) if saved else cls(train.select_metric, train.patience, train.min_delta)
        selection.metric, selection.patience, selection.min_delta = train.select_metric, train.patience, train.min_delta
        return selection

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Records one validation (metrics named as logged, e.g. val_ndcg@10); True when it is the
        new best."""
        value = metrics[self.metric]
        if self.best_epoch == 0 or value >= self.best + self.min_delta and value > self.best:
            self.best, self.best_epoch, self.best_metrics, self.since_best = value, epoch, dict(metrics), 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict:
        return asdict(self)
