#!/usr/bin/env python3
"""End-to-end check of kubegate's vcsim wrapper with a real pyvmomi client.

Usage: python tools/vcsim/selfcheck.py [--binary .kubegate/bin/vcsim] [-v]

Starts its own simulator(s) on port 0 with -ready-file, runs the checks, prints one
PASS/FAIL line per check and exits non-zero if any check failed.
Needs only the standard library and pyvmomi.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback

try:
    from pyVim.connect import Disconnect, SmartConnect, SmartStubAdapter
    from pyVim.task import WaitForTask
    from pyVmomi import vim, vmodl
except ImportError:  # pragma: no cover
    print("FAIL import pyvmomi: pip install pyvmomi")
    sys.exit(2)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = "administrator@vsphere.local"
ADMIN_PW = "kubegate-dev-password"
BOB, BOB_PW = "bob@vsphere.local", "bob-pw"
CAROL, CAROL_PW = "carol@vsphere.local", "carol-pw"
TEMPLATE = "ubuntu-2204-kube-v1.30"
TEMPLATE_PATH = "/DC0/vm/templates/" + TEMPLATE

RESULTS = []
VERBOSE = False


def check(name, ok, detail=""):
    ok = bool(ok)
    RESULTS.append((name, ok))
    line = ("PASS " if ok else "FAIL ") + name
    if detail and (not ok or VERBOSE):
        line += ": " + str(detail)
    print(line, flush=True)
    return ok


def section(name, fn, *args):
    try:
        fn(*args)
    except Exception as e:
        check(name + " (no exception)", False, f"{type(e).__name__}: {e}")
        if VERBOSE:
            traceback.print_exc()


class Sim:
    """A vcsim process started with -ready-file on port 0."""

    def __init__(self, binary, workdir, *extra):
        self.workdir = workdir
        self.ready_file = os.path.join(workdir, f"ready-{id(self)}.json")
        self.cert_file = os.path.join(workdir, f"cert-{id(self)}.pem")
        self.log_file = os.path.join(workdir, f"vcsim-{id(self)}.log")
        args = [binary, "-listen", "127.0.0.1:0", "-ready-file", self.ready_file]
        if "-tls=false" not in extra:
            args += ["-cert-out", self.cert_file]
        args += list(extra)
        self.args = args
        self.stdout_lines = []
        self._log = open(self.log_file, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.time() + 90
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vcsim exited with {self.proc.returncode}, log:\n{self.log()}")
            if time.time() > deadline:
                raise RuntimeError(f"vcsim not ready after 90s, log:\n{self.log()}")
            time.sleep(0.05)
        with open(self.ready_file) as f:
            self.info = json.load(f)
        # the ready line is printed right after the ready file is written
        deadline = time.time() + 10
        while (
            not any(line.startswith("vcsim ready ") for line in self.stdout_lines)
            and time.time() < deadline
        ):
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))

    def log(self):
        try:
            with open(self.log_file) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def ssl_context(self):
        if not self.info["tls"]:
            return None
        ctx = ssl.create_default_context(cafile=self.cert_file)
        return ctx

    def connect(self, user=ADMIN, pwd=ADMIN_PW):
        return SmartConnect(
            host=self.info["host"],
            port=self.info["port"],
            user=user,
            pwd=pwd,
            protocol="https" if self.info["tls"] else "http",
            sslContext=self.ssl_context(),
        )

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def find(si, path):
    return si.content.searchIndex.FindByInventoryPath(path)


def retrieve(si, objs, obj_type, paths):
    """Property collector read: {obj: {path: value}} (missing paths absent)."""
    pc = si.content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=o) for o in objs],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=paths)],
    )
    out = {}
    for oc in pc.RetrieveContents([spec]):
        out[oc.obj] = {p.name: p.val for p in (oc.propSet or [])}
    return out


def all_of(si, vimtype):
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vimtype], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()


def wait_task(task):
    WaitForTask(task)
    return task.info.result


# --------------------------------------------------------------------------- checks


def check_ready(sim):
    info = sim.info
    check(
        "ready file has url/host/port/tls/thumbprints/version/username",
        all(
            k in info
            for k in (
                "url",
                "host",
                "port",
                "tls",
                "thumbprint_sha256",
                "thumbprint_sha1",
                "version",
                "username",
            )
        ),
        info,
    )
    check("ready file has no password", ADMIN_PW not in json.dumps(info))
    check("ready url", info["url"] == f"https://127.0.0.1:{info['port']}/sdk", info["url"])
    lines = [line for line in sim.stdout_lines if line.startswith("vcsim ready ")]
    check(
        "ready line printed",
        lines
        and lines[0]
        == "vcsim ready url={} thumbprint-sha256={}".format(info["url"], info["thumbprint_sha256"]),
        lines,
    )
    pem = ssl.get_server_certificate((info["host"], info["port"]))
    der = ssl.PEM_cert_to_DER_cert(pem)
    fp256 = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    sha1 = hashlib.sha1(der).digest()  # noqa: S324 - vSphere's SHA-1 thumbprint format
    fp1 = ":".join(f"{b:02X}" for b in sha1)
    check(
        "TLS sha256 thumbprint matches served certificate",
        fp256 == info["thumbprint_sha256"],
        "{} != {}".format(fp256, info["thumbprint_sha256"]),
    )
    check("TLS sha1 thumbprint matches served certificate", fp1 == info["thumbprint_sha1"])


def check_login(sim):
    si = sim.connect()
    about = si.content.about
    check("about.version", about.version == "8.0.2", about.version)
    check("about.build", about.build == "22617221", about.build)
    check("about.apiVersion", about.apiVersion == "8.0.2.0", about.apiVersion)
    check(
        "about.fullName",
        about.fullName == "VMware vCenter Server 8.0.2 build-22617221",
        about.fullName,
    )
    user = si.content.sessionManager.currentSession.userName
    check("currentSession.userName is the login name", user == ADMIN, user)
    Disconnect(si)

    for name, user, pwd in (
        ("wrong password", ADMIN, "nope"),
        ("unknown user", "eve@vsphere.local", "x"),
        ("extra user with other user's password", BOB, ADMIN_PW),
    ):
        try:
            sim.connect(user, pwd)
            check("login rejected: " + name, False, "login succeeded")
        except vim.fault.InvalidLogin:
            check("login rejected: " + name, True)
    si = sim.connect(CAROL, CAROL_PW)
    check("extra user can log in", si.content.sessionManager.currentSession.userName == CAROL)
    Disconnect(si)


def check_inventory(sim):
    si = sim.connect()
    for path, kind in (
        ("/DC0", vim.Datacenter),
        ("/DC0/host/DC0_C0", vim.ClusterComputeResource),
        ("/DC0/host/DC0_C1", vim.ClusterComputeResource),
        ("/DC0/host/DC0_C0/DC0_C0_H0", vim.HostSystem),
        ("/DC0/host/DC0_C0/Resources", vim.ResourcePool),
        ("/DC0/host/DC0_C0/Resources/DC0_C0_RP1", vim.ResourcePool),
        ("/DC0/datastore/LocalDS_0", vim.Datastore),
        ("/DC0/datastore/LocalDS_1", vim.Datastore),
        ("/DC0/network/VM Network", vim.Network),
        ("/DC0/network/DC0_DVPG0", vim.dvs.DistributedVirtualPortgroup),
        ("/DC0/vm/templates", vim.Folder),
        (TEMPLATE_PATH, vim.VirtualMachine),
    ):
        obj = find(si, path)
        check("FindByInventoryPath " + path, isinstance(obj, kind), obj)
    vms = all_of(si, vim.VirtualMachine)
    check("only VM is the template", [v.name for v in vms] == [TEMPLATE], [v.name for v in vms])
    hosts = all_of(si, vim.HostSystem)
    check("6 hosts (2 clusters x 3)", len(hosts) == 6, len(hosts))

    t = find(si, TEMPLATE_PATH)
    cfg = t.config
    disks = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    nics = [d for d in cfg.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    check("template is a template", cfg.template is True)
    check(
        "template 2 vCPU / 4096 MB",
        cfg.hardware.numCPU == 2 and cfg.hardware.memoryMB == 4096,
        (cfg.hardware.numCPU, cfg.hardware.memoryMB),
    )
    check("template guestId ubuntu64Guest", cfg.guestId == "ubuntu64Guest", cfg.guestId)
    check(
        "template one 20 GB disk",
        len(disks) == 1 and disks[0].capacityInKB == 20 * 1024 * 1024,
        [d.capacityInKB for d in disks],
    )
    check(
        "template one vmxnet3 NIC on VM Network",
        len(nics) == 1
        and isinstance(nics[0], vim.vm.device.VirtualVmxnet3)
        and nics[0].backing.deviceName == "VM Network",
        nics,
    )
    check(
        "template on LocalDS_0",
        [d.name for d in t.datastore] == ["LocalDS_0"],
        [d.name for d in t.datastore],
    )
    Disconnect(si)


def check_ntp_and_storage(sim):
    si = sim.connect()
    hosts = all_of(si, vim.HostSystem)
    props = retrieve(si, hosts, vim.HostSystem, ["name", "config.dateTimeInfo.ntpConfig.server"])
    by_name = {
        p["name"]: list(p.get("config.dateTimeInfo.ntpConfig.server") or []) for p in props.values()
    }
    want = ["0.pool.ntp.org", "1.pool.ntp.org"]
    check(
        "NTP servers on hosts",
        all(v == want for n, v in by_name.items() if n != "DC0_C0_H2"),
        by_name,
    )
    check(
        "no NTP servers on -no-ntp-host DC0_C0_H2",
        by_name.get("DC0_C0_H2") == [],
        by_name.get("DC0_C0_H2"),
    )
    h = find(si, "/DC0/host/DC0_C0/DC0_C0_H0")
    check(
        "host.config.dateTimeInfo via property",
        list(h.config.dateTimeInfo.ntpConfig.server) == want,
    )

    host_names = sorted(x.name for x in hosts)
    for ds_name in ("LocalDS_0", "LocalDS_1"):
        ds = find(si, "/DC0/datastore/" + ds_name)
        mounts = ds.host
        names = sorted(m.key.name for m in mounts)
        check(ds_name + " mounted on every host", names == host_names, names)
        check(
            ds_name + " mounts accessible+mounted",
            all(m.mountInfo.accessible and m.mountInfo.mounted for m in mounts),
        )
        check(
            ds_name + " in every host.datastore",
            all(ds_name in [d.name for d in x.datastore] for x in hosts),
        )
        check(ds_name + " multipleHostAccess", ds.summary.multipleHostAccess is True)
    ds = find(si, "/DC0/datastore/lonely")
    check(
        "-local-datastore lonely mounted on DC0_C1_H0 only",
        ds is not None and [m.key.name for m in ds.host] == ["DC0_C1_H0"],
        ds and [m.key.name for m in ds.host],
    )
    check(
        "lonely only in DC0_C1_H0's host.datastore",
        sorted(x.name for x in hosts if "lonely" in [d.name for d in x.datastore]) == ["DC0_C1_H0"],
    )
    Disconnect(si)


def check_permissions(sim):
    si = sim.connect()
    am = si.content.authorizationManager
    dc = find(si, "/DC0")
    cluster = find(si, "/DC0/host/DC0_C0")
    pool = find(si, "/DC0/host/DC0_C0/Resources/DC0_C0_RP1")
    host = find(si, "/DC0/host/DC0_C0/DC0_C0_H0")
    tmpl = find(si, TEMPLATE_PATH)
    root = si.content.rootFolder

    check("privilegeList populated", len(am.privilegeList) > 300, len(am.privilegeList))
    roles = {r.name: r.roleId for r in am.roleList}
    check(
        "built-in roles",
        all(
            roles.get(n) == i
            for n, i in (
                ("Admin", -1),
                ("ReadOnly", -2),
                ("View", -3),
                ("Anonymous", -4),
                ("NoAccess", -5),
            )
        ),
        roles,
    )
    subset = [
        "VirtualMachine.Provisioning.Clone",
        "VirtualMachine.Provisioning.DeployTemplate",
        "Resource.AssignVMToPool",
        "Datastore.AllocateSpace",
        "Cns.Searchable",
    ]
    role_id = am.AddAuthorizationRole(name="kubegate-test", privIds=subset)
    check("AddAuthorizationRole returns a new id", role_id > 0, role_id)
    role_id2 = am.AddAuthorizationRole(name="kubegate-test-2", privIds=["System.View"])
    check("second role gets another id", role_id2 not in (role_id, 0), role_id2)
    role = [r for r in am.roleList if r.roleId == role_id]
    check(
        "role has the subset plus System.*",
        role
        and set(role[0].privilege)
        == set(subset) | {"System.Anonymous", "System.View", "System.Read"},
        role and role[0].privilege,
    )
    try:
        am.AddAuthorizationRole(name="bad", privIds=["No.Such.Privilege"])
        check("unknown privilege rejected", False)
    except vmodl.fault.InvalidArgument:
        check("unknown privilege rejected", True)

    perm = vim.AuthorizationManager.Permission(
        principal="VSPHERE.LOCAL\\bob", group=False, roleId=role_id, propagate=True
    )
    am.SetEntityPermissions(entity=dc, permission=[perm])
    # carol: a non-propagating permission on the datacenter only
    am.SetEntityPermissions(
        entity=dc,
        permission=[
            vim.AuthorizationManager.Permission(
                principal=CAROL, group=False, roleId=-2, propagate=False
            )
        ],
    )
    on_dc = am.RetrieveEntityPermissions(entity=dc, inherited=False)
    check(
        "RetrieveEntityPermissions returns both (SetEntityPermissions merges)",
        sorted(p.principal for p in on_dc) == sorted(["VSPHERE.LOCAL\\bob", CAROL]),
        on_dc,
    )
    inherited = am.RetrieveEntityPermissions(entity=cluster, inherited=True)
    check(
        "RetrieveEntityPermissions inherited: bob + admin, not carol",
        {"VSPHERE.LOCAL\\bob", ADMIN} <= {p.principal for p in inherited}
        and CAROL not in {p.principal for p in inherited},
        [p.principal for p in inherited],
    )
    allp = am.RetrieveAllPermissions()
    check(
        "RetrieveAllPermissions has admin on root",
        any(
            p.principal == ADMIN and p.roleId == -1 and p.entity == root and p.propagate
            for p in allp
        ),
    )
    check(
        "RetrieveAllPermissions has bob's",
        any(p.principal == "VSPHERE.LOCAL\\bob" and p.roleId == role_id for p in allp),
    )
    check(
        "RetrieveRolePermissions",
        [p.principal for p in am.RetrieveRolePermissions(roleId=role_id)] == ["VSPHERE.LOCAL\\bob"],
    )

    # bob logs in (explicit Login to get the UserSession key)
    stub = SmartStubAdapter(
        host=sim.info["host"], port=sim.info["port"], sslContext=sim.ssl_context()
    )
    bob_si = vim.ServiceInstance("ServiceInstance", stub)
    bob_content = bob_si.RetrieveContent()
    bob_session = bob_content.sessionManager.Login(BOB, BOB_PW)
    check("bob's UserSession.userName", bob_session.userName == BOB, bob_session.userName)
    bob_am = bob_content.authorizationManager
    privs = [
        "VirtualMachine.Provisioning.Clone",
        "Resource.AssignVMToPool",
        "System.Read",
        "VirtualMachine.Config.AddNewDisk",
        "Host.Config.Storage",
    ]
    res = bob_am.HasPrivilegeOnEntities(
        entity=[cluster, tmpl, pool, host], sessionId=bob_session.key, privId=privs
    )

    def granted(entity_priv):
        return {a.privId: a.isGranted for a in entity_priv.privAvailability}

    want = {
        "VirtualMachine.Provisioning.Clone": True,
        "Resource.AssignVMToPool": True,
        "System.Read": True,
        "VirtualMachine.Config.AddNewDisk": False,
        "Host.Config.Storage": False,
    }
    for ep, label in zip(res, ("cluster", "template", "resource pool", "host"), strict=False):
        check("bob HasPrivilegeOnEntities on " + label, granted(ep) == want, granted(ep))

    # a NoAccess permission on the template folder overrides the inherited role below it
    folder = find(si, "/DC0/vm/templates")
    am.SetEntityPermissions(
        entity=folder,
        permission=[
            vim.AuthorizationManager.Permission(
                principal=BOB, group=False, roleId=-5, propagate=True
            )
        ],
    )
    res = bob_am.HasPrivilegeOnEntities(
        entity=[tmpl, cluster], sessionId=bob_session.key, privId=privs
    )
    check(
        "NoAccess on folder: nothing on template",
        not any(granted(res[0]).values()),
        granted(res[0]),
    )
    check("NoAccess on folder: cluster unchanged", granted(res[1]) == want, granted(res[1]))
    am.RemoveEntityPermission(entity=folder, user=BOB, isGroup=False)
    res = bob_am.HasPrivilegeOnEntities(entity=[tmpl], sessionId=bob_session.key, privId=privs)
    check(
        "RemoveEntityPermission restores inherited role", granted(res[0]) == want, granted(res[0])
    )

    # carol: ReadOnly on the datacenter without propagation
    carol_si = sim.connect(CAROL, CAROL_PW)
    carol_key = carol_si.content.sessionManager.currentSession.key
    res = carol_si.content.authorizationManager.HasPrivilegeOnEntities(
        entity=[dc, cluster],
        sessionId=carol_key,
        privId=["System.Read", "System.View", "Datastore.AllocateSpace"],
    )
    check(
        "carol: System.Read/View on the datacenter",
        granted(res[0])
        == {"System.Read": True, "System.View": True, "Datastore.AllocateSpace": False},
        granted(res[0]),
    )
    check(
        "carol: nothing on the cluster (propagate=false)",
        not any(granted(res[1]).values()),
        granted(res[1]),
    )

    # the admin user gets everything, also privileges outside any custom role
    admin_key = si.content.sessionManager.currentSession.key
    res = am.HasPrivilegeOnEntities(
        entity=[cluster, tmpl, root],
        sessionId=admin_key,
        privId=[*privs, "Sessions.TerminateSession", "StorageProfile.View"],
    )
    check(
        "admin has every privilege",
        all(all(granted(ep).values()) for ep in res),
        [granted(ep) for ep in res],
    )

    res = am.HasUserPrivilegeOnEntities(
        entities=[cluster], userName="bob@VSPHERE.LOCAL", privId=privs
    )
    check("HasUserPrivilegeOnEntities for bob", granted(res[0]) == want, granted(res[0]))
    res = am.FetchUserPrivilegeOnEntities(entities=[cluster, root], userName=BOB)
    check(
        "FetchUserPrivilegeOnEntities for bob (cluster: role, root: none)",
        set(res[0].privileges) == set(subset) | {"System.Anonymous", "System.View", "System.Read"}
        and not res[1].privileges,
        [list(r.privileges or []) for r in res],
    )

    # built-in vcsim users must not leak admin rights to extra users
    res = bob_am.HasPrivilegeOnEntities(
        entity=[root], sessionId=bob_session.key, privId=["System.Read"]
    )
    check("bob has nothing on the root folder", not granted(res[0])["System.Read"], granted(res[0]))

    try:
        am.RemoveAuthorizationRole(roleId=role_id, failIfUsed=True)
        check("RemoveAuthorizationRole(failIfUsed) refuses a used role", False)
    except vim.fault.RemoveFailed:
        check("RemoveAuthorizationRole(failIfUsed) refuses a used role", True)
    am.RemoveAuthorizationRole(roleId=role_id2, failIfUsed=True)
    check("RemoveAuthorizationRole", role_id2 not in [r.roleId for r in am.roleList])

    bob_content.sessionManager.Logout()
    Disconnect(carol_si)
    Disconnect(si)


def clone(si, name, pool, power_on=False, customization=None, config=None, host=None):
    tmpl = find(si, TEMPLATE_PATH)
    folder = find(si, "/DC0/vm")
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=pool, host=host),
        powerOn=power_on,
        template=False,
        customization=customization,
        config=config,
    )
    return wait_task(tmpl.CloneVM_Task(folder=folder, name=name, spec=spec))


def power_on(vm):
    wait_task(vm.PowerOnVM_Task())


def power_off(vm):
    wait_task(vm.PowerOffVM_Task())


def check_clone_dhcp(sim):
    si = sim.connect()
    pool_c1 = find(si, "/DC0/host/DC0_C1/Resources")
    pool_rp1 = find(si, "/DC0/host/DC0_C0/Resources/DC0_C0_RP1")
    c1_hosts = {h.name for h in find(si, "/DC0/host/DC0_C1").host}
    tmpl = find(si, TEMPLATE_PATH)
    tmpl_disk = next(
        d for d in tmpl.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
    )
    tmpl_disk_file = tmpl_disk.backing.fileName
    tmpl_mac = next(
        d for d in tmpl.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ).macAddress

    t0 = time.time()
    vm1 = clone(si, "node-1", pool_c1)
    elapsed = time.time() - t0
    check(
        "CloneVM_Task to the vm folder with a pool relocate spec",
        isinstance(vm1, vim.VirtualMachine),
        vm1,
    )
    check("-method-delay CloneVM_Task=300 applied", elapsed >= 0.25, f"{elapsed:.2f}s")
    check("clone found at /DC0/vm/node-1", find(si, "/DC0/vm/node-1") == vm1)
    check("clone is not a template", vm1.config.template is False)
    check("clone in the requested pool", vm1.resourcePool == pool_c1, vm1.resourcePool)
    check(
        "clone placed on a host of the pool's cluster",
        vm1.runtime.host.name in c1_hosts,
        vm1.runtime.host.name,
    )
    check(
        "clone hardware copied",
        vm1.config.hardware.numCPU == 2 and vm1.config.hardware.memoryMB == 4096,
    )
    disk = [d for d in vm1.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    nic = [
        d for d in vm1.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ]
    check(
        "clone has its own 20 GB disk",
        len(disk) == 1
        and disk[0].capacityInKB == 20 * 1024 * 1024
        and disk[0].backing.fileName != tmpl_disk_file,
        disk and disk[0].backing.fileName,
    )
    tmpl_disk = next(
        d for d in tmpl.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
    )
    check("template disk unchanged by the clone", tmpl_disk.backing.fileName == tmpl_disk_file)
    check(
        "clone NIC has a new MAC",
        len(nic) == 1 and nic[0].macAddress != tmpl_mac,
        nic and nic[0].macAddress,
    )

    power_on(vm1)
    ip1 = vm1.guest.ipAddress
    check("DHCP: powered-on clone gets the first address of the range", ip1 == "10.20.0.100", ip1)
    gnet = vm1.guest.net
    check(
        "DHCP: guest.net has IP, MAC and network",
        len(gnet) == 1
        and list(gnet[0].ipAddress) == [ip1]
        and gnet[0].macAddress == nic[0].macAddress
        and gnet[0].network == "VM Network",
        gnet and (gnet[0].ipAddress, gnet[0].macAddress, gnet[0].network),
    )
    check(
        "guest tools running after power on",
        vm1.guest.toolsRunningStatus == "guestToolsRunning",
        vm1.guest.toolsRunningStatus,
    )

    vm2 = clone(si, "node-2", pool_rp1, power_on=True)
    check(
        "clone with spec.powerOn is powered on",
        vm2.runtime.powerState == "poweredOn",
        vm2.runtime.powerState,
    )
    check(
        "DHCP: second VM gets the next address",
        vm2.guest.ipAddress == "10.20.0.101",
        vm2.guest.ipAddress,
    )

    power_off(vm1)
    power_on(vm1)
    check(
        "DHCP: same address on a second power-on", vm1.guest.ipAddress == ip1, vm1.guest.ipAddress
    )

    # fixed IP through guest customization in the clone spec
    ident = vim.vm.customization.LinuxPrep(
        hostName=vim.vm.customization.FixedName(name="node-3"), domain="local"
    )
    adapter = vim.vm.customization.IPSettings(
        ip=vim.vm.customization.FixedIp(ipAddress="192.168.50.10"),
        subnetMask="255.255.255.0",
        gateway=["192.168.50.1"],
    )
    cust = vim.vm.customization.Specification(
        identity=ident,
        globalIPSettings=vim.vm.customization.GlobalIPSettings(),
        nicSettingMap=[vim.vm.customization.AdapterMapping(adapter=adapter)],
    )
    vm3 = clone(si, "node-3", pool_c1, power_on=True, customization=cust)
    check(
        "customization fixed IP wins over DHCP",
        vm3.guest.ipAddress == "192.168.50.10",
        vm3.guest.ipAddress,
    )
    check("customization sets guest.hostName", vm3.guest.hostName == "node-3", vm3.guest.hostName)

    # fixed IP through extraConfig SET.guest.ipAddress
    cfg = vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key="SET.guest.ipAddress", value="192.168.60.10")]
    )
    vm4 = clone(si, "node-4", pool_c1, power_on=True, config=cfg)
    check(
        "SET.guest.ipAddress wins over DHCP",
        vm4.guest.ipAddress == "192.168.60.10",
        vm4.guest.ipAddress,
    )

    # a NIC moved to a DVPG gets an address of that portgroup's range
    pg = find(si, "/DC0/network/DC0_DVPG0")
    dvs = pg.config.distributedVirtualSwitch
    nic_dev = next(
        d for d in tmpl.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)
    )
    nic_dev.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
        port=vim.dvs.PortConnection(portgroupKey=pg.key, switchUuid=dvs.uuid)
    )
    edit = vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic_dev)
    vm5 = clone(si, "node-5", pool_c1, power_on=True, config=vim.vm.ConfigSpec(deviceChange=[edit]))
    check("DHCP on DC0_DVPG0", vm5.guest.ipAddress == "10.21.0.100", vm5.guest.ipAddress)
    check(
        "guest.net network name for the DVPG NIC",
        [n.network for n in vm5.guest.net] == ["DC0_DVPG0"],
        [n.network for n in vm5.guest.net],
    )

    # explicit host in the relocate spec
    h = find(si, "/DC0/host/DC0_C1/DC0_C1_H2")
    vm6 = clone(si, "node-6", pool_c1, host=h)
    check("spec.location.host honoured", vm6.runtime.host == h, vm6.runtime.host.name)

    # destroying a VM frees its address
    power_off(vm1)
    wait_task(vm1.Destroy_Task())
    check("destroyed VM is gone", find(si, "/DC0/vm/node-1") is None)
    vm7 = clone(si, "node-7", pool_c1, power_on=True)
    check(
        "DHCP: address of a destroyed VM is reused", vm7.guest.ipAddress == ip1, vm7.guest.ipAddress
    )
    Disconnect(si)


def check_lifecycle(sim):
    """What the cluster lifecycle relies on: clone spec applied, names taken, hostname from
    guestinfo.metadata, disk grow, files removed on destroy."""
    import base64
    import gzip

    si = sim.connect()
    pool = find(si, "/DC0/host/DC0_C1/Resources")
    ds = find(si, "/DC0/datastore/LocalDS_1")
    meta = json.dumps({"instance-id": "i-1", "local-hostname": "life-host"}).encode()
    uid = "0f0e0d0c-0b0a-4909-8807-060504030201"
    config = vim.vm.ConfigSpec(
        instanceUuid=uid,
        annotation="owned by selfcheck",
        numCPUs=3,
        memoryMB=3072,
        extraConfig=[
            vim.option.OptionValue(key="kubegate.cluster", value="cluster/selfcheck"),
            vim.option.OptionValue(
                key="guestinfo.metadata", value=base64.b64encode(gzip.compress(meta)).decode()
            ),
            vim.option.OptionValue(key="guestinfo.metadata.encoding", value="gzip+base64"),
        ],
    )
    tmpl = find(si, TEMPLATE_PATH)
    folder = find(si, "/DC0/vm")
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool, datastore=ds), config=config)
    vm = wait_task(tmpl.CloneVM_Task(folder=folder, name="life-1", spec=spec))
    check(
        "clone: config.instanceUuid applied", vm.config.instanceUuid == uid, vm.config.instanceUuid
    )
    extra = {o.key: o.value for o in vm.config.extraConfig}
    check("clone: config.extraConfig applied", extra.get("kubegate.cluster") == "cluster/selfcheck")
    check(
        "clone: config.annotation applied",
        vm.config.annotation == "owned by selfcheck",
        vm.config.annotation,
    )
    hw = vm.config.hardware
    check("clone: numCPUs and memoryMB applied", (hw.numCPU, hw.memoryMB) == (3, 3072))
    check(
        "FindByUuid(instanceUuid=True) finds the clone",
        si.RetrieveContent().searchIndex.FindByUuid(None, uid, True, True) == vm,
    )
    try:
        wait_task(
            tmpl.CloneVM_Task(
                folder=folder,
                name="life-1",
                spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool)),
            )
        )
        check("second clone of a taken name: DuplicateName", False, "clone succeeded")
    except vim.fault.DuplicateName as e:
        check("second clone of a taken name: DuplicateName", e.object == vm, e.object)

    disk = next(d for d in hw.device if isinstance(d, vim.vm.device.VirtualDisk))
    disk.capacityInKB = 30 * 1024 * 1024
    disk.capacityInBytes = 30 * 1024**3
    edit = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
    wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[edit])))
    grown = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    check(
        "reconfigure grows the disk, same file",
        grown.capacityInKB == 30 * 1024 * 1024 and grown.backing.fileName == disk.backing.fileName,
        (grown.capacityInKB, grown.backing.fileName),
    )
    power_on(vm)
    time.sleep(0.2)
    check("DHCP address at power-on", (vm.guest.ipAddress or "").startswith("10.20.0."))
    check(
        "guest.hostName from guestinfo.metadata",
        vm.guest.hostName == "life-host",
        vm.guest.hostName,
    )

    def files():
        task = ds.browser.SearchDatastoreSubFolders_Task(
            "[LocalDS_1]", vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
        )
        wait_task(task)
        return [f.path for r in task.info.result for f in r.file or []]

    check("clone's files on its datastore", "life-1" in files(), files())
    power_off(vm)
    wait_task(vm.Destroy_Task())
    check("destroy removes the VM's files", "life-1" not in files(), files())
    Disconnect(si)


def check_sync_tasks(sim):
    """Without -task-delay, tasks still complete before the call returns."""
    si = sim.connect()
    check(
        "ready file task_delay is {} without -task-delay",
        sim.info.get("task_delay") == {},
        sim.info.get("task_delay"),
    )
    tmpl = find(si, TEMPLATE_PATH)
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=find(si, "/DC0/host/DC0_C0/Resources"))
    )
    task = tmpl.CloneVM_Task(folder=find(si, "/DC0/vm"), name="sync-1", spec=spec)
    info = task.info
    check(
        "no -task-delay: CloneVM_Task already succeeded when it returns",
        info.state == "success"
        and isinstance(info.result, vim.VirtualMachine)
        and not info.cancelable,
        (info.state, info.cancelable),
    )
    check("no -task-delay: clone exists right away", find(si, "/DC0/vm/sync-1") == info.result)
    wait_task(info.result.Destroy_Task())
    Disconnect(si)


def watch_task(si, task, timeout):
    """WaitForUpdatesEx on task: [(state, progress)] after every update, until it is done."""
    pc = si.content.propertyCollector.CreatePropertyCollector()
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(
                type=vim.Task, pathSet=["info.state", "info.progress", "info.result", "info.error"]
            )
        ],
    )
    pc.CreateFilter(spec, partialUpdates=False)
    seen, cur, version = [], {}, ""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            res = pc.WaitForUpdatesEx(
                version, vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=1)
            )
            if res is None:
                continue
            version = res.version
            for fs in res.filterSet or []:
                for ou in fs.objectSet or []:
                    for ch in ou.changeSet or []:
                        cur[ch.name] = ch.val
                        if ch.name == "info.progress":
                            seen.append(("progress", ch.val))
                        elif ch.name == "info.state":
                            seen.append(("state", ch.val))
            if cur.get("info.state") in ("success", "error"):
                break
    finally:
        pc.Destroy()
    return seen, cur


def check_task_delay(binary, workdir):
    sim = Sim(
        binary, workdir, "-task-delay", "CloneVM_Task=1500", "-template", TEMPLATE, "-clusters", "1"
    )
    try:
        check(
            "ready file task_delay",
            sim.info.get("task_delay") == {"CloneVM_Task": 1500},
            sim.info.get("task_delay"),
        )
        si = sim.connect()
        tmpl = find(si, TEMPLATE_PATH)
        folder = find(si, "/DC0/vm")
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=find(si, "/DC0/host/DC0_C0/Resources")), powerOn=True
        )
        t0 = time.time()
        task = tmpl.CloneVM_Task(folder=folder, name="delayed-1", spec=spec)
        took = time.time() - t0
        task2 = tmpl.CloneVM_Task(folder=folder, name="delayed-2", spec=spec)
        check("-task-delay: CloneVM_Task returns at once", took < 0.5, f"{took:.2f}s")
        try:
            wait_task(tmpl.CloneVM_Task(folder=folder, name="delayed-1", spec=spec))
            check("clone of a name in flight: DuplicateName at start", False, "clone succeeded")
        except vim.fault.DuplicateName as e:
            check("clone of a name in flight: DuplicateName at start", e.object == folder, e.object)
        info = task.info
        check(
            "-task-delay: task running, startTime set, cancelable",
            info.state == "running"
            and info.startTime is not None
            and info.cancelable is True
            and info.completeTime is None
            and info.result is None,
            (info.state, info.startTime, info.cancelable, info.completeTime),
        )
        check(
            "-task-delay: info.name is the method",
            info.name.info.wsdlName == "CloneVM_Task",
            info.name,
        )
        check(
            "-task-delay: clone target does not exist while running",
            find(si, "/DC0/vm/delayed-1") is None,
        )

        time.sleep(0.3)
        task2.CancelTask()
        info2 = task2.info
        check(
            "CancelTask: task ends in error RequestCanceled",
            info2.state == "error"
            and isinstance(info2.error, vmodl.fault.RequestCanceled)
            and info2.cancelled is True,
            (info2.state, info2.error, info2.cancelled),
        )

        seen, cur = watch_task(si, task, 5)
        elapsed = time.time() - t0
        states = [v for k, v in seen if k == "state"]
        progress = [v for k, v in seen if k == "progress"]
        check(
            "WaitForUpdatesEx: running, then success",
            states[:1] == ["running"] and states[-1:] == ["success"],
            seen,
        )
        check(
            "WaitForUpdatesEx: progress goes up while running",
            any(0 < p < 100 for p in progress) and progress == sorted(progress),
            progress,
        )
        vm = cur.get("info.result")
        check(
            "WaitForUpdatesEx: result is the new VM",
            isinstance(vm, vim.VirtualMachine) and vm.name == "delayed-1",
            vm,
        )
        check("-task-delay: task took about the delay", 1.4 <= elapsed < 3.5, f"{elapsed:.2f}s")
        check("clone exists once the task succeeded", find(si, "/DC0/vm/delayed-1") == vm)
        check(
            "delayed clone got its fix-ups (powerOn)",
            vm.runtime.powerState == "poweredOn",
            vm.runtime.powerState,
        )
        try:
            task.CancelTask()
            check("CancelTask on a finished task: InvalidState", False)
        except vim.fault.InvalidState:
            check("CancelTask on a finished task: InvalidState", True)
        time.sleep(0.2)
        names = [v.name for v in all_of(si, vim.VirtualMachine)]
        check(
            "canceled clone never appears",
            find(si, "/DC0/vm/delayed-2") is None and "delayed-2" not in names,
            names,
        )
        check("canceled task stays canceled", task2.info.state == "error", task2.info.state)
        Disconnect(si)
    finally:
        sim.stop()


def check_old_version(binary, workdir):
    sim = Sim(
        binary,
        workdir,
        "-version",
        "6.5.0",
        "-build",
        "5973321",
        "-template",
        "",
        "-clusters",
        "1",
        "-tls=false",
    )
    try:
        check(
            "-tls=false ready file",
            sim.info["tls"] is False
            and sim.info["url"].startswith("http://")
            and sim.info["thumbprint_sha256"] is None,
            sim.info,
        )
        si = sim.connect()
        about = si.content.about
        check(
            "-version 6.5.0: pyvmomi login + about.version", about.version == "6.5.0", about.version
        )
        check("-version 6.5.0: apiVersion 6.5", about.apiVersion == "6.5", about.apiVersion)
        check("-template '': no VM", not all_of(si, vim.VirtualMachine))
        Disconnect(si)
    finally:
        rc = sim.stop()
        check("SIGTERM exits cleanly (rc 0)", rc == 0, rc)
        check("ready file removed on exit", not os.path.exists(sim.ready_file))


def main():
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(REPO, ".kubegate", "bin", "vcsim"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        print(f"FAIL binary {binary} not found (build it with tools/vcsim/build.sh)")
        return 2

    workdir = tempfile.mkdtemp(prefix="vcsim-selfcheck-")
    sim = None
    try:
        sim = Sim(
            binary,
            workdir,
            "-users",
            f"{BOB}:{BOB_PW},{CAROL}:{CAROL_PW}",
            "-ntp",
            "0.pool.ntp.org,1.pool.ntp.org",
            "-no-ntp-host",
            "DC0_C0_H2",
            "-local-datastore",
            "lonely@DC0_C1_H0",
            "-dhcp",
            "VM Network=10.20.0.100-10.20.0.199,DC0_DVPG0=10.21.0.100-10.21.0.199",
            "-method-delay",
            "CloneVM_Task=300",
        )
        section("ready", check_ready, sim)
        section("login", check_login, sim)
        section("inventory", check_inventory, sim)
        section("ntp+storage", check_ntp_and_storage, sim)
        section("permissions", check_permissions, sim)
        section("clone+dhcp", check_clone_dhcp, sim)
        section("lifecycle", check_lifecycle, sim)
        section("tasks", check_sync_tasks, sim)
    except Exception as e:
        check("start vcsim", False, e)
    finally:
        if sim is not None:
            sim.stop()
            if VERBOSE or any(not ok for _, ok in RESULTS):
                print("--- vcsim log (tail) ---\n" + sim.log())
    section("task delay", check_task_delay, binary, workdir)
    section("old version", check_old_version, binary, workdir)
    shutil.rmtree(workdir, ignore_errors=True)

    failed = [n for n, ok in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
