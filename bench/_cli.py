"""The --help layout every bench/ script shares."""

import argparse


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (its example commands keep their lines), and each flag's default
    after its help text."""
