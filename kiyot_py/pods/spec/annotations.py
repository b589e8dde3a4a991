"""The annotations containerd's CRI plugin sets, which tools in the cell and the node read."""

from __future__ import annotations

from kiyot_py.gen.runtime.v1 import api_pb2

ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANNOTATION_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_IMAGE_NAME = "io.kubernetes.cri.image-name"
# Which RuntimeDefault seccomp profile was used: "cell" (the profile the cell reported)
# or "builtin" (the node's small deny list).
ANNOTATION_SECCOMP_SOURCE = "io.kiyot.seccomp-default-source"


def container_annotations(config: api_pb2.ContainerConfig, sandbox: api_pb2.PodSandboxConfig) -> dict[str, str]:
    out = dict(config.annotations)
    out[ANNOTATION_CONTAINER_TYPE] = "container"
    out[ANNOTATION_CONTAINER_NAME] = config.metadata.name
    if sandbox.metadata.name:
        out[ANNOTATION_SANDBOX_NAME] = sandbox.metadata.name
    if sandbox.metadata.namespace:
        out[ANNOTATION_SANDBOX_NAMESPACE] = sandbox.metadata.namespace
    if sandbox.metadata.uid:
        out[ANNOTATION_SANDBOX_UID] = sandbox.metadata.uid
    if config.image.image:
        out[ANNOTATION_IMAGE_NAME] = config.image.image
    return out
