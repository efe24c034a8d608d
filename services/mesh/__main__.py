"""Entry point: `python -m services.mesh`."""

from ciliary import runtime
from services.mesh.service import main

if __name__ == "__main__":
    runtime.run("mesh", main)
