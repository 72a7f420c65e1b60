from normopt.cli import entry

entry()
