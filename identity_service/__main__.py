"""Allows ``python -m identity_service``."""

from identity_service.cli import main

raise SystemExit(main())
