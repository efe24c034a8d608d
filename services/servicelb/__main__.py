"""Entry point: `python -m services.servicelb`."""

from ciliary import runtime
from services.servicelb.service import main

if __name__ == "__main__":
    runtime.run("servicelb", main)
