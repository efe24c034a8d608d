"""Entry point: `python -m services.policy`."""

from ciliary import runtime
from services.policy.service import main

if __name__ == "__main__":
    runtime.run("policy", main)
