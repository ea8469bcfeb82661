"""GLUE SST-2: binary sentence sentiment (0 = negative, 1 = positive). Metric: accuracy (and MCC).

SST-2 is one row of the GLUE table (``fedplora/tasks/glue.py``); ``SST2Task`` keeps the import path
it has always had. Data: ``--data-dir FOLDER`` with GLUE's ``train.tsv`` and ``validation.tsv``
(header ``sentence<TAB>label``, no quoting), e.g. ``../shared/data/sst2``, or ``--dataset glue/sst2``
(the hub; needs the network). The held-out set is GLUE's ``validation`` split (872 sentences); a
labelled ``test.tsv`` beside them is not used.
"""

from .glue import GLUE_TASKS

SST2Task = GLUE_TASKS["sst2"]

__all__ = ["SST2Task"]
