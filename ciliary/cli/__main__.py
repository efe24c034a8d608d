"""``python -m ciliary.cli``: the same as the ``ciliary`` console script."""

from ciliary.cli.app import main

main()
