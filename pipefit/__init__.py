"""pipefit: make a diffusers pipeline fit, and run well, on the hardware at hand.

One import package: ``pipefit.tools`` (the tool functions), ``pipefit.mcp_server`` and
``pipefit.skills`` are the repository's ``tools/``, ``mcp_server/`` and ``skills/`` folders, mapped
by setuptools' ``package-dir`` in a wheel and in an editable install.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# A source checkout used without installing it (the GPU machine puts the repository on PYTHONPATH):
# the subpackages are the folders beside this one.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "tools" / "__init__.py").is_file() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))
