"""One module per `llmtrace` subcommand, each with `main(args) -> exit code`."""
