"""``python -m medxai``: the same as the ``medxai`` command."""

from medxai.cli import main

raise SystemExit(main())
