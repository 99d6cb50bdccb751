"""`python -m aggregator`: run the aggregator service."""

import sys

from aggregator.cli import aggregator_main
from shared.errors import FedqError

try:
    sys.exit(aggregator_main())
except FedqError as e:
    sys.exit(f"fedq aggregator: {e}")
