"""The node side, packaged for the hub as the package ``bootstrap``.

``bootstrap.py`` is the node script itself: one file, standard library only, Python >= 3.6,
fetched by nodes from the hub (``GET /bootstrap.py``) or carried in cloud-init user data. The
hub imports it as ``bootstrap.bootstrap`` for the facts both sides share (validators, defaults,
distro and init knowledge) and sends its bytes, read by ``script_source()``, to nodes.
This file is for the package only: nodes never need it.
"""

from importlib import resources


def script_source() -> bytes:
    """The bytes of bootstrap.py exactly as nodes receive them."""
    return resources.files(__name__).joinpath("bootstrap.py").read_bytes()
