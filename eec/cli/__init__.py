"""The `eec` command line: a thin typer app over the library."""
