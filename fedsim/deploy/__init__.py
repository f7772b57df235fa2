"""Running fedsim on real machines: a Flower SuperLink and its SuperNodes."""
