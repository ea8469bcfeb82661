"""The one rule for a setting that is either a local path or a hub name (``model``, ``dataset``).

* **local**: ``ref`` (with ``~`` expanded) is an existing file or folder. An existing path always
  wins, so a local folder called ``org/name`` is read from disk.
* **hub**: otherwise, ``ref`` has the form of a Hugging Face hub name: ``org/name``, or
  ``org/name/config`` for a dataset configuration (``nyu-mll/glue/sst2``). Each part starts with a
  letter or digit and holds letters, digits, ``_``, ``.`` and ``-``, so ``./x``, ``../x``, ``/x``,
  ``~/x`` and bare words like ``bert`` are never hub names.
* **missing**: anything else, i.e. a path that does not exist.

Config validation, the model loaders and the tasks that read ``dataset`` all call ``ref_kind``;
``missing_message`` is the one line they report for a missing reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*){1,2}")

RefKind = Literal["local", "hub", "missing"]


def local_path(ref: str) -> Path:
    """``ref`` as a local path (``~`` expanded)."""
    return Path(ref).expanduser()


def is_hub_name(ref: str) -> bool:
    return bool(HUB_NAME.fullmatch(ref))


def ref_kind(ref: str) -> RefKind:
    """``"local"``, ``"hub"`` or ``"missing"`` (see the module docstring)."""
    if local_path(ref).exists():
        return "local"
    return "hub" if is_hub_name(ref) else "missing"


def missing_reason(ref: str, local: str = "local path") -> str:
    """Why a ``"missing"`` reference is refused (``local``: what a local one would be)."""
    return f"{ref!r} is neither an existing {local} nor a hub name (org/name): the path does not exist"


def missing_message(setting: str, ref: str, local: str = "local path") -> str:
    """The one-line message for a ``"missing"`` reference, naming the setting."""
    return f"{setting}: {missing_reason(ref, local)}"
