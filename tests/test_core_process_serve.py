"""The engine-core process loop (`core_process.serve`) with its input thread, on a
stand-in core over real ZMQ sockets: requests are built on the input thread, messages are
applied in the order they were sent, control calls are answered, and a failure on the input
thread ends the loop with that error."""

from __future__ import annotations

import threading
import uuid

import msgspec
import pytest
import torch
import zmq

from mmengine.core_process import serve
from mmengine.messages import (
    ControlMsg,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    params_to_msg,
)
from mmengine.sampling_params import SamplingParams


class StandInCore:
    """Records what the loop asks of it, and on which thread; a request whose id starts
    with "bad" is refused by make_request, as a bad payload would be."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.make_threads: set[str] = set()
        self.running: list[str] = []

    def make_request(self, msg: EngineCoreRequest):  # noqa: ANN201
        self.make_threads.add(threading.current_thread().name)
        self.calls.append(("make", msg.request_id))
        if msg.request_id.startswith("bad"):
            return EngineCoreOutput(msg.request_id, [], finish_reason="error", error="bad")
        return msg.request_id

    def add_prepared(self, req: str) -> EngineCoreOutput | None:
        self.calls.append(("add", req))
        self.running.append(req)
        return None

    def abort_requests(self, ids: list[str]) -> list[EngineCoreOutput]:
        self.calls.append(("abort", ",".join(ids)))
        self.running = [r for r in self.running if r not in ids]
        return [EngineCoreOutput(r, [], finish_reason="abort") for r in ids]

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[EngineCoreOutput]:
        # Every running request finishes with one token.
        done, self.running = self.running, []
        for r in done:
            self.calls.append(("step", r))
        return [EngineCoreOutput(r, [7], finish_reason="length") for r in done]

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running))

    def reset_prefix_cache(self) -> bool:
        return True


def _request(rid: str) -> EngineCoreRequest:
    return EngineCoreRequest(rid, [1, 2, 3], params_to_msg(SamplingParams(max_tokens=1)))


@pytest.fixture
def sockets(tmp_path):  # noqa: ANN001, ANN201
    ctx = zmq.Context()
    addr_in = f"ipc://{tmp_path}/in-{uuid.uuid4().hex[:6]}"
    addr_out = f"ipc://{tmp_path}/out-{uuid.uuid4().hex[:6]}"
    front_push, core_pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    core_push, front_pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    front_push.bind(addr_in)
    core_pull.connect(addr_in)
    front_pull.bind(addr_out)
    core_push.connect(addr_out)
    yield front_push, core_pull, core_push, front_pull
    for s in (front_push, core_pull, core_push, front_pull):
        s.close(0)
    ctx.term()


def _run(core: StandInCore, core_pull, core_push) -> tuple[threading.Thread, list]:  # noqa: ANN001
    errors: list[BaseException] = []

    def target() -> None:
        try:
            serve(core, core_pull, core_push)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=target, name="engine-loop")
    t.start()
    return t, errors


def _receive(front_pull, n: int) -> list[EngineCoreOutputs]:  # noqa: ANN001
    dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
    out = []
    for _ in range(n):
        assert front_pull.poll(10_000), "no answer from the engine loop"
        out.append(dec.decode(front_pull.recv()))
    return out


def test_requests_are_built_on_the_input_thread_and_applied_in_send_order(sockets) -> None:  # noqa: ANN001
    front_push, core_pull, core_push, front_pull = sockets
    core = StandInCore()
    loop, errors = _run(core, core_pull, core_push)
    enc = msgspec.msgpack.Encoder()
    front_push.send(enc.encode(ControlMsg("add", requests=[_request("a"), _request("bad-1")])))
    front_push.send(enc.encode(ControlMsg("stats", call_id=5)))
    answers = _receive(front_pull, 2)  # the stats answer; the step's outputs
    front_push.send(enc.encode(ControlMsg("shutdown")))
    loop.join(10)
    assert not loop.is_alive() and not errors
    assert core.make_threads == {"core-input"}  # never the engine loop's thread
    # The refused request never reached the scheduler; "a" was added, then stepped.
    assert core.calls == [("make", "a"), ("make", "bad-1"), ("add", "a"), ("step", "a")]
    by_kind = {"error": [], "length": []}
    stats = [a for a in answers if a.stats is not None]
    for a in answers:
        for o in a.outputs:
            by_kind[o.finish_reason].append(o.request_id)
    assert by_kind == {"error": ["bad-1"], "length": ["a"]}
    assert len(stats) == 1 and stats[0].call_id == 5


def test_an_abort_sent_after_an_add_is_applied_after_it(sockets) -> None:  # noqa: ANN001
    front_push, core_pull, core_push, front_pull = sockets
    core = StandInCore()
    core.step = lambda: []  # requests stay running until aborted
    core.running = ["warm"]  # the loop is busy: it polls its inbox without waiting
    loop, errors = _run(core, core_pull, core_push)
    enc = msgspec.msgpack.Encoder()
    for i in range(20):
        front_push.send(enc.encode(ControlMsg("add", requests=[_request(f"r{i}")])))
        front_push.send(enc.encode(ControlMsg("abort", abort_ids=[f"r{i}"])))
    front_push.send(enc.encode(ControlMsg("shutdown")))
    loop.join(10)
    assert not loop.is_alive() and not errors
    applied = [c for c in core.calls if c[0] in ("add", "abort")]
    assert applied == [(k, f"r{i}") for i in range(20) for k in ("add", "abort")]
    assert core.running == ["warm"]


def test_a_failure_on_the_input_thread_ends_the_loop_with_that_error(sockets) -> None:  # noqa: ANN001
    front_push, core_pull, core_push, front_pull = sockets
    core = StandInCore()
    loop, errors = _run(core, core_pull, core_push)
    front_push.send(b"\xc1 not msgpack")  # 0xc1 is never valid msgpack
    loop.join(10)
    assert not loop.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], msgspec.DecodeError)


def test_core_process_threads_default_to_few_on_a_gpu_and_the_frontends_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mmengine.config import EngineConfig
    from mmengine.core_client import GPU_CORE_THREADS, default_core_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert default_core_threads(EngineConfig(model="m", device="cuda")) == GPU_CORE_THREADS
    assert default_core_threads(EngineConfig(model="m", device="cuda:1")) == GPU_CORE_THREADS
    assert default_core_threads(EngineConfig(model="m", device="cpu")) == 16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_core_threads(EngineConfig(model="m", device="auto")) == 16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_core_threads(EngineConfig(model="m", device="auto")) == GPU_CORE_THREADS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_core_threads(EngineConfig(model="m", device="cuda")) == 2
