"""Entry point: `python -m services.kubebridge`."""

from ciliary import runtime
from services.kubebridge.service import main

if __name__ == "__main__":
    runtime.run("kubebridge", main)
