"""What confines the builder pods in production, rendered from the config: their security
context (the pod spec, through :func:`drivers.airflow.glue.builder_pod_kwargs`) and the
NetworkPolicy that applies to them (``drivers deploy network-policy``, a manifest to
``kubectl apply -f -``).

A bundle is untrusted input and kbuild runs its Makefiles: a builder pod runs as uid 1000
(the builder images' user), never root, with a read-only root file system and its shard's
work folder an emptyDir, no privilege escalation, every capability dropped, the runtime's
default seccomp profile, no Kubernetes API token; and it may only reach DNS, the GKE
metadata server (workload identity's tokens) and Google APIs (GCS) through Private Google
Access. Nothing reaches into it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from drivers.domain.config import Config, load_config

BUILDER_UID = 1000  # the builder images' user (images/*/Dockerfile: USER 1000:1000)
WORK_VOLUME = "work"
WORK_MOUNT = "/work"  # the shard's scratch (TMPDIR): the only writable path in the pod
# An emptyDir may grow to this: one extracted bundle (~100 MB) and a driver tree per kind.
WORK_SIZE_LIMIT = "8Gi"
BUILDER_POLICY = "collector-drivers-builders"


def builder_security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod securityContext, container securityContext) of a builder pod, as Kubernetes
    objects (camelCase keys)."""
    seccomp = {"type": "RuntimeDefault"}
    pod = {
        "runAsNonRoot": True,
        "runAsUser": BUILDER_UID,
        "runAsGroup": BUILDER_UID,
        "fsGroup": BUILDER_UID,  # the emptyDir is the builder's
        "seccompProfile": seccomp,
    }
    container = {
        "runAsNonRoot": True,
        "runAsUser": BUILDER_UID,
        "runAsGroup": BUILDER_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": seccomp,
    }
    return pod, container


def builder_pod_selector() -> dict[str, Any]:
    """The builder pods' labels (glue._pod_kwargs: ``app`` and ``builder``)."""
    return {
        "matchLabels": {"app": "collector-drivers"},
        "matchExpressions": [{"key": "builder", "operator": "Exists"}],
    }


def builder_network_policy(config: Config) -> dict[str, Any]:
    """The NetworkPolicy of the builder pods: no ingress; egress only to the cluster's DNS,
    the GKE metadata server and the Google APIs ranges of ``[kubernetes] egress``."""
    egress = config.kubernetes["egress"]
    dns = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    rules = [
        {
            "to": [dns],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        {
            "to": [{"ipBlock": {"cidr": cidr}} for cidr in egress["metadata_server"]],
            "ports": [{"protocol": "TCP", "port": p} for p in egress["metadata_ports"]],
        },
        {
            "to": [{"ipBlock": {"cidr": cidr}} for cidr in egress["google_apis"]],
            "ports": [{"protocol": "TCP", "port": 443}],
        },
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": BUILDER_POLICY,
            "namespace": config.kubernetes["namespace"],
            "labels": {"app": "collector-drivers"},
        },
        "spec": {
            "podSelector": builder_pod_selector(),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": rules,
        },
    }


def cmd_deploy(args: argparse.Namespace) -> int:
    """``drivers deploy network-policy``: the manifest as JSON (``kubectl apply -f -``)."""
    config = load_config(args.config) if args.config else load_config()
    json.dump(builder_network_policy(config), sys.stdout, indent=2)
    print()
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "deploy", help="render production objects: network-policy (the builder pods' egress)"
    )
    p.add_argument("what", choices=["network-policy"])
    p.add_argument("--config", help="the pipeline config (default: DRIVERS_CONFIG, shipped)")
    p.set_defaults(func=cmd_deploy)
