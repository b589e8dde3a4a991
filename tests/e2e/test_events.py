"""GetContainerEvents as the kubelet's evented PLEG reads it: the lifecycle in order, and
a client whose stream broke that subscribes again and relists once loses nothing."""

from __future__ import annotations

import threading

import grpc

from kiyot_py.gen.runtime.v1 import api_pb2 as pb

from .helpers import new_pod, remove_pod, run, wait_for, wait_state

STATE_OF_EVENT = {
    pb.CONTAINER_CREATED_EVENT: pb.CONTAINER_CREATED,
    pb.CONTAINER_STARTED_EVENT: pb.CONTAINER_RUNNING,
    pb.CONTAINER_STOPPED_EVENT: pb.CONTAINER_EXITED,
}


class Subscription:
    """One GetContainerEvents stream, read in a thread of its own."""

    def __init__(self, cri) -> None:
        self.stream = cri.GetContainerEvents(pb.GetEventsRequest())
        self.events: list[pb.ContainerEventResponse] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except grpc.RpcError:
            pass
        finally:
            self.ended.set()

    def of(self, container_id: str) -> list[int]:
        return [e.container_event_type for e in self.events if e.container_id == container_id]

    def cancel(self) -> None:
        self.stream.cancel()
        assert self.ended.wait(10)


def pulled(img, test_images) -> str:
    ref = test_images["busybox"].ref
    img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)))
    return ref


def test_a_lifecycle_yields_created_started_stopped_deleted(cri, img, test_images, tmp_path):
    image = pulled(img, test_images)
    sub = Subscription(cri)
    try:
        sandbox_id, config = new_pod(cri, "events-order", tmp_path)
        try:
            cid = run(cri, (sandbox_id, config), "short", image, ["sh", "-c", "exit 3"])
            wait_state(cri, cid, pb.CONTAINER_EXITED)
            cri.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
            wait_for(lambda: len(sub.of(cid)) == 4, 30)
            assert sub.of(cid) == [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
                                   pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT]
            stopped = next(e for e in sub.events
                           if e.container_id == cid and e.container_event_type == pb.CONTAINER_STOPPED_EVENT)
            assert stopped.pod_sandbox_status.id == sandbox_id
            assert [(s.id, s.exit_code) for s in stopped.containers_statuses] == [(cid, 3)]
        finally:
            remove_pod(cri, sandbox_id)
        wait_for(lambda: pb.CONTAINER_DELETED_EVENT in sub.of(sandbox_id), 30)
        assert sub.of(sandbox_id) == [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
                                      pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT]
    finally:
        sub.cancel()


def test_a_broken_stream_subscribed_again_plus_one_relist_matches_the_list(cri, img, test_images, tmp_path):
    image = pulled(img, test_images)
    sandbox_id, config = new_pod(cri, "events-again", tmp_path)
    pod = (sandbox_id, config)
    try:
        first = Subscription(cri)
        a = run(cri, pod, "a", image, ["sleep", "3600"])
        wait_for(lambda: pb.CONTAINER_STARTED_EVENT in first.of(a), 30)
        first.cancel()  # the stream breaks mid-lifecycle
        cri.StopContainer(pb.StopContainerRequest(container_id=a, timeout=0))  # unseen by any stream

        again = Subscription(cri)  # subscribe first, then relist: nothing falls between
        known = {c.id: c.state for c in cri.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id))).containers}
        b = run(cri, pod, "b", image, ["sleep", "3600"])
        c = run(cri, pod, "c", image, ["true"])
        wait_state(cri, c, pb.CONTAINER_EXITED)
        cri.RemoveContainer(pb.RemoveContainerRequest(container_id=a))
        wait_for(lambda: pb.CONTAINER_DELETED_EVENT in again.of(a) and pb.CONTAINER_STARTED_EVENT in again.of(b)
                 and pb.CONTAINER_STOPPED_EVENT in again.of(c), 30)
        again.cancel()

        for event in again.events:
            if event.container_id == sandbox_id:
                continue
            if event.container_event_type == pb.CONTAINER_DELETED_EVENT:
                known.pop(event.container_id, None)
            else:
                known[event.container_id] = STATE_OF_EVENT[event.container_event_type]
        listed = {c.id: c.state for c in cri.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id))).containers}
        assert known == listed == {b: pb.CONTAINER_RUNNING, c: pb.CONTAINER_EXITED}
    finally:
        remove_pod(cri, sandbox_id)
