"""One module per group of `fp6llm` subcommands; each registers itself with fp6llm.cli.command."""
