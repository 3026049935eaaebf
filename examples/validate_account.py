"""Validate a cloud account from Python, as the CLI does.

    python examples/validate_account.py examples/account.yaml

Connection settings come from KUBEGATE_* variables (see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from pathlib import Path

import yaml

from domain.account import CloudAccountSpec
from starters.client import KubegateClient


async def main(path: str) -> int:
    spec = CloudAccountSpec.model_validate(yaml.safe_load(Path(path).read_text()))
    password = os.environ.get(spec.vcenter.password_env or "") or getpass.getpass()
    client = await KubegateClient.connect()
    report = await client.validate_account(spec, password)
    for result in report.results:
        print(f"{result.status.value:7} {result.title:30} {result.object}  {result.detail}")
    print(f"passed={report.passed} vcenter_requests={report.vcenter_requests}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    code = asyncio.run(main(sys.argv[1]))
    sys.stdout.flush()
    # end without interpreter teardown: the Temporal client's native threads can abort it
    # (temporalio/sdk-python#300) and turn this exit code into SIGABRT
    os._exit(code)
