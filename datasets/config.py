"""What the data layer is configured by: where the logs are and how they become batches."""

import os
from dataclasses import dataclass, field
from typing import Literal

from interestformer.errors import ConfigError
from interestformer.datasets.demo import DemoDataConfig


ID_KEY_ENV, ID_KEY_FILE_ENV = "INTERESTFORMER_ID_KEY", "INTERESTFORMER_ID_KEY_FILE"


def pseudonym_key() -> bytes:
    """The user-id pseudonymisation key from the environment (b"" when none is set)."""
    if os.environ.get(ID_KEY_ENV):
        return os.environ[ID_KEY_ENV].encode()
    path = os.environ.get(ID_KEY_FILE_ENV)
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read().strip()
    return b""


@dataclass
class DataConfig:
    """Input logs and how they are turned into training batches."""

    source: Literal["demo", "parquet"] = "demo"
    """`demo` generates a synthetic dataset into `prepared_dir`/raw; `parquet` reads your logs."""
    events_path: str = ""
    """Behaviour events: a Parquet file, a folder of shards, or an object-store URI (s3://, gs://).
    Required when source is `parquet`. Schema in docs/data.md."""
    items_path: str = ""
    """Item catalogue: Parquet file, folder or URI. Required when source is `parquet`."""
    prepared_dir: str = "data/prepared/demo"
    """Where the prepared sequences, item table and quarantine are written (local path or URI).
    Relative paths are taken from the current directory."""
    text_columns: list[str] = field(default_factory=lambda: ["title", "description"])
    """Catalogue columns joined (in this order) into an item's text."""
    sequence_shards: int = 8
    """Files the prepared user sequences are written to: the parallelism of every later read."""
    max_seq_len: int = 50
    """Longest behaviour history the user model reads; older events are cut off."""
    text_max_tokens: int = 24
    """Tokens kept per item text."""
    image_size: int = 32
    """Images are decoded and resized to this square size (pixels)."""
    num_negatives: int = 128
    """Uniformly sampled negative items shared by each training batch (on top of in-batch ones)."""
    full_softmax: bool = False
    """Score every training target against the whole catalogue (every item not held out), a full
    cross-entropy, instead of against the batch's items plus num_negatives sampled ones. Costs a
    (targets x catalogue) score matrix per batch: right for catalogues of thousands to tens of
    thousands of items with frozen or no content encoders; live encoders would encode the whole
    catalogue every step."""

    group_by_length: bool = False
    """Cut training batches from blocks of users sorted by history length, so that a batch holds
    users of like lengths and little of it is padding (the model computes no column that is
    padding in every row): fewer operations per epoch on logs whose history lengths vary, at the
    price of less mixed batches. Evaluation batches are always grouped so."""

    def negatives(self) -> int | None:
        """Sampled negatives per training batch; None: every item is a candidate (full_softmax)."""
        return None if self.full_softmax else self.num_negatives
    vocab_size: int = 2000
    """Size of the word-piece vocabulary trained on the catalogue when no pretrained tokenizer is
    given (model.text.pretrained_path)."""
    cold_item_fraction: float = 0.0
    """Cold-start evaluation: this fraction of items (a fixed, seeded choice) is held out of
    training entirely (dropped from every training sequence and history, never a negative), and the
    job also reports cold_test_* metrics over test users whose target is one of those items. The
    test_* metrics of such a run are then no longer the standard protocol's."""
    new_user_fraction: float = 0.0
    """Cold-start users: this fraction of users (a fixed choice by a hash of the user id) never
    trains, and the job also reports new_user_* metrics: each such user ranked after their first
    0, 1, 2 and 3 events (the next event is the target; segments history_0 and history_1-3). A
    user without any event gets the most popular items, as serving does."""
    train_since: int = 0
    """Incremental training on a new window of the log: only events at or after this timestamp
    are training targets; earlier ones are still read as history. Users without such an event do
    not train. 0: every event trains. Validation and test keep each user's last events (see
    datasets/pipeline.py)."""
    pseudonymise_user_ids: bool = False
    """Replace every user id at ingest by a keyed hash (HMAC-SHA256), so raw ids never reach the
    prepared data, quarantine, checkpoints, logs or MLflow. The key is read from the environment
    variable INTERESTFORMER_ID_KEY, or from the file named by INTERESTFORMER_ID_KEY_FILE; it is
    never logged. The same key always gives the same pseudonyms."""
    reference_time: int = 0
    """Events more than a day after this time (Unix seconds) are set aside as bad_timestamp. 0: the
    wall clock when prepare runs. Set it where a re-run must prepare the same data on any date."""
    max_bad_fraction: float = 0.2
    """The job stops with an error when more than this fraction of events or items is unusable."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    """Size of the generated dataset when source is `demo`."""

    def __post_init__(self):
        if self.source == "parquet":
            for key in ("events_path", "items_path"):
                if not getattr(self, key):
                    raise ConfigError(key, "is required when data.source is 'parquet'")
        for key in ("max_seq_len", "text_max_tokens", "image_size", "vocab_size"):
            if getattr(self, key) < 2:
                raise ConfigError(key, f"must be >= 2, got {getattr(self, key)}")
        if self.sequence_shards < 1:
            raise ConfigError("sequence_shards", f"must be >= 1, got {self.sequence_shards}")
        if self.num_negatives < 0:
            raise ConfigError("num_negatives", "must be >= 0")
        for key in ("cold_item_fraction", "new_user_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(key, f"must be within [0, 1), got {getattr(self, key)}")
        if self.reference_time < 0:
            raise ConfigError("reference_time", f"must be a Unix timestamp >= 0 (0: the wall clock), got {self.reference_time}")
        if self.train_since < 0:
            raise ConfigError("train_since", f"must be a Unix timestamp >= 0 (0: every event trains), got {self.train_since}")
        if self.pseudonymise_user_ids and not pseudonym_key():
            raise ConfigError("pseudonymise_user_ids",
                              f"needs a key: set ${ID_KEY_ENV} or ${ID_KEY_FILE_ENV} (a file holding it)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("max_bad_fraction", "must be within [0, 1]")
