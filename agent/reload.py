"""What a configuration reload changes: the pure plan, and the load that checks like `agent check`.

A reload (SIGHUP, or `agent reload`) applies the sources (`conf.d`), which
may be added, removed or changed in any key, and the keys only other
commands or the shutdown read (`status.*`, `reader.*`, `shutdown_timeout`).
Every other main-file setting (`couchdb`, `shipping`, `spool`, `host`,
`log.*`, `scan_interval`, `poll_interval`, `on_corrupt_state`) is built into
running parts or into the documents, so a change to one is applied at the
next restart only; the reload says which (`restart_only`). A new `state_dir`
refuses the reload: `agent status` and `agent reload` find the running agent
through it, and its offsets and spools are there, so it moves only with a
restart (and the folder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from agent import config as config_module
from agent.config import AgentConfig, ConfigError, Problem, SourceConfig

APPLIED_AT_RELOAD = frozenset({"sources", "sources_dir", "status", "reader", "shutdown_timeout",
                               "warnings", "path"})
"""`AgentConfig` fields a reload applies; a change to any other waits for a restart."""
KEY_NAMES = {"log_level": "log.level", "log_format": "log.format"}
"""Config key paths of the fields whose name differs from the key."""


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The configuration to run after a reload and what changed, by source name."""

    config: AgentConfig
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    restart_only: tuple[str, ...]
    """Keys whose new value is ignored until the agent restarts."""

    @property
    def restarted(self) -> tuple[str, ...]:
        """Sources whose tailers stop now: removed ones, and changed ones (then started anew)."""
        return self.removed + self.changed

    def source(self, name: str) -> SourceConfig:
        return next(s for s in self.config.sources if s.name == name)


def plan(current: AgentConfig, loaded: AgentConfig) -> ReloadPlan:
    """What reloading `loaded` over the running `current` does. Pure."""
    applied = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(AgentConfig)
               if f.name in APPLIED_AT_RELOAD}
    restart_only = tuple(KEY_NAMES.get(f.name, f.name) for f in dataclasses.fields(AgentConfig)
                         if f.name not in APPLIED_AT_RELOAD
                         and getattr(loaded, f.name) != getattr(current, f.name))
    old = {s.name: s for s in current.sources}
    new = {s.name: s for s in loaded.sources}
    return ReloadPlan(
        config=dataclasses.replace(current, **applied),
        added=tuple(n for n in new if n not in old),
        removed=tuple(n for n in old if n not in new),
        changed=tuple(n for n in new if n in old and new[n] != old[n]),
        restart_only=restart_only)


def load(current: AgentConfig, path: Path) -> ReloadPlan:
    """Load `path` and check it as `agent check` does, against the running state_dir; raise
    ConfigError with the same problems. Blocking."""
    loaded = config_module.load(path)
    if loaded.state_dir != current.state_dir:
        raise ConfigError([Problem(path, "state_dir", f"cannot change while the agent runs (it "
                                   f"runs with {current.state_dir}): its offsets, spools and "
                                   "status are there. Put it back and reload, or stop the agent, "
                                   "move the folder and start it again")])
    reloaded = plan(current, loaded)
    unsafe = config_module.globs_reaching(reloaded.config)
    if unsafe:
        raise ConfigError(unsafe)
    return reloaded
