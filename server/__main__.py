"""`python -m embserve.server [flags]`: the same as `embserve serve [flags]`."""

import argparse
import sys

from .cli import serve_command

parser = argparse.ArgumentParser(prog="python -m embserve.server", description=serve_command.__doc__)
sys.exit(serve_command(parser)(parser.parse_args()))
