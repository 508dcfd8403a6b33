"""`python -m domain_sae.cli` (and `torchrun ... -m domain_sae.cli train ...`)."""

import sys

from . import main

sys.exit(main())
