"""Send one request to a faasd agent as whoever runs this: the tests run it as the faas
user (setpriv --reuid=faas), which is what an attacker holds after compromising the
controller.

    python rogue.py RUN_DIR SERVICE OP ARGS_JSON

Prints one JSON object: {"ok": true, "result": ...} or {"ok": false, "code", "message"}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from common.errors import FaasError
from common.rpc import Client


async def main(run_dir: str, service: str, op: str, args: dict) -> dict:
    client = Client(service, run_dir, retries=0)
    try:
        return {"ok": True, "result": await client.call(op, args, timeout=10.0)}
    except FaasError as exc:
        return {"ok": False, "code": exc.code.value, "message": exc.message}
    finally:
        client.close()


if __name__ == "__main__":
    run_dir, service, op, args = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(run_dir, service, op, json.loads(args)))))
