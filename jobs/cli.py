"""How every entry point ends on a user's mistake: one line on stderr that names the key, flag or
path and what to do, exit status 2, no traceback. Anything else is a bug and keeps its traceback."""

import sys


def run(main):
    """Runs an entry point's main(), turning user errors into one line and exit status 2."""
    from interestformer import ConfigError
    from interestformer.datasets.prepare import DataQualityError
    from interestformer.jobs.tracking import TrackingUnavailable

    try:
        main()
    except (ConfigError, DataQualityError, TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
