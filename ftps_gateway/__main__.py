"""Allow ``python -m ftps_gateway``."""

from ftps_gateway.cli import main

raise SystemExit(main())
