"""Where the project's data folders live (search spaces, trial recipes, paper reference tables).

mdsearch runs from a source checkout (`pip install -e .`): these folders sit beside the package.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
SEARCH_SPACES = ROOT / "search_space"
TRIALS = ROOT / "trials"
