"""GLUE SST-2: binary sentence sentiment (0 = negative, 1 = positive). Metric: accuracy (and MCC).

SST-2 is one row of the GLUE table (``fedplora/tasks/glue.py``); this module keeps the names it
has always exported. Data: ``--data-dir FOLDER`` with GLUE's ``train.tsv`` and ``validation.tsv``
(header ``sentence<TAB>label``, no quoting), e.g. ``../shared/data/sst2``, or ``--dataset glue/sst2``
(the hub; needs the network). The held-out set is GLUE's ``validation`` split (872 sentences); a
labelled ``test.tsv`` beside them is not used.
"""

from __future__ import annotations

from pathlib import Path

from .glue import GLUE, GLUE_TASKS, data_help, hub_names
from .glue import read_tsv as _read_glue_tsv

SPEC = GLUE["sst2"]
LABELS = list(SPEC.labels)
HUB_NAMES = hub_names(SPEC)
HELP = data_help(SPEC)
SST2Task = GLUE_TASKS["sst2"]


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    """The sentences and label ids of an SST-2 TSV file."""
    texts, labels = _read_glue_tsv(path, SPEC)
    return [t[0] for t in texts], labels


__all__ = ["HELP", "HUB_NAMES", "LABELS", "SST2Task", "read_tsv"]
