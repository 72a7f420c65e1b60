import sys
from pathlib import Path

# The shared generator module (propgen.py) lives beside the property tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
