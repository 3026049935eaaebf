"""The baseline: a straightforward sequential pyvmomi script doing a deploy's vCenter work.

    uv run python -m bench.sequential [--nodes 6] [--delays clone=2000,...]

For each node, one after the other: CloneVM_Task, ReconfigVM_Task (size, guestinfo),
CustomizeVM_Task (hostname, static address), PowerOnVM_Task, each waited with pyVim's
`WaitForTask`; then (unless --keep) power off and destroy every VM and the folder. Started
alone it brings its own simulator and counting proxy; bench/deploy.py calls `run_sequential`
against its own.
"""

# mypy: disable-error-code="no-untyped-call"
# (pyVmomi builds its types at run time, as in activities/)
from __future__ import annotations

import argparse
import json
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from bench.vcproxy import DEFAULT_DELAYS, ProxyProcess, parse_delays, start_proxy, start_simulator
from tests.support import ADMIN, TEMPLATE


def _customization(name: str, address: str) -> Any:
    return vim.vm.customization.Specification(
        identity=vim.vm.customization.LinuxPrep(
            hostName=vim.vm.customization.FixedName(name=name), domain="local"
        ),
        globalIPSettings=vim.vm.customization.GlobalIPSettings(dnsServerList=["10.0.0.53"]),
        nicSettingMap=[
            vim.vm.customization.AdapterMapping(
                adapter=vim.vm.customization.IPSettings(
                    ip=vim.vm.customization.FixedIp(ipAddress=address),
                    subnetMask="255.255.255.0",
                    gateway=["10.60.0.1"],
                )
            )
        ],
    )


def run_sequential(
    proxy: ProxyProcess, password: str, nodes: int = 6, delete: bool = True
) -> dict[str, Any]:
    """Deploy `nodes` VMs one by one through the proxy; wall time and requests per phase."""
    before = proxy.snapshot()
    start = time.perf_counter()
    si = SmartConnect(
        host="127.0.0.1",
        port=proxy.port,
        user=ADMIN,
        pwd=password,
        sslContext=ssl._create_unverified_context(),  # noqa: S323 - our own proxy
    )
    try:
        content = si.RetrieveContent()
        find = content.searchIndex.FindByInventoryPath
        template = find(f"/DC0/vm/{TEMPLATE}")
        folder = find("/DC0/vm").CreateFolder("sequential")
        pools = [find("/DC0/host/DC0_C0/Resources"), find("/DC0/host/DC0_C1/Resources")]
        datastore = find("/DC0/datastore/LocalDS_0")
        vms = []
        for i in range(nodes):
            name = f"seq-{i}"
            spec = vim.vm.CloneSpec(
                location=vim.vm.RelocateSpec(pool=pools[i % 2], datastore=datastore),
                powerOn=False,
                template=False,
            )
            task = template.CloneVM_Task(folder=folder, name=name, spec=spec)
            WaitForTask(task)
            vm = task.info.result
            config = vim.vm.ConfigSpec(
                numCPUs=2,
                memoryMB=4096,
                extraConfig=[vim.option.OptionValue(key="guestinfo.metadata", value="e30=")],
            )
            WaitForTask(vm.ReconfigVM_Task(config))
            WaitForTask(vm.CustomizeVM_Task(_customization(name, f"10.60.0.{10 + i}")))
            WaitForTask(vm.PowerOnVM_Task())
            vms.append(vm)
        deployed = proxy.snapshot()
        result: dict[str, Any] = {
            "nodes": nodes,
            "deploy_seconds": round(time.perf_counter() - start, 3),
            "deploy_requests": (deployed - before).total,
            "deploy_by_method": dict((deployed - before).counts.most_common()),
        }
        if delete:
            start = time.perf_counter()
            for vm in vms:
                WaitForTask(vm.PowerOffVM_Task())
                WaitForTask(vm.Destroy_Task())
            WaitForTask(folder.Destroy_Task())
            deleted = proxy.snapshot()
            result["delete_seconds"] = round(time.perf_counter() - start, 3)
            result["delete_requests"] = (deleted - deployed).total
            result["delete_by_method"] = dict((deleted - deployed).counts.most_common())
        return result
    finally:
        Disconnect(si)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--delays", default=DEFAULT_DELAYS)
    parser.add_argument("--keep", action="store_true", help="do not delete the VMs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-seq-"))
    sim = start_simulator(work, parse_delays(args.delays))
    proxy = start_proxy(sim.address)
    try:
        print(json.dumps(run_sequential(proxy, sim.password, args.nodes, not args.keep), indent=2))
    finally:
        proxy.stop()
        sim.stop()


if __name__ == "__main__":
    main()
