"""The numbers of one pairs set from its embeddings: cosines, insightface's 10-fold accuracy and
VAL@FAR, ROC TAR@FAR, the set's own best single threshold, and accuracy/TAR/FAR at the global one
(docs/metrics.md §2-§3). The 10-fold number refits its threshold per fold, so it is reported beside,
never instead of, the global-threshold accuracy.
"""
from __future__ import annotations

import numpy as np

from facebce.eval.protocols import Protocol
from facebce.eval.results import PairSetResult
from facebce.eval.roc import FAR_TARGETS, Roc
from facebce.eval.tenfold import ten_fold
from facebce.eval.verification import accuracy_at_threshold, best_threshold


def cosines(emb: np.ndarray) -> np.ndarray:
    """Cosine of each pair (rows 2k, 2k+1 of L2-normalised embeddings), in float64."""
    e = emb.astype(np.float64)
    return np.sum(e[0::2] * e[1::2], axis=1)


def pair_set_result(protocol: Protocol, path: str, issame: np.ndarray, emb: np.ndarray, t: float,
                    far_targets, tar_mode: str) -> PairSetResult:
    """Score a pairs set (2P x D unit rows, pair k = rows 2k and 2k+1) with the protocol's metrics at threshold t."""
    scores = cosines(emb)
    tenfold = ten_fold(emb[0::2], emb[1::2], issame, n_folds=protocol["folds"]) \
        if "ten_fold" in protocol.metrics else None
    tar = None
    if "tar_at_far" in protocol.metrics and 0 < issame.sum() < issame.size:
        tar = Roc.from_labels(scores, issame).tar_at_far(far_targets if far_targets is not None else FAR_TARGETS,
                                                          tar_mode)
    return PairSetResult(name=protocol.name, path=path, n_pairs=int(issame.size), n_genuine=int(issame.sum()),
                         embedding_size=int(emb.shape[1]), scores=scores, issame=issame,
                         best=best_threshold(scores, issame), at_global=accuracy_at_threshold(scores, issame, t),
                         ten_fold=tenfold, tar_at_far=tar)
