"""The llmtrace terminal UI (Textual): a finished run or a live one, at a glance.

`feed.py` tails the spool files, `model.py` aggregates them, `app.py` lays out one widget
per file. Importing `llmtrace` never imports this package (nor textual)."""
