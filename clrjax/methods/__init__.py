"""The method registry: ``get(config.method)`` -> a :class:`Method` (see ``base.py``).

Adding a method: write one module that defines ``METHOD`` (a :class:`Method`
instance) and add one line below, or register it at run time with
``METHODS.register(...)``, or name its module path in the config
(``--config.method=my_pkg.my_method``). See docs/ADDING_A_METHOD.md.
"""
from clrjax.methods.base import PARAM_GROUPS, Method
from clrjax.registry import Registry, UnknownNameError

METHODS = Registry("method", {
    "simclr": "clrjax.methods.simclr:METHOD",
    "barlow_twins": "clrjax.methods.barlow_twins:METHOD",
    "vicreg": "clrjax.methods.vicreg:METHOD",
    "tico": "clrjax.methods.tico:METHOD",
    "supcon": "clrjax.methods.supcon:METHOD",
    "supervised": "clrjax.methods.supervised:METHOD",
    "byol": "clrjax.methods.byol:METHOD",
    "moco_v3": "clrjax.methods.moco_v3:METHOD",
    "moco_v2": "clrjax.methods.moco_v2:METHOD",
    "clip": "clrjax.methods.clip:METHOD",
    "siglip": "clrjax.methods.siglip:METHOD",
}, attribute="METHOD")


def get(name) -> Method:
    """The registered method called ``name`` (or defined by the module at that path)."""
    return METHODS.get(name)


def names():
    return METHODS.names()


__all__ = ["METHODS", "Method", "PARAM_GROUPS", "UnknownNameError", "get", "names"]
