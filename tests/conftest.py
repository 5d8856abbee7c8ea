"""Shared test configuration.

``tests/`` has no ``__init__.py``: pytest's default (prepend) import mode puts this directory on
``sys.path`` because of this file, so test modules import helpers as ``from fakes import ...``.
"""
