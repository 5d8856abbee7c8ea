"""Scheduling: the pure core (jobs, policy, scheduler) and its async runtime."""

from __future__ import annotations

from dispatcher.core import *  # noqa: F403
from dispatcher.core import __all__ as _core
from dispatcher.effects import *  # noqa: F403
from dispatcher.effects import __all__ as _effects
from dispatcher.errors import *  # noqa: F403
from dispatcher.errors import __all__ as _errors
from dispatcher.jobs import *  # noqa: F403
from dispatcher.jobs import __all__ as _jobs
from dispatcher.policy import *  # noqa: F403
from dispatcher.policy import __all__ as _policy
from dispatcher.stats import *  # noqa: F403
from dispatcher.stats import __all__ as _stats

__all__ = [*_core, *_effects, *_errors, *_jobs, *_policy, *_stats]
