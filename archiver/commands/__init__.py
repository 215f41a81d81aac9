"""The CLI's subcommands, one module each; ``archiver.cli`` imports them on demand."""
