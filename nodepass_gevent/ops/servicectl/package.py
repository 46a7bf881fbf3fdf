"""The package's own parsing (nodepass_gevent.config, .tunnelset), found and imported.

nodepass-service checks URLs and variables with the code the tunnels will run,
wherever it is: this checkout, this Python's path, or what install put under
PREFIX (a venv, or the pyz).
"""

import importlib
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

from nodepass_gevent.ops.servicectl.layout import CHECKOUT, Layout
from nodepass_gevent.ops.servicectl.output import PROG, ServiceError

_PACKAGE = {}  # type: Dict[str, Optional[ModuleType]]


def package_config(layout: Layout) -> Optional[ModuleType]:
    """nodepass_gevent.config, or None if this Python cannot import it.

    Looked for in this checkout first (the code this script came with), then
    wherever this Python finds it, then in what install put under PREFIX: the
    venv, or the pyz (whose pure-Python parts zipimport can read).
    """
    if "config" not in _PACKAGE:
        _PACKAGE["config"] = None
        for paths in package_locations(layout):
            config = import_config(paths)
            if config is not None:
                _PACKAGE["config"] = config
                break
    return _PACKAGE["config"]


def package_locations(layout: Layout) -> List[List[str]]:
    locations = [[]]  # type: List[List[str]]
    if (CHECKOUT / "nodepass_gevent" / "config.py").is_file():
        locations.insert(0, [str(CHECKOUT)])
    venv = layout.disk(layout.venv)
    locations += [[str(site)] for site in sorted(venv.glob("lib/python3*/site-packages"))]
    pyz = layout.disk(layout.pyz)
    if pyz.is_file():
        locations.append(pyz_pure_folders(pyz))
    return locations


def pyz_pure_folders(pyz: Path) -> List[str]:
    """The pyz's wheel folders holding the package and, for 3.6, dataclasses."""
    try:
        with zipfile.ZipFile(str(pyz)) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return []
    folders = set()
    for name in names:
        for module in ("/nodepass_gevent/config.py", "/dataclasses.py"):
            if name.startswith("wheels/") and name.endswith(module):
                folders.add(str(pyz / name[:-len(module)]))
    return sorted(folders)


def import_config(paths: List[str]) -> Optional[ModuleType]:
    """nodepass_gevent.config found first in ``paths``; None (and sys.path as it
    was) if it does not import or is too old to have the settings table."""
    sys.path[:0] = paths
    try:
        from nodepass_gevent import config
        if hasattr(config, "SETTINGS"):
            return config
    except (ImportError, SyntaxError):  # missing dependencies, or a Python too old for it
        pass
    del sys.path[:len(paths)]
    for name in [name for name in sys.modules if name.split(".")[0] == "nodepass_gevent"]:
        del sys.modules[name]
    return None


def need_package(layout: Layout) -> ModuleType:
    config = package_config(layout)
    if config is None:
        raise ServiceError("{} cannot import nodepass_gevent (with its dependencies) from "
                           "this checkout, its path or {}: run `{} install` first".format(
                               sys.executable, layout.disk(layout.prefix), PROG))
    return config


def settings_by_name(config: ModuleType) -> Dict[str, object]:
    return {setting.name: setting for setting in config.SETTINGS}


def duration_ms(config: ModuleType, text: str) -> float:
    """A Go duration in milliseconds, parsed as the tunnel will parse it."""
    return config.parse_duration(text) * 1000


def tunnelset_module() -> Optional[ModuleType]:
    """nodepass_gevent.tunnelset (per-tunnel settings, tunnels files), or None if
    the package found is older than it."""
    try:
        return importlib.import_module("nodepass_gevent.tunnelset")
    except ImportError:
        return None


def effective_settings(config: ModuleType, variables: Dict[str, str]) -> object:
    """The process-wide settings the instance gets from its --env variables."""
    names = settings_by_name(config)
    return config.load_settings({k: v for k, v in variables.items() if k in names})
