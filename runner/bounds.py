"""What the runner accepts in a sync: the bounds root sets, not the controller.

The controller runs as the ``faas`` user, and whoever holds that user can send the
runner any sync the schema allows. So before anything changes, every function is held to
limits only root sets (the settings file): its address inside ``function_prefix`` (the
runner listens there, on the ports of its settings), its settings within the
per-function table and this host's maxima, its env free of the loader's (``LD_*``) and
faasd's (``FAAS_*``) names (:func:`common.fnsettings.check_values`). What a container
runs, as whom, is not in a spec at all: the runner reads it from its own record of the
image (:meth:`runner.store.ImageStore.config_of`). One bad function refuses the whole
sync, and nothing has changed.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from common import fnsettings
from common.errors import Code, FaasError


def check_state(state: Mapping[str, Any], prefix: ipaddress.IPv6Network,
                maxima: Mapping[str, float]) -> None:
    """Raise forbidden (outside root's bounds) or bad_request (malformed) for the first
    function that does not fit; errors name the function and field, never an env value."""
    names: set[str] = set()
    addresses: set[ipaddress.IPv6Address] = set()
    for i, spec in enumerate(state["functions"]):
        name, where = spec["name"], f"functions[{i}]"
        ip = ipaddress.IPv6Address(spec["address"])
        if ip not in prefix or ip == prefix.network_address:
            raise FaasError(Code.FORBIDDEN, f"function {name}: address {ip} is not a function "
                            f"address of {prefix} (function_prefix)",
                            {"field": f"{where}.address", "function": name})
        if name in names or ip in addresses:
            raise FaasError(Code.BAD_REQUEST, f"function {name} or address {ip} appears twice",
                            {"field": where, "function": name})
        names.add(name)
        addresses.add(ip)
        try:
            fnsettings.check_values(spec["settings"], maxima, f"{where}.settings")
        except FaasError as exc:
            exc.message = f"function {name}: {exc.message}"
            exc.details["function"] = name
            raise
