#!/usr/bin/env python3
"""Container health check: exit 0 when this replica answers GET /healthz, else 1.

The standard library only (no curl in a slim image). Liveness, not readiness: a replica
that is still loading its models is alive, and nginx retries its 503s elsewhere.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("PROMPTSWAP_PORT", "8000")
    # No proxy: an HTTP_PROXY set for model downloads must not capture a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTP error status
        print(f"promptswap unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
