"""The error every layer raises for a config mistake.

`interestformer` is the package of InterestFormer's layers: interestformer.datasets (raw logs to
batches), .models (batches to losses and scores), .jobs (the entry points) and .tuning (sweeps).
In a checkout they are the top-level folders of those names, which pyproject.toml maps into the
package. The package has no __init__.py: a regular package in the checkout's interestformer/
folder would hide the mapped layers whenever the checkout is the current directory.
"""


class ConfigError(ValueError):
    """A config value is missing or invalid. Raised before any cluster resource is taken.

    `key` is the dotted path of the offending key (``model.d_model``); a layer's config raises it
    with its own field name and the loader prefixes where that config sits in the whole file.
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        # A command-line flag or path (--config, --checkpoint) is named as it is typed.
        super().__init__(f"{key} {reason}" if key.startswith("--") else f"config key '{key}': {reason}")
