"""Import root of InterestFormer's layers.

The layer folders (datasets/, models/, jobs/, tuning/) live at the repository root, which is also
Ray's job working directory. They are imported as ``interestformer.<layer>`` so that our
``datasets/`` folder never shadows Hugging Face's ``datasets`` package.
"""

import os

__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


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
