"""python -m mm_moslora.serve --model OUT (see mm_moslora.serve.cli)."""
import sys

from .cli import main

sys.exit(main())
