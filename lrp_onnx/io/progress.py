"""Progress on the terminal."""

import sys

from tqdm import tqdm


def progress_bar(total, enabled, unit="explanation"):
    """A tqdm bar, shown only on an interactive stderr and for more than one item (``total`` None:
    a count of unknown end)."""
    return tqdm(total=total, unit=unit, disable=not (enabled and sys.stderr.isatty() and (total is None or total > 1)))
