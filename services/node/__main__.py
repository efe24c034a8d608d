"""Entry point: `python -m services.node`."""

from ciliary import runtime
from services.node.service import main

if __name__ == "__main__":
    runtime.run("node", main)
