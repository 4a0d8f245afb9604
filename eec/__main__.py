"""``python -m eec``: the command line, where the ``eec`` script is not on the PATH."""

from eec.cli.main import app

app()
