"""Bootstrap activities of the gateway agent: generate a cluster's secrets, render nodes,
mint kubeconfigs from the cluster's CA.

Secrets are generated here, sealed to the agent's own key at once, and opened only here;
workflow history holds the sealed form and content-free digests, never the plaintext.
`bootstrap_render` without secrets generates them too (one agent round trip instead of two).
generate_secrets() uses randomness and the clock: workflows must not call it.
"""

from __future__ import annotations

import base64
import datetime
import string
from datetime import timedelta
from secrets import choice, token_hex

from cryptography.hazmat.primitives import hashes
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.secrets import current_lifecycle, open_cluster_secrets, secrets_binding
from domain import errors
from domain.account import SealedSecret
from domain.bootstrap import (
    ClusterSecrets,
    RenderRequest,
    RenderResult,
    SecretsRequest,
    SharedKeys,
    rendered,
)
from domain.certs import client_certificate, key_pair, self_signed
from domain.kubeconfig import (
    KubeconfigIssue,
    KubeconfigResult,
    MintKubeconfig,
    admin_groups,
    issued_statement,
    kubeconfig_binding,
    kubeconfig_file,
)
from domain.names import cluster_workflow_id
from domain.sealing import AgentKey, seal

_TOKEN_ALPHABET = string.ascii_lowercase + string.digits
CA_VALIDITY = datetime.timedelta(days=3650)


def _token_part(length: int) -> str:
    return "".join(choice(_TOKEN_ALPHABET) for _ in range(length))


def generate_ca() -> tuple[str, str]:
    """A self-signed Kubernetes CA (ECDSA P-256, CN=kubernetes, 10 years): (cert PEM, key PEM).

    kubeadm loads an RSA or ECDSA CA key from /etc/kubernetes/pki (pkiutil.TryLoadKeyFromDisk)
    and signs its own certificates with it.
    """
    return self_signed("kubernetes", CA_VALIDITY, ca=True)


def generate_secrets() -> ClusterSecrets:
    """Fresh secrets for a cluster: bootstrap token, certificate key, CA, and the keys its
    control-plane members share (service accounts, front proxy CA, etcd CA). Not
    deterministic."""
    cert_pem, key_pem = generate_ca()
    sa_key, sa_pub = key_pair()
    front_proxy_cert, front_proxy_key = self_signed("front-proxy-ca", CA_VALIDITY, ca=True)
    etcd_cert, etcd_key = self_signed("etcd-ca", CA_VALIDITY, ca=True)
    return ClusterSecrets(
        bootstrap_token=f"{_token_part(6)}.{_token_part(16)}",
        certificate_key=token_hex(32),
        ca_cert_pem=cert_pem,
        ca_key_pem=key_pem,
        shared=SharedKeys(
            sa_key_pem=sa_key,
            sa_pub_pem=sa_pub,
            front_proxy_ca_cert_pem=front_proxy_cert,
            front_proxy_ca_key_pem=front_proxy_key,
            etcd_ca_cert_pem=etcd_cert,
            etcd_ca_key_pem=etcd_key,
        ),
    )


class BootstrapActivities:
    """The bootstrap activities of one gateway agent (its key seals and opens the secrets)."""

    def __init__(self, key: AgentKey) -> None:
        self.key = key

    def _seal(self, secrets: ClusterSecrets) -> SealedSecret:
        use = secrets_binding(
            self.key.gateway, current_lifecycle(), shared=secrets.shared is not None
        )
        return seal(secrets.model_dump_json(), self.key.public_bytes, use)

    @activity.defn(name="bootstrap_secrets")
    def secrets(self, request: SecretsRequest) -> SealedSecret:
        """Generate the cluster's secrets and seal them to this agent's key.

        A retry generates new ones; harmless, as only the recorded result is ever used.
        """
        sealed = self._seal(generate_secrets())
        activity.logger.info("generated secrets of cluster %s (sealed)", request.cluster)
        return sealed

    @activity.defn(name="cluster_kubeconfig")
    def kubeconfig(self, request: MintKubeconfig) -> KubeconfigResult:
        """A client certificate from the cluster's CA for `request.user`, in a kubeconfig
        sealed to the requester's key; only the record of the issue comes back in clear."""
        if current_lifecycle() != cluster_workflow_id(request.cluster):
            raise ApplicationError(
                f"a kubeconfig of cluster {request.cluster} is minted only for that cluster's "
                "own workflow",
                type=errors.NOT_AUTHORIZED,
                non_retryable=True,
            )
        secrets = open_cluster_secrets(self.key, request.secrets)
        groups = admin_groups(request.kubernetes_version)
        try:
            recipient = base64.b64decode(request.recipient_key, validate=True)
            cert_pem, key_pem, cert = client_certificate(
                secrets.ca_cert_pem,
                secrets.ca_key_pem,
                request.user,
                groups,
                timedelta(seconds=request.ttl_seconds),
            )
            document = kubeconfig_file(
                request.cluster,
                request.server,
                secrets.ca_cert_pem,
                request.user,
                cert_pem,
                key_pem,
            )
            sealed = seal(
                document, recipient, kubeconfig_binding(request.cluster, request.request_id)
            )
        except ValueError as exc:
            raise ApplicationError(
                f"kubeconfig for {request.user}: {exc}",
                type=errors.INVALID_SPEC,
                non_retryable=True,
            ) from None
        activity.logger.info(
            "issued a kubeconfig of cluster %s to %s until %s (serial %x)",
            request.cluster,
            request.user,
            cert.not_valid_after_utc.isoformat(),
            cert.serial_number,
        )
        issue = KubeconfigIssue(
            request_id=request.request_id,
            user=request.user,
            groups=groups,
            serial=f"{cert.serial_number:x}",
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            issued_at=cert.not_valid_before_utc,
            expires_at=cert.not_valid_after_utc,
        )
        statement = issued_statement(
            self.key.gateway, request.cluster, request.recipient_key, issue, sealed
        )
        return KubeconfigResult(issue=issue, sealed=sealed, signature=self.key.sign(statement))

    @activity.defn(name="bootstrap_render")
    def render(self, request: RenderRequest) -> RenderResult:
        """Render every node's guestinfo entries; return digests and sizes, no content.

        Without `request.secrets`, generate the cluster's secrets first and return them sealed
        in `RenderResult.secrets` (a retry generates new ones, as bootstrap_secrets does).
        """
        sealed: SealedSecret | None = None
        if request.secrets is None:
            secrets = generate_secrets()
            sealed = self._seal(secrets)
        else:
            secrets = open_cluster_secrets(self.key, request.secrets)
        summaries = []
        for node in request.nodes:
            try:
                _, summary = rendered(node, secrets)
            except ValueError as exc:
                raise ApplicationError(
                    f"node {node.hostname}: {exc}", type=errors.INVALID_SPEC, non_retryable=True
                ) from None
            summaries.append(summary)
        if sealed is not None:
            activity.logger.info("generated secrets of cluster %s (sealed)", _cluster(request))
        return RenderResult(nodes=summaries, secrets=sealed)


def _cluster(request: RenderRequest) -> str:
    return request.nodes[0].cluster if request.nodes else "?"
