"""`python -m worker`: run one worker service."""

import sys

from shared.errors import FedqError
from worker.cli import worker_main

try:
    sys.exit(worker_main())
except FedqError as e:
    sys.exit(f"fedq worker: {e}")
