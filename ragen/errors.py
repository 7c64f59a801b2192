"""Errors a user can act on.

Every failure that comes from bad input (a missing file, a checkpoint in the wrong layout, an index built
with another encoder) is raised as a :class:`RagenError` subclass with a one-line message that names the
thing at fault and what was expected. The CLI prints that line and exits non-zero; library users catch
``RagenError``. Anything else escaping is a bug.
"""

from __future__ import annotations


class RagenError(Exception):
    """Base class for errors caused by input the user controls."""


class CheckpointError(RagenError):
    """A checkpoint or model could not be loaded: missing or invalid files, unknown settings."""


class EncoderSpecError(RagenError):
    """An encoder spec string did not resolve to a known encoder form."""


class StoreError(RagenError):
    """An on-disk index is missing, corrupt, locked, or does not match the encoder in use."""


class DataError(RagenError):
    """Input data (documents, benchmark files, training queries) is missing or malformed."""


DISTRIBUTION = "ragen-toolkit"  # the PyPI name ("ragen" there is an unrelated project); the import name is ragen


def install_hint(extra: str) -> str:
    """How to install an optional extra, from PyPI and from a checkout; every error that asks for an extra
    says it this way (the CLI escapes rich markup, so the brackets survive)."""
    return f'pip install "{DISTRIBUTION}[{extra}]" (from a checkout: pip install -e ".[{extra}]")'
