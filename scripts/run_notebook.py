"""Execute tutorial.ipynb and write the executed copy to runs/tutorial.ipynb (the committed notebook
stays without outputs, so it can never show stale results)."""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

root = Path(__file__).resolve().parent.parent
out = root / "runs" / "tutorial.ipynb"
nb = nbformat.read(root / "tutorial.ipynb", as_version=4)
start = time.perf_counter()
try:
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
finally:
    out.parent.mkdir(exist_ok=True)
    nbformat.write(nb, out)
    sys.stderr.write(f"executed in {time.perf_counter() - start:.0f} s -> {out}\n")
