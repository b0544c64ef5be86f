"""``python -m qtrain.bench _row SPEC OUT``: the bench row worker (internal; use ``qtrain bench``)."""

from qtrain.bench.matrix import _main

_main()
