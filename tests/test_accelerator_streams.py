"""engine/training/accelerator_streams.py: DeepSpeed's stream calls without torch's per-call device look-up.

On a GPU the equivalents are compared with torch's own (the current stream; the stream context over one scenario of
nested, failing, reused and None contexts, one object entered inside itself, a stream of another device or of
another class); everywhere the install rules are checked on a stand-in accelerator.
"""

from __future__ import annotations

import pytest
import torch

from engine.training import accelerator_streams
from engine.training.accelerator_streams import CurrentDeviceStream, fast_streams_unsupported

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class StandIn:
    """An accelerator with DeepSpeed's two methods on its class, as the real one has them."""

    def __init__(self, name="cuda"):
        self.name = name

    def device_name(self, device_index=None):
        return self.name

    def current_stream(self, device_index=None):
        return ("class", device_index)

    def stream(self, stream):
        return ("class", stream)


def test_install_and_restore_on_the_accelerator_instance(monkeypatch):
    import deepspeed.accelerator

    accelerator = StandIn()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    monkeypatch.setattr(accelerator_streams, "fast_streams_unsupported", lambda acc=None: None)
    assert accelerator_streams.use_fast_streams() is None
    assert accelerator.stream is CurrentDeviceStream and accelerator_streams.fast_streams_active()
    assert accelerator.current_stream is accelerator_streams._current_stream
    accelerator_streams.restore_deepspeed_streams()
    assert accelerator.current_stream(3) == ("class", 3) and accelerator.stream("s") == ("class", "s")
    assert not accelerator_streams.fast_streams_active()
    accelerator_streams.restore_deepspeed_streams()  # twice is harmless
    # refused: nothing installed
    monkeypatch.setattr(accelerator_streams, "fast_streams_unsupported", lambda acc=None: "no")
    assert accelerator_streams.use_fast_streams() == "no"
    assert accelerator.stream("s") == ("class", "s")


def test_refused_off_cuda():
    assert "not CUDA" in fast_streams_unsupported(StandIn("cpu"))
    if not torch.cuda.is_available():
        assert fast_streams_unsupported(StandIn("cuda")) == "CUDA is not available"


def test_none_is_a_no_op():
    with CurrentDeviceStream(None) as entered:
        assert entered is None


@cuda
def test_current_stream_equals_torchs():
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            assert accelerator_streams._current_stream() == torch.cuda.current_stream() == stream
            assert accelerator_streams._current_stream(torch.cuda.current_device()) == stream


def run_scenario(context, outer, inner) -> list[int]:
    """The current stream's id at each point of nested, failing and reused contexts made by `context`."""
    seen = [torch.cuda.current_stream().stream_id]
    with context(outer):
        seen.append(torch.cuda.current_stream().stream_id)
        with context(inner):
            seen.append(torch.cuda.current_stream().stream_id)
        seen.append(torch.cuda.current_stream().stream_id)
    seen.append(torch.cuda.current_stream().stream_id)
    try:
        with context(inner):
            seen.append(torch.cuda.current_stream().stream_id)
            raise ValueError("left by an exception")
    except ValueError:
        pass
    seen.append(torch.cuda.current_stream().stream_id)
    reused = context(outer)
    for _ in range(2):
        with reused:
            seen.append(torch.cuda.current_stream().stream_id)
        seen.append(torch.cuda.current_stream().stream_id)
    with context(None):
        seen.append(torch.cuda.current_stream().stream_id)
    return seen


@cuda
def test_stream_context_equals_torchs():
    outer, inner = torch.cuda.Stream(), torch.cuda.Stream()
    expected = run_scenario(torch.cuda.stream, outer, inner)
    assert len(set(expected)) == 3  # the scenario does move between three streams
    assert run_scenario(CurrentDeviceStream, outer, inner) == expected
    # work queued inside runs on the stream entered
    with CurrentDeviceStream(inner):
        x = torch.ones(1 << 20, device="cuda") * 2
    torch.cuda.current_stream().wait_stream(inner)
    assert float(x.sum()) == 2 * (1 << 20)
    # one object entered inside itself restores each level (torch's context keeps one saved stream, so it cannot)
    start = torch.cuda.current_stream()
    context = CurrentDeviceStream(outer)
    with context:
        with CurrentDeviceStream(inner):
            with context:
                assert torch.cuda.current_stream() == outer
            assert torch.cuda.current_stream() == inner
        assert torch.cuda.current_stream() == outer
    assert torch.cuda.current_stream() == start


@cuda
def test_a_stream_that_is_not_torch_cuda_stream_goes_to_torchs_context():
    generic = torch.Stream(device="cuda")  # torch's device-generic stream, not a torch.cuda.Stream
    assert not isinstance(generic, torch.cuda.Stream)
    start = torch.cuda.current_stream()
    context = CurrentDeviceStream(generic)
    with context:
        assert torch.cuda.current_stream().stream_id == generic.stream_id
        assert isinstance(context.saved[-1], torch.cuda.StreamContext)
    assert torch.cuda.current_stream() == start and not context.saved


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_stream_of_another_device_goes_to_torchs_context():
    with torch.cuda.device(0):
        other = torch.cuda.Stream(device=1)
        before = torch.cuda.current_stream(1)
        with CurrentDeviceStream(other):
            assert torch.cuda.current_stream(1) == other  # as torch's context: the other device's stream set
        assert torch.cuda.current_stream(1) == before and torch.cuda.current_device() == 0


@cuda
def test_the_trainer_installs_them_and_deepspeed_mode_restores():
    from deepspeed.accelerator import get_accelerator

    from engine.training.optim import destroy_engine, grad_checks
    from tests.test_optim import deepspeed_engine, train_config

    accelerator_streams.restore_deepspeed_streams()  # the install is process-wide: start without it
    assert accelerator_streams.fast_streams_unsupported() is None
    engine, _, _ = deepspeed_engine(train_config(zero_stage=2, device="cuda"), device="cuda")
    try:
        assert accelerator_streams.fast_streams_active()
        assert get_accelerator().current_stream() == torch.cuda.current_stream()
        grad_checks(engine, "deepspeed")
        assert not accelerator_streams.fast_streams_active()
        grad_checks(engine, "auto")
        assert accelerator_streams.fast_streams_active()
    finally:
        destroy_engine(engine)
        accelerator_streams.restore_deepspeed_streams()
