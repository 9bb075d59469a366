"""Where the project's data folders live (search spaces, trial recipes, paper reference tables).

mdsearch runs from a source checkout (`pip install -e .`): these folders sit beside the package.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
SEARCH_SPACES = ROOT / "search_space"
TRIALS = ROOT / "trials"

CACHE_DIR_ENV = "MDSEARCH_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """The one cache root for derived, re-creatable files (text embeddings, the metrics'
    classifier): $MDSEARCH_CACHE_DIR/KIND, else ~/.cache/mdsearch/KIND."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mdsearch"
    return Path(root).expanduser() / kind
