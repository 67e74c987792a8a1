"""flowalign.apps: the front-ends behind ``flowalign <command>`` (demo, sample, eval, the Gradio app, bench). Only
flowalign.cli imports them; the library never does."""

__all__ = ["bench", "demo", "eval", "gradio_app", "sample"]  # submodules
