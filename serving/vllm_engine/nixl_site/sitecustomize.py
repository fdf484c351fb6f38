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
``STRATA_NIXL_PROGRESS_DELAY_US`` (the delay Strata's own NIXL transport uses, 100 us by default).
The thread stays: without it a peer's READ of this process's KV blocks waits for a local poll.

Standard library only (vLLM's environment does not have Strata). Another ``sitecustomize`` later
on ``sys.path`` is run after this one, so nothing the environment had is lost.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import threading
from types import ModuleType
from typing import Any

DELAY_ENV = "STRATA_NIXL_PROGRESS_DELAY_US"
_API_MODULE = re.compile(r"^nixl(_[a-z0-9]+)?\._api$")
_LOCK = threading.Lock()


def progress_delay_us() -> int:
    try:
        return max(0, int(os.environ.get(DELAY_ENV, "100")))
    except ValueError:
        return 100


def patch_api(api: ModuleType, delay_us: int) -> bool:
    """Make ``api.nixl_agent`` build its native config with ``pthrDelay = delay_us``."""
    bindings = getattr(api, "nixlBind", None)
    base = getattr(bindings, "nixlAgentConfig", None)
    agent = getattr(api, "nixl_agent", None)
    if base is None or agent is None or getattr(agent, "_strata_delay_us", None) is not None:
        return False

    class _DelayedProgressConfig(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key: str, value: Any) -> None:
            super().__setattr__(key, delay_us if key == "pthrDelay" else value)

    original_init = agent.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with _LOCK:  # the swap is visible to every thread while the constructor runs
            bindings.nixlAgentConfig = _DelayedProgressConfig
            try:
                original_init(self, *args, **kwargs)
            finally:
                bindings.nixlAgentConfig = base

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
