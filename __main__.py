"""``python -m compartments``: see :mod:`compartments.cli`."""

from .cli import main

raise SystemExit(main())
