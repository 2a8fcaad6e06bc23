"""``python -m fused_embedding bench|validate``: the same as the ``fused-embedding`` command."""
import sys

from .cli import main

sys.exit(main())
