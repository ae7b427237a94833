"""The engine's `llmtrace` subcommands (`run`, `serve`), registered with the CLI through
the `llmtrace.commands` entry points in pyproject.toml: the library knows no engine."""
