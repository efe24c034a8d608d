"""Entry point: `python -m services.identity`."""

from ciliary import runtime
from services.identity.service import main

if __name__ == "__main__":
    runtime.run("identity", main)
