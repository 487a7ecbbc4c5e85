"""``python -m toolchain`` is the same as the ``toolchain`` command."""

from toolchain.cli import main

raise SystemExit(main())
