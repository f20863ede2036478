"""Examples that run against this repository (importable from its root: ``examples.my_rewards``)."""
