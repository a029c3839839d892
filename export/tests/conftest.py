"""pytest set-up for the export tests: quiet exporter warnings and progress bars."""

from export.__main__ import _quiet

_quiet()
