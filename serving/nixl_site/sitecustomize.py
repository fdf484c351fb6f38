"""Start-up hook of vLLM processes launched by Strata: NIXL's progress thread sleeps between polls.

NIXL's Python wrapper (1.5.1) builds every agent with ``pthrDelay = 0``: the UCX progress thread
then polls without pause for as long as the agent lives, 100% of a core per idle vLLM worker
with a ``NixlConnector`` (measured: 9.9 CPU-seconds in 10 idle seconds per worker; a prefill and
a decode worker took both cores of a 2-core host and starved their own API servers until health
checks failed). vLLM builds its agent through that wrapper and offers no knob for it.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one, and
vLLM's engine and worker processes inherit the environment, so each of them runs this module.
It watches for NIXL's API module (``nixl_cu12._api``, ``nixl_cu13._api``, ...) and, once it is
loaded, makes ``nixl_agent`` build its native config with ``pthrDelay`` set to
``STRATA_NIXL_PROGRESS_DELAY_US`` (100 us by default). Strata's own NIXL transport builds its
agents through ``construct_with_progress_delay`` here, so there is one way to do it.
The thread stays: without it a peer's READ of this process's KV blocks waits for a local poll.

Standard library only (vLLM's environment does not have Strata). Another ``sitecustomize`` later
on ``sys.path`` is run after this one, so nothing the environment had is lost.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import re
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

DELAY_ENV = "STRATA_NIXL_PROGRESS_DELAY_US"
DEFAULT_DELAY_US = 100  # Strata's own NIXL transport (serving/transfer/nixl_transport.py) too
_API_MODULE = re.compile(r"^nixl(_[a-z0-9]+)?\._api$")
_LOCK = threading.RLock()


def progress_delay_us() -> int:
    try:
        return max(0, int(os.environ.get(DELAY_ENV, str(DEFAULT_DELAY_US))))
    except ValueError:
        return DEFAULT_DELAY_US


def can_set_progress_delay(api: ModuleType) -> bool:
    """Whether ``api`` (``nixl._api``) builds its native config from a class this can swap."""
    return getattr(getattr(api, "nixlBind", None), "nixlAgentConfig", None) is not None


def construct_with_progress_delay(api: ModuleType, delay_us: int, construct: Callable[[], T]) -> T:
    """``construct()`` (which builds a ``nixl_agent``) with ``pthrDelay = delay_us`` reaching
    the native agent: the wrapper builds its ``nixlAgentConfig`` from the bindings module, so a
    subclass that replaces the ``pthrDelay`` it sets is swapped in while ``construct`` runs."""
    bindings = getattr(api, "nixlBind", None)
    base = getattr(bindings, "nixlAgentConfig", None)
    if base is None:
        return construct()
    with _LOCK:  # the swap is visible to every thread while the constructor runs
        bindings.nixlAgentConfig = _delayed_config(base, delay_us)
        try:
            return construct()
        finally:
            bindings.nixlAgentConfig = base


@functools.lru_cache(maxsize=8)
def _delayed_config(base: type, delay_us: int) -> type:
    class _DelayedProgressConfig(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: Any) -> None:
            super().__setattr__(key, delay_us if key == "pthrDelay" else value)

    return _DelayedProgressConfig


def patch_api(api: ModuleType, delay_us: int) -> bool:
    """Make every ``api.nixl_agent`` built from now on get ``pthrDelay = delay_us``."""
    agent = getattr(api, "nixl_agent", None)
    if not can_set_progress_delay(api) or agent is None:
        return False
    if getattr(agent, "_strata_delay_us", None) is not None:
        return False
    original_init = agent.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        construct_with_progress_delay(api, delay_us, lambda: original_init(self, *args, **kwargs))

    agent.__init__ = __init__
    agent._strata_delay_us = delay_us
    return True


class _NixlApiFinder(importlib.abc.MetaPathFinder):
    """Finds NIXL's API module with the other finders and patches it right after it runs."""

    def __init__(self, delay_us: int) -> None:
        self.delay_us = delay_us

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not _API_MODULE.match(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, self.delay_us)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, delay_us: int) -> None:
        self._loader = loader
        self._delay_us = delay_us

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        patch_api(module, self._delay_us)


def _run_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_strata_next_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


def install() -> None:
    delay_us = progress_delay_us()
    if delay_us > 0 and not any(isinstance(f, _NixlApiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _NixlApiFinder(delay_us))


if __name__ == "sitecustomize":
    install()
    _run_next_sitecustomize()
