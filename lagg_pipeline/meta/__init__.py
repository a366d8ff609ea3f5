"""Meta-training learned aggregators with truncated PES (SPEC section 4)."""
