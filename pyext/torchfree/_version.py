"""The version of torchfree, in one place: pyproject.toml reads it from here (setuptools
``attr``, statically, so no build has to import the C module)."""

__version__ = "0.1.0"
