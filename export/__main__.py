"""``python -m export CHECKPOINT --out DIR``."""
from export.cli import main

raise SystemExit(main())
