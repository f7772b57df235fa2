"""Side-by-side performance benchmark of fedsim (``python experiments/bench/engines.py``)."""
