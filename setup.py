"""Shim for tools that call setup.py directly; the package metadata lives in pyproject.toml.

  pip install -e .            # editable install (reads pyproject.toml)
  python setup.py --version
"""
from setuptools import setup

setup()
