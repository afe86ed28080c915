"""MLproject entry point `main`: segment -> preprocess -> train -> evaluate, reusing finished steps."""

import sys
from pathlib import Path

# In a conda env built from conda.yaml cxrexp is not pip-installed: import it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrexp.cli import entrypoint  # noqa: E402

if __name__ == "__main__":
    entrypoint("run")
