"""Entry point: `python -m services.flows`."""

from ciliary import runtime
from services.flows.service import main

if __name__ == "__main__":
    runtime.run("flows", main)
