"""flowalign.evaluation: held-out evaluation (``heldout.HeldoutEval``; sampling with fixed seeds in ``sampling``) and
the pictures people look at (``report``: reward curves and image grids as PNG)."""

__all__ = ["heldout", "report", "sampling"]  # submodules
