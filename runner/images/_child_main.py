"""Script entry of the extraction child: ``python -I .../runner/images/_child_main.py``.

Isolated mode (-I) ignores PYTHONPATH and the environment's PYTHON* variables, so the
package's own location is put on sys.path here before importing it.
"""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    importlib.import_module("runner.images._child").main()
