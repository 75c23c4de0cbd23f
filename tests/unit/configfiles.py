"""Configuration folders for the config tests: agent.yaml and conf.d/, and the problems they give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config

MINIMAL_MAIN = {"couchdb": {"url": "http://127.0.0.1:5984"}, "state_dir": "state"}


def write_config_files(folder: Path, main_file: Any, sources: dict[str, Any],
                       mode: int | None = None) -> Path:
    """`folder`/agent.yaml (`main_file`, or MINIMAL_MAIN for None; chmod `mode` if given) and
    conf.d/NAME for each source; a string is written as it is, anything else as YAML."""
    (folder / "conf.d").mkdir(exist_ok=True)
    path = folder / "agent.yaml"
    body = MINIMAL_MAIN if main_file is None else main_file
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    if mode is not None:
        path.chmod(mode)
    for name, source in sources.items():
        (folder / "conf.d" / name).write_text(source if isinstance(source, str) else yaml.safe_dump(source))
    return path


def problems(path: Path) -> list[str]:
    """What `config.load` finds wrong with `path`, one string per problem."""
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    return [str(p) for p in info.value.problems]
