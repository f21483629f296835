"""The command-line entry points (pyproject's console scripts, and every `python -m` form), and
how each ends on a user's mistake: one line on stderr that names the key, flag or path and what to
do, exit status 2, no traceback. Anything else is a bug and keeps its traceback."""

import importlib
import os
import sys


def run(main):
    """Runs an entry point's main(), turning user errors into one line and exit status 2; a main
    that returns an int (the converter's count of failures) exits with it."""
    from interestformer.errors import ConfigError
    from interestformer.datasets.prepare import DataQualityError
    from interestformer.jobs.tracking import TrackingUnavailable

    try:
        result = main()
    except (ConfigError, DataQualityError, TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int):
        sys.exit(result)


def program(module_form: str) -> str:
    """The command as the user typed it, for --help and error lines: the console script's name
    (interestformer-train) or the `python -m` form."""
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("interestformer-") else module_form


def _entry(module: str):
    def entry():
        # Imported by its package name even under `python -m jobs.train`, so that one module object
        # (whose functions Ray ships to its workers by reference) serves the whole run.
        run(importlib.import_module(module).main)

    entry.__doc__ = f"Runs {module}.main() as a command."
    return entry


train = _entry("interestformer.jobs.train")
evaluate = _entry("interestformer.jobs.evaluate")
embed_items = _entry("interestformer.jobs.embed_items")
recommend = _entry("interestformer.jobs.recommend")
sweep = _entry("interestformer.tuning.sweep")
convert = _entry("interestformer.datasets.convert")
