"""How a round's replies become the next global state: validate, encode, reduce, decode.

``contributions.py`` the one layout a reply is encoded into (shared with SecAgg+); ``reducers.py`` the ways of
combining (mean, robust rules, central DP); ``pipeline.py`` the one path through them and the secure round's two
ends; ``validation.py`` the checks every reply passes first. A method (``fedplora.methods``) supplies only its
maths: ``encode`` and ``decode`` (or ``combine`` in product space).
"""

from .contributions import (
    COUNT_SUFFIX,
    HEADS_COUNT,
    HEADS_WEIGHT,
    MEAN,
    STEPS,
    SUMS,
    WEIGHT_SUFFIX,
    Contribution,
    Reduced,
    apply_heads,
    apply_mean,
    apply_sums,
    deltas_in_layout,
    layout,
    pair_contribution,
)
from .pipeline import aggregate, check_secure_sums, reducer_for, refusal, secure_decode, secure_upload
from .reducers import Mean, Private, Reducer, Robust, dp_upload
from .server_opt import SERVER_OPTIMIZERS, ServerOptimizer

__all__ = ["COUNT_SUFFIX", "Contribution", "HEADS_COUNT", "HEADS_WEIGHT", "MEAN", "Mean", "Private", "Reduced",
           "Reducer", "Robust", "STEPS", "SUMS", "WEIGHT_SUFFIX", "aggregate", "apply_heads", "apply_mean", "apply_sums", "check_secure_sums", "deltas_in_layout",
           "dp_upload", "SERVER_OPTIMIZERS", "ServerOptimizer", "layout", "pair_contribution", "reducer_for", "refusal", "secure_decode", "secure_upload"]
