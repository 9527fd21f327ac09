"""``python -m robustkit`` is the ``robustkit`` command."""

from robustkit.cli import main

raise SystemExit(main())
