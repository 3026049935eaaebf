"""Bootstrap data: guestinfo entries decode to the cloud-init documents each node needs."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import gzip
import hashlib
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.bootstrap import BootstrapActivities, generate_secrets
from activities.secrets import secrets_binding
from domain.bootstrap import (
    SUCCESS_MARK,
    ClusterSecrets,
    NodeBootstrap,
    NodeNetwork,
    RenderRequest,
    SecretsRequest,
    ca_cert_hash,
    digest,
    encode,
    guestinfo,
    render_metadata,
    render_userdata,
)
from domain.cluster import Pack, Taint
from domain.sealing import AgentKey, SealError
from domain.trust import canonical_json, released_request

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGf0Kq7b1QbbxF8kS0Fq4m6wVv6vXQ0Vq3n9m2c4Zt1a demo"
SYSTEM_PYTHON = "/usr/bin/python3"
CHECKER = Path(__file__).with_name("cloudinit_check.py")


@pytest.fixture(scope="module")
def shared() -> ClusterSecrets:
    """A cluster's secrets as made from 0.3.0 on: with the keys control-plane members share."""
    return generate_secrets()


@pytest.fixture(scope="module")
def secrets(shared: ClusterSecrets) -> ClusterSecrets:
    """A cluster's secrets as made before 0.3.0 (no shared keys: joins by token and by the
    certificates kubeadm uploads); most rendering tests use these, the join tests both."""
    return shared.model_copy(update={"shared": None})


def static(address: str = "10.0.0.11") -> NodeNetwork:
    return NodeNetwork(
        mode="static",
        address=address,
        prefix=24,
        gateway="10.0.0.1",
        nameservers=["10.0.0.2", "10.0.0.3"],
        search_domains=["lab.local"],
    )


def node(role: str = "init", **changes: Any) -> NodeBootstrap:
    base = NodeBootstrap(
        cluster="demo",
        hostname="demo-cp-0",
        instance_id="6f1c0e36-0000-5000-8000-000000000001",
        role=role,
        network=static("10.0.0.10"),
        ssh_keys=[KEY],
        ntp_servers=["0.pool.ntp.org", "1.pool.ntp.org"],
        vip="10.0.0.5",
        kubernetes_version="1.30.4",
        packs=[
            ("os", Pack(name="ubuntu", version="22.04", values={"timezone": "UTC"})),
            ("kubernetes", Pack(name="kubernetes", version="1.30.4", values={"audit": True})),
            ("network", Pack(name="cni-calico", version="3.28.0", values={"mtu": 1440})),
        ],
    )
    return base.model_copy(update=changes)


def nodes() -> dict[str, NodeBootstrap]:
    """One node per role and addressing mode."""
    return {
        "init": node(),
        "join-control-plane": node(
            "join-control-plane", hostname="demo-cp-1", network=static("10.0.0.12")
        ),
        "worker": node("worker", hostname="demo-general-0", network=static("10.0.0.20")),
        "worker-dhcp-mac": node(
            "worker",
            hostname="demo-general-1",
            network=NodeNetwork(mode="dhcp", mac_address="00:50:56:aa:bb:cc"),
            vip=None,
            first_control_plane="10.0.0.10",
        ),
        "init-dhcp-single": node(network=NodeNetwork(mode="dhcp"), vip=None),
        "init-1.31-workers-allowed": node(
            kubernetes_version="v1.31.1", allow_worker_capability=True
        ),
    }


def decoded(entries: dict[str, str], name: str) -> str:
    assert entries[f"guestinfo.{name}.encoding"] == "gzip+base64"
    return gzip.decompress(base64.b64decode(entries[f"guestinfo.{name}"])).decode()


def userdata(n: NodeBootstrap, secrets: ClusterSecrets) -> dict[str, Any]:
    text = decoded(guestinfo(n, secrets), "userdata")
    assert text == render_userdata(n, secrets)
    assert text.startswith("#cloud-config\n")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def files(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f["path"]: f for f in doc["write_files"]}


def kubeadm(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    content = files(doc)["/run/kubeadm/kubeadm.yaml"]["content"]
    return {d["kind"]: d for d in yaml.safe_load_all(content)}


# -- content ------------------------------------------------------------------------------


def test_identity_users_and_time(secrets: ClusterSecrets) -> None:
    doc = userdata(node(), secrets)
    assert doc["hostname"] == "demo-cp-0"
    assert doc["manage_etc_hosts"] is True
    (user,) = doc["users"]
    assert user["ssh_authorized_keys"] == [KEY]
    assert user["lock_passwd"] is True
    assert doc["ntp"] == {"enabled": True, "servers": ["0.pool.ntp.org", "1.pool.ntp.org"]}
    assert "ntp" not in userdata(node(ntp_servers=[]), secrets)


def test_static_metadata_is_netplan_v2_with_prefix_gateway_and_dns(
    secrets: ClusterSecrets,
) -> None:
    meta = json.loads(decoded(guestinfo(node(), secrets), "metadata"))
    assert meta["instance-id"] == "6f1c0e36-0000-5000-8000-000000000001"
    assert meta["local-hostname"] == "demo-cp-0"
    assert meta["redact"] == ["userdata"]
    nic = meta["network"]["ethernets"]["id0"]
    assert meta["network"]["version"] == 2
    assert nic["match"] == {"name": "e*"} and nic["set-name"] == "eth0"
    assert nic["addresses"] == ["10.0.0.10/24"]
    assert nic["gateway4"] == "10.0.0.1"
    assert nic["dhcp4"] is False
    assert nic["nameservers"] == {"addresses": ["10.0.0.2", "10.0.0.3"], "search": ["lab.local"]}


def test_dhcp_metadata_matches_the_mac_when_known() -> None:
    meta = json.loads(render_metadata(nodes()["worker-dhcp-mac"]))
    nic = meta["network"]["ethernets"]["id0"]
    assert nic["match"] == {"macaddress": "00:50:56:aa:bb:cc"}
    assert nic["dhcp4"] is True
    assert "addresses" not in nic and "gateway4" not in nic


def test_init_node_gets_ca_kubeadm_init_and_kube_vip(secrets: ClusterSecrets) -> None:
    doc = userdata(node(), secrets)
    by_path = files(doc)
    assert by_path["/etc/kubernetes/pki/ca.crt"]["content"] == secrets.ca_cert_pem
    assert by_path["/etc/kubernetes/pki/ca.key"]["content"] == secrets.ca_key_pem
    assert by_path["/etc/kubernetes/pki/ca.key"]["permissions"] == "0600"
    assert by_path["/run/kubeadm/kubeadm.yaml"]["permissions"] == "0600"
    docs = kubeadm(doc)
    init, cluster = docs["InitConfiguration"], docs["ClusterConfiguration"]
    assert init["apiVersion"] == "kubeadm.k8s.io/v1beta3"
    assert init["bootstrapTokens"][0]["token"] == secrets.bootstrap_token
    assert init["certificateKey"] == secrets.certificate_key
    assert init["localAPIEndpoint"]["advertiseAddress"] == "10.0.0.10"
    assert init["nodeRegistration"]["name"] == "demo-cp-0"
    assert "taints" not in init["nodeRegistration"]  # kubeadm's default: control-plane taint
    assert cluster["controlPlaneEndpoint"] == "10.0.0.5:6443"
    assert cluster["kubernetesVersion"] == "v1.30.4"
    assert cluster["networking"]["podSubnet"] == "192.168.0.0/16"
    assert cluster["networking"]["serviceSubnet"] == "10.96.0.0/12"
    assert "kubeadm init --config /run/kubeadm/kubeadm.yaml --upload-certs" in doc["runcmd"]
    assert doc["runcmd"][0] == "set -e"
    assert doc["runcmd"][-1] == "touch /run/kubegate/bootstrap-success.complete"
    # the VIP must be up before kubeadm init waits for the API at the endpoint
    pod = yaml.safe_load(by_path["/etc/kubernetes/manifests/kube-vip.yaml"]["content"])
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["address"] == "10.0.0.5"
    assert env["vip_arp"] == "true" and env["vip_leaderelection"] == "true"
    assert env["port"] == "6443" and env["cp_enable"] == "true"
    assert pod["spec"]["containers"][0]["image"].startswith("ghcr.io/kube-vip/kube-vip:v0.8.")
    # 1.29+: super-admin.conf until init is done, then back to admin.conf
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/kubernetes/super-admin.conf"
    assert any("super-admin.conf#/etc/kubernetes/admin.conf" in c for c in doc["runcmd"])


def test_join_control_plane_gets_certificate_key_ca_hash_and_kube_vip_after_join(
    secrets: ClusterSecrets,
) -> None:
    doc = userdata(nodes()["join-control-plane"], secrets)
    by_path = files(doc)
    assert "/etc/kubernetes/pki/ca.key" not in by_path
    assert "/etc/kubernetes/manifests/kube-vip.yaml" not in by_path  # join wants it empty
    staged = yaml.safe_load(by_path["/etc/kubegate/kube-vip.yaml"]["content"])
    assert staged["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/kubernetes/admin.conf"
    join = kubeadm(doc)["JoinConfiguration"]
    token = join["discovery"]["bootstrapToken"]
    assert token["apiServerEndpoint"] == "10.0.0.5:6443"
    assert token["token"] == secrets.bootstrap_token
    assert join["controlPlane"]["certificateKey"] == secrets.certificate_key
    assert join["controlPlane"]["localAPIEndpoint"]["advertiseAddress"] == "10.0.0.12"
    runcmd = doc["runcmd"]
    assert runcmd.index("kubeadm join --config /run/kubeadm/kubeadm.yaml") < runcmd.index(
        "install -m 0644 /etc/kubegate/kube-vip.yaml /etc/kubernetes/manifests/kube-vip.yaml"
    )


def test_ca_cert_hash_is_sha256_of_the_subject_public_key_info(secrets: ClusterSecrets) -> None:
    cert = x509.load_pem_x509_certificate(secrets.ca_cert_pem.encode())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "sha256:" + hashlib.sha256(spki).hexdigest()
    assert ca_cert_hash(secrets.ca_cert_pem) == expected
    join = kubeadm(userdata(nodes()["worker"], secrets))["JoinConfiguration"]
    assert join["discovery"]["bootstrapToken"]["caCertHashes"] == [expected]


def test_worker_joins_without_control_plane_or_kube_vip(secrets: ClusterSecrets) -> None:
    doc = userdata(nodes()["worker"], secrets)
    join = kubeadm(doc)["JoinConfiguration"]
    assert "controlPlane" not in join
    assert not any("kube-vip" in path for path in files(doc))
    assert not any("pki" in path for path in files(doc))


def test_dhcp_without_vip_uses_first_control_plane_or_no_endpoint(
    secrets: ClusterSecrets,
) -> None:
    join = kubeadm(userdata(nodes()["worker-dhcp-mac"], secrets))["JoinConfiguration"]
    assert join["discovery"]["bootstrapToken"]["apiServerEndpoint"] == "10.0.0.10:6443"
    single = userdata(nodes()["init-dhcp-single"], secrets)
    init = kubeadm(single)
    assert "controlPlaneEndpoint" not in init["ClusterConfiguration"]
    assert "advertiseAddress" not in init["InitConfiguration"]["localAPIEndpoint"]
    assert not any("kube-vip" in path for path in files(single))
    # static and no VIP: the init node's own address
    own = kubeadm(userdata(node(vip=None), secrets))["ClusterConfiguration"]
    assert own["controlPlaneEndpoint"] == "10.0.0.10:6443"


def test_worker_capability_removes_taint_and_new_kubeadm_api(secrets: ClusterSecrets) -> None:
    doc = userdata(nodes()["init-1.31-workers-allowed"], secrets)
    init = kubeadm(doc)["InitConfiguration"]
    assert init["nodeRegistration"]["taints"] == []
    assert init["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    joined = node("join-control-plane", allow_worker_capability=True)
    assert (
        kubeadm(userdata(joined, secrets))["JoinConfiguration"]["nodeRegistration"]["taints"] == []
    )


def test_pack_values_one_file_per_pack(secrets: ClusterSecrets) -> None:
    by_path = files(userdata(nodes()["worker"], secrets))
    calico = yaml.safe_load(by_path["/etc/kubegate/packs/network-cni-calico.yaml"]["content"])
    assert calico == {"name": "cni-calico", "version": "3.28.0", "values": {"mtu": 1440}}
    assert "/etc/kubegate/packs/os-ubuntu.yaml" in by_path
    assert "/etc/kubegate/packs/kubernetes-kubernetes.yaml" in by_path


def test_deterministic_and_digest_follows_content(secrets: ClusterSecrets) -> None:
    first, again = guestinfo(node(), secrets), guestinfo(node(), secrets)
    assert first == again
    assert digest(first) == digest(again)
    assert len(digest(first)) == 64
    other = guestinfo(node(hostname="demo-cp-9"), secrets)
    assert digest(other) != digest(first)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"network": NodeNetwork(mode="static", prefix=24, gateway="10.0.0.1")}, "network.address"),
        (
            {"network": NodeNetwork(mode="static", address="10.0.0.9", gateway="10.0.0.1")},
            "network.prefix",
        ),
        ({"network": NodeNetwork(mode="static", address="10.0.0.9", prefix=24)}, "network.gateway"),
        ({"network": static().model_copy(update={"prefix": 33})}, "network.prefix"),
        ({"network": static().model_copy(update={"address": "ten"})}, "network.address"),
        ({"network": NodeNetwork(mode="dhcp", nameservers=["x"])}, "network.nameservers.0"),
        ({"role": "join-control-plane", "vip": None}, "vip"),
        ({"role": "worker", "vip": None}, "vip"),
        ({"vip": "not-an-ip"}, "vip"),
        ({"kubernetes_version": "latest"}, "kubernetes_version"),
        ({"pod_cidr": "10.0.0.0/33"}, "pod_cidr"),
    ],
)
def test_invalid_input_names_the_field(
    secrets: ClusterSecrets, change: dict[str, Any], field: str
) -> None:
    bad = node(**change)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        render_userdata(bad, secrets)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        render_metadata(bad)


# -- secrets ------------------------------------------------------------------------------


def test_generated_secrets_have_kubeadm_formats(secrets: ClusterSecrets) -> None:
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", secrets.bootstrap_token)
    assert re.fullmatch(r"[0-9a-f]{64}", secrets.certificate_key)
    cert = x509.load_pem_x509_certificate(secrets.ca_cert_pem.encode())
    assert cert.subject.rfc4514_string() == "CN=kubernetes"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650
    key = serialization.load_pem_private_key(secrets.ca_key_pem.encode(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert generate_secrets().bootstrap_token != secrets.bootstrap_token


ENV = ActivityEnvironment()
#: what the secrets are bound to: this (test) lifecycle on an agent of no named gateway
USE = secrets_binding("", ENV.info.workflow_id, shared=True)  # (generated with shared keys)


def run(fn: Any, *args: Any) -> Any:
    """Run an activity as the agent would: inside an activity context (its workflow id)."""
    return ENV.run(fn, *args)


def test_secrets_of_one_lifecycle_do_not_open_for_another() -> None:
    key = AgentKey.generate()
    sealed = run(BootstrapActivities(key).secrets, SecretsRequest(cluster="demo"))
    other = ActivityEnvironment()
    other.info = dataclasses.replace(other.info, workflow_id="cluster/other")
    with pytest.raises(ApplicationError, match="cluster: sealed for"):
        other.run(BootstrapActivities(key).render, RenderRequest(nodes=[node()], secrets=sealed))


def test_activities_seal_to_the_agent_and_return_no_secret() -> None:
    key = AgentKey.generate()
    acts = BootstrapActivities(key)
    sealed = run(acts.secrets, SecretsRequest(cluster="demo"))
    opened = ClusterSecrets.model_validate_json(key.open(sealed, USE))
    with pytest.raises(SealError):
        AgentKey.generate().open(sealed, USE)
    request = RenderRequest(nodes=list(nodes().values()), secrets=sealed)
    result = run(acts.render, request)
    assert [n.hostname for n in result.nodes] == [n.hostname for n in request.nodes]
    for summary, n in zip(result.nodes, request.nodes, strict=True):
        if n.role == "init":  # (a joiner's data holds a credential minted as it renders)
            assert summary.digest == digest(guestinfo(n, opened))
            assert summary.userdata_bytes == len(render_userdata(n, opened).encode())
    secret_values = [
        opened.bootstrap_token,
        opened.bootstrap_token.split(".")[1],
        opened.certificate_key,
        opened.ca_key_pem.splitlines()[1],
    ]
    assert opened.shared is not None
    secret_values += [
        opened.shared.sa_key_pem.splitlines()[1],
        opened.shared.front_proxy_ca_key_pem.splitlines()[1],
        opened.shared.etcd_ca_key_pem.splitlines()[1],
    ]
    for payload in (request.model_dump_json(), result.model_dump_json(), sealed.model_dump_json()):
        for value in secret_values:
            assert value not in payload


def test_ca_is_ecdsa_p256_and_signs_itself(secrets: ClusterSecrets) -> None:
    cert = x509.load_pem_x509_certificate(secrets.ca_cert_pem.encode())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )  # type: ignore[arg-type]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.digital_signature and not usage.key_encipherment
    # SEC 1 PEM, as kubeadm writes (and reads) ECDSA keys
    assert secrets.ca_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", ca_cert_hash(secrets.ca_cert_pem))


def test_render_without_secrets_generates_seals_and_returns_them() -> None:
    key = AgentKey.generate()
    acts = BootstrapActivities(key)
    request = RenderRequest(nodes=list(nodes().values()))
    result = run(acts.render, request)
    assert result.secrets is not None
    opened = ClusterSecrets.model_validate_json(key.open(result.secrets, USE))
    first = [(summary, n) for summary, n in zip(result.nodes, request.nodes, strict=True)]
    for summary, n in first:
        if n.role == "init":  # rendered with those secrets (joiners mint as they render)
            assert summary.digest == digest(guestinfo(n, opened))
    # the returned bundle renders the init node's bytes again; secrets given = none returned
    again = run(acts.render, RenderRequest(nodes=request.nodes, secrets=result.secrets))
    assert again.secrets is None
    assert [a for a, (_, n) in zip(again.nodes, first, strict=True) if n.role == "init"] == [
        s for s, n in first if n.role == "init"
    ]
    with pytest.raises(SealError):
        AgentKey.generate().open(result.secrets, USE)
    payload = result.model_dump_json()
    for value in (
        opened.bootstrap_token,
        opened.certificate_key,
        opened.ca_key_pem.splitlines()[1],
    ):
        assert value not in payload
    assert run(acts.render, request).secrets != result.secrets  # fresh ones per call


def test_render_refuses_secrets_of_another_agent() -> None:
    sealed = run(BootstrapActivities(AgentKey.generate()).secrets, SecretsRequest(cluster="demo"))
    with pytest.raises(ApplicationError) as caught:
        run(
            BootstrapActivities(AgentKey.generate()).render,
            RenderRequest(nodes=[node()], secrets=sealed),
        )
    assert caught.value.type == "SecretUnreadable" and caught.value.non_retryable


def test_render_reports_the_bad_node_without_secrets() -> None:
    key = AgentKey.generate()
    acts = BootstrapActivities(key)
    sealed = run(acts.secrets, SecretsRequest(cluster="demo"))
    with pytest.raises(ApplicationError, match="node demo-general-0: vip: ") as caught:
        run(
            acts.render,
            RenderRequest(
                nodes=[node("worker", hostname="demo-general-0", vip=None)], secrets=sealed
            ),
        )
    assert caught.value.type == "InvalidSpec"


# -- cloud-init's own reading and validation -------------------------------------------------


@cache
def cloud_init_available() -> bool:
    probe = [
        SYSTEM_PYTHON,
        "-c",
        "import cloudinit.config.schema, cloudinit.sources.DataSourceVMware",
    ]
    return (
        os.path.exists(SYSTEM_PYTHON) and subprocess.run(probe, capture_output=True).returncode == 0
    )


def cloud_init_check(cases: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Run tests/unit/cloudinit_check.py under the system python3 (Debian's cloud-init)."""
    if not cloud_init_available():
        reason = "Debian's cloud-init is not installed (`make setup` installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(CHECKER)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_cloud_init_reads_and_validates_every_role_and_addressing(
    secrets: ClusterSecrets,
) -> None:
    cases = {name: guestinfo(n, secrets) for name, n in nodes().items()}
    # a broken document must fail, or the validator is not really checking
    broken = "#cloud-config\nruncmd: not-a-list\nntp: {servers: 3}\n"
    cases["broken"] = {**cases["init"], "guestinfo.userdata": encode(broken)}
    results = cloud_init_check(cases)
    assert results["broken"]["schema_errors"], "cloud-init's validator accepted a broken document"
    for name, n in nodes().items():
        got = results[name]
        assert got["read"], name
        assert got["schema_errors"] is None, f"{name}: {got['schema_errors']}"
        assert got["userdata_header"] == "#cloud-config"
        assert got["instance_id"] == n.instance_id
        assert got["hostname"] == n.hostname
        assert got["redact"] == ["userdata"]
        (iface,) = got["interfaces"]
        assert iface["name"] == "eth0"
        assert iface["mac_address"] == n.network.mac_address
        (subnet,) = iface["subnets"]
        if n.network.mode == "static":
            assert subnet["type"] == "static"
            assert (subnet["address"], subnet["prefix"]) == (n.network.address, 24)
            assert subnet["gateway"] == "10.0.0.1"
            assert got["nameservers"] == ["10.0.0.2", "10.0.0.3"]
            assert got["search"] == ["lab.local"]
        else:
            assert subnet["type"] == "dhcp4"


def test_cloud_init_schema_command_accepts_the_init_node(
    secrets: ClusterSecrets, tmp_path: Path
) -> None:
    """The CLI a user would run on a node: `cloud-init schema --config-file`."""
    cloud_init_check({})  # skips (or fails in CI) without cloud-init
    path = tmp_path / "user-data"
    path.write_text(render_userdata(node(), secrets))
    proc = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout


# -- joins that never expire (secrets with shared keys) -----------------------------------


def test_a_join_a_week_after_the_first_node_uses_nothing_that_expired(
    shared: ClusterSecrets,
) -> None:
    """kubeadm's bootstrap token lives 24 hours and its uploaded certificates 2: a node
    added a week later gets its own credential, minted as its data is rendered, and a
    control-plane joiner its own copy of the shared keys."""
    assert shared.shared is not None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
    init = yaml.safe_load(render_userdata(node(), shared))
    init_files = files(init)
    assert "kubeadm init --config /run/kubeadm/kubeadm.yaml" in init["runcmd"]  # no upload
    assert "certificateKey" not in kubeadm(init)["InitConfiguration"]
    ca = x509.load_pem_x509_certificate(shared.ca_cert_pem.encode())
    for role in ("worker", "join-control-plane"):
        joiner = nodes()[role]
        text = render_userdata(joiner, shared, now=later)
        for expiring in (shared.bootstrap_token, shared.certificate_key):
            assert expiring not in text, role
        doc = yaml.safe_load(text)
        join = kubeadm(doc)["JoinConfiguration"]
        assert join["discovery"] == {
            "file": {"kubeConfigPath": "/run/kubeadm/kubegate-discovery.conf"}
        }
        assert "certificateKey" not in join.get("controlPlane", {})
        discovery = yaml.safe_load(files(doc)["/run/kubeadm/kubegate-discovery.conf"]["content"])
        assert discovery["clusters"][0]["cluster"]["server"] == "https://10.0.0.5:6443"
        user = discovery["users"][0]["user"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_before_utc <= later < cert.not_valid_after_utc  # fresh then
        groups = cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
        assert [g.value for g in groups] == ["system:bootstrappers:kubeadm:default-node-token"]
        pki = {p: f for p, f in files(doc).items() if p.startswith("/etc/kubernetes/pki/")}
        if role == "worker":
            assert pki == {}  # a worker gets no key of the control plane
        else:  # the very files the first node has
            assert pki and all(init_files[p] == f for p, f in pki.items())
            assert {"sa.key", "sa.pub", "front-proxy-ca.key", "etcd/ca.key"} <= {
                p.removeprefix("/etc/kubernetes/pki/") for p in pki
            }


def test_cloud_init_validates_joins_with_shared_keys(shared: ClusterSecrets) -> None:
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
    cases = {}
    for name, n in nodes().items():
        entries = guestinfo(n, shared)
        cases[name] = {**entries, "guestinfo.userdata": encode(render_userdata(n, shared, later))}
    results = cloud_init_check(cases)
    for name in cases:
        assert results[name]["read"], name
        assert results[name]["schema_errors"] is None, f"{name}: {results[name]['schema_errors']}"


# -- pool labels and taints ------------------------------------------------------------------


def test_pool_labels_and_taints_register_with_the_node(secrets: ClusterSecrets) -> None:
    gpu = Taint(key="nvidia.com/gpu", value="true", effect="NoSchedule")
    worker = nodes()["worker"].model_copy(
        update={"labels": {"team": "ml", "tier": "gpu"}, "taints": [gpu]}
    )
    registration = kubeadm(userdata(worker, secrets))["JoinConfiguration"]["nodeRegistration"]
    assert registration["kubeletExtraArgs"] == {"node-labels": "team=ml,tier=gpu"}  # v1beta3
    assert registration["taints"] == [
        {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
    ]
    newer = worker.model_copy(update={"kubernetes_version": "1.31.2"})
    registration = kubeadm(userdata(newer, secrets))["JoinConfiguration"]["nodeRegistration"]
    assert registration["kubeletExtraArgs"] == [
        {"name": "node-labels", "value": "team=ml,tier=gpu"}
    ]
    # a control-plane node keeps kubeadm's own taint beside the pool's, unless workloads may run
    control = node(taints=[gpu])
    registration = kubeadm(userdata(control, secrets))["InitConfiguration"]["nodeRegistration"]
    assert [t["key"] for t in registration["taints"]] == [
        "node-role.kubernetes.io/control-plane",
        "nvidia.com/gpu",
    ]
    shared_work = node(taints=[gpu], allow_worker_capability=True)
    registration = kubeadm(userdata(shared_work, secrets))["InitConfiguration"]["nodeRegistration"]
    assert [t["key"] for t in registration["taints"]] == ["nvidia.com/gpu"]
    # none given: as before (kubeadm's defaults, no kubelet arguments)
    plain = kubeadm(userdata(nodes()["worker"], secrets))["JoinConfiguration"]["nodeRegistration"]
    assert "taints" not in plain and "kubeletExtraArgs" not in plain


def test_a_request_without_labels_signs_as_agents_of_0_1_0_signed_it() -> None:
    """Kept histories of 0.1.0 agents verify against the request without fields added since."""
    plain = nodes()["worker"]
    assert released_request([plain]) == canonical_json(
        [
            {
                k: v
                for k, v in json.loads(plain.model_dump_json()).items()
                if k not in ("labels", "taints", "upgrade_control_plane")
            }
        ]
    )
    labelled = plain.model_copy(update={"labels": {"team": "ml"}})
    assert b'"labels":{"team":"ml"}' in released_request([labelled])


def test_secrets_with_shared_keys_do_not_open_as_older_secrets_did() -> None:
    """An agent of 0.2 opens cluster secrets under the old purpose only: it cannot open these,
    so it never renders a node of such a cluster without its shared keys."""
    key = AgentKey.generate()
    sealed = run(BootstrapActivities(key).secrets, SecretsRequest(cluster="demo"))
    with pytest.raises(SealError, match="another use"):
        key.open(sealed, secrets_binding("", ENV.info.workflow_id))


def test_the_first_newer_control_plane_member_upgrades_kubeadm_once_joined(
    secrets: ClusterSecrets, shared: ClusterSecrets
) -> None:
    """A joiner flagged as the first member of a newer version runs `kubeadm upgrade apply`
    after its join and kube-vip; nobody else does (and cloud-init accepts the document)."""
    joiner = nodes()["join-control-plane"].model_copy(
        update={"kubernetes_version": "1.31.2", "upgrade_control_plane": True}
    )
    doc = userdata(joiner, secrets)
    runcmd = doc["runcmd"]
    upgrade = "kubeadm upgrade apply v1.31.2 --yes"
    assert runcmd.index("kubeadm join --config /run/kubeadm/kubeadm.yaml") < runcmd.index(upgrade)
    assert runcmd.index(upgrade) < runcmd.index(f"touch {SUCCESS_MARK}")
    for other in nodes().values():  # unflagged, or a worker flagged by mistake: no upgrade
        for flagged in (False, True):
            if other.role == "join-control-plane" and flagged:
                continue
            plain = other.model_copy(update={"upgrade_control_plane": flagged})
            assert not any("upgrade" in c for c in userdata(plain, secrets)["runcmd"])
    results = cloud_init_check({"joiner": guestinfo(joiner, shared)})
    assert results["joiner"]["schema_errors"] is None, results["joiner"]["schema_errors"]
