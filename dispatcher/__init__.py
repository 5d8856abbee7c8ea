"""Scheduling: the pure core (jobs, policy, scheduler) and its async runtime."""

from __future__ import annotations

from dispatcher.core import *  # noqa: F403
from dispatcher.core import __all__ as _core
from dispatcher.effects import *  # noqa: F403
from dispatcher.effects import __all__ as _effects
from dispatcher.errors import *  # noqa: F403
from dispatcher.errors import __all__ as _errors
from dispatcher.exchange import *  # noqa: F403
from dispatcher.exchange import __all__ as _exchange
from dispatcher.jobs import *  # noqa: F403
from dispatcher.jobs import __all__ as _jobs
from dispatcher.ledger import *  # noqa: F403
from dispatcher.ledger import __all__ as _ledger
from dispatcher.policy import *  # noqa: F403
from dispatcher.policy import __all__ as _policy
from dispatcher.stats import *  # noqa: F403
from dispatcher.stats import __all__ as _stats

__all__ = [*_core, *_effects, *_errors, *_exchange, *_jobs, *_ledger, *_policy, *_stats]
