"""How the Regularizer describes itself in its log lines: the penalty as the fit uses it."""

from __future__ import annotations

import re

from lightreg.penalties.contract import Penalty


def penalty_in_use(penalty: Penalty, target: object) -> str:
    """The penalty as the fit uses it: with a target, alpha is the target's at every step, not the configured one.

    Example:
        >>> from lightreg.penalties.elastic_net import ElasticNet
        >>> penalty_in_use(ElasticNet(1e-3, 0.5), None), penalty_in_use(ElasticNet(1e-3, 0.5), object())
        ('ElasticNet(alpha=0.001, l1_ratio=0.5)', 'ElasticNet(alpha=set by the target, l1_ratio=0.5)')
    """
    text = repr(penalty)
    return text if target is None else re.sub(r"alpha=[^,)]*", "alpha=set by the target", text, count=1)
