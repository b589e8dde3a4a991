"""ListMetricDescriptors and ListPodSandboxMetrics: the cells' figures in the form the
kubelet turns into its cAdvisor-style metrics (/metrics/cadvisor).

The kubelet reads the descriptors once and then, for every metric, takes the descriptor
of its name and pairs its label keys with the metric's label values, in order; a metric
whose name no descriptor has is dropped. Values are integers, as the CRI carries them:
seconds are whole seconds (as containerd gives them). A pod's network counters are the
pod's own metrics (no container, the sandbox's id); the others are its containers'.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiyot_py.gen.runtime.v1 import api_pb2 as pb
from kiyot_py.model import Container, Sandbox
from kiyot_py.pods.stats import ContainerUsage, PodUsage

SECOND = 1_000_000_000
BASE_LABELS = ("pod", "namespace", "container", "id", "image")


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    type: pb.MetricType
    labels: tuple[str, ...] = BASE_LABELS


CPU_USAGE = Descriptor("container_cpu_usage_seconds_total", "Cumulative CPU time consumed in seconds.", pb.COUNTER)
MEMORY_USAGE = Descriptor("container_memory_usage_bytes",
                          "Current memory usage in bytes, including all memory regardless of when it was accessed",
                          pb.GAUGE)
MEMORY_WORKING_SET = Descriptor("container_memory_working_set_bytes", "Current working set in bytes.", pb.GAUGE)
MEMORY_RSS = Descriptor("container_memory_rss", "Size of RSS in bytes.", pb.GAUGE)
MEMORY_FAILURES = Descriptor("container_memory_failures_total", "Cumulative count of memory allocation failures.",
                             pb.COUNTER, (*BASE_LABELS, "failure_type", "scope"))
PROCESSES = Descriptor("container_processes", "Number of processes running inside the container.", pb.GAUGE)
FS_USAGE = Descriptor("container_fs_usage_bytes",
                      "Number of bytes that are consumed by the container on this filesystem.", pb.GAUGE,
                      (*BASE_LABELS, "device"))
LAST_SEEN = Descriptor("container_last_seen", "Last time a container was seen by the exporter", pb.GAUGE)
START_TIME = Descriptor("container_start_time_seconds", "Start time of the container since unix epoch in seconds.",
                        pb.GAUGE)
NETWORK_LABELS = (*BASE_LABELS, "interface")
# (descriptor, the interface's counter)
NETWORK = tuple(
    (Descriptor(f"container_network_{name}", text, pb.COUNTER, NETWORK_LABELS), field)
    for name, text, field in (
        ("receive_bytes_total", "Cumulative count of bytes received", "rx_bytes"),
        ("receive_packets_total", "Cumulative count of packets received", "rx_packets"),
        ("receive_packets_dropped_total", "Cumulative count of packets dropped while receiving", "rx_dropped"),
        ("receive_errors_total", "Cumulative count of errors encountered while receiving", "rx_errors"),
        ("transmit_bytes_total", "Cumulative count of bytes transmitted", "tx_bytes"),
        ("transmit_packets_total", "Cumulative count of packets transmitted", "tx_packets"),
        ("transmit_packets_dropped_total", "Cumulative count of packets dropped while transmitting", "tx_dropped"),
        ("transmit_errors_total", "Cumulative count of errors encountered while transmitting", "tx_errors"),
    ))
DESCRIPTORS = (CPU_USAGE, MEMORY_USAGE, MEMORY_WORKING_SET, MEMORY_RSS, MEMORY_FAILURES, PROCESSES, FS_USAGE,
               LAST_SEEN, START_TIME, *(d for d, _ in NETWORK))


def descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=d.name, help=d.help, label_keys=d.labels) for d in DESCRIPTORS]


def _metric(d: Descriptor, at: int, labels: tuple[str, ...], value: int) -> pb.Metric:
    assert len(labels) == len(d.labels), (d.name, labels)  # the kubelet pairs them one to one
    return pb.Metric(name=d.name, timestamp=at, metric_type=d.type, label_values=labels,
                     value=pb.UInt64Value(value=value))


def container_metrics(sb: Sandbox, c: Container, usage: ContainerUsage, layer_filesystem: str) -> pb.ContainerMetrics:
    at = usage.timestamp
    labels = (sb.name, sb.namespace, c.name, c.id, c.image)
    out = [_metric(LAST_SEEN, at, labels, at // SECOND)]
    if c.started_at:
        out.append(_metric(START_TIME, at, labels, c.started_at // SECOND))
    if usage.cpu is not None:
        out.append(_metric(CPU_USAGE, at, labels, usage.cpu.usage_core_nano_seconds // SECOND))
    if usage.memory is not None:
        m = usage.memory
        out += [_metric(MEMORY_USAGE, at, labels, m.usage_bytes),
                _metric(MEMORY_WORKING_SET, at, labels, m.working_set_bytes),
                _metric(MEMORY_RSS, at, labels, m.rss_bytes),
                _metric(MEMORY_FAILURES, at, (*labels, "pgfault", "container"), m.page_faults),
                _metric(MEMORY_FAILURES, at, (*labels, "pgmajfault", "container"), m.major_page_faults)]
    if usage.process_count is not None:
        out.append(_metric(PROCESSES, at, labels, usage.process_count))
    if usage.writable_layer is not None:
        out.append(_metric(FS_USAGE, usage.writable_layer.timestamp, (*labels, layer_filesystem),
                           usage.writable_layer.used_bytes))
    return pb.ContainerMetrics(container_id=c.id, metrics=out)


def pod_sandbox_metrics(sb: Sandbox, usage: PodUsage | None,
                        containers: list[tuple[Container, ContainerUsage | None]],
                        layer_filesystem: str) -> pb.PodSandboxMetrics:
    """A ready sandbox's metrics: its network's, and those of each container sampled."""
    pod: list[pb.Metric] = []
    if usage is not None and usage.network is not None:
        at = usage.network.timestamp
        for i in usage.network.interfaces:
            labels = (sb.name, sb.namespace, "", sb.id, "", i.name)  # no container, no image: the pod's own
            pod += [_metric(d, at, labels, getattr(i, counter)) for d, counter in NETWORK]
    return pb.PodSandboxMetrics(
        pod_sandbox_id=sb.id, metrics=pod,
        container_metrics=[container_metrics(sb, c, u, layer_filesystem) for c, u in containers if u is not None])
