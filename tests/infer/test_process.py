"""The engine in a process of its own (what `familial serve` runs): the same answers as the
engine in this process, errors raised in the caller, and no request left hanging when the
engine process is cancelled, stopped or killed."""

from __future__ import annotations

import os
import signal

import pytest

from familial.checkpoint_io import CheckpointError, save_family
from familial.infer.engine import Engine
from familial.infer.process import EngineProcess, EngineProcessError
from familial.infer.sampling import SamplingParams

PROMPTS = [[5, 9, 2], [11, 3, 7, 7, 1, 40, 2, 8, 19], [60]]
# Thousands of steps of a tiny model: seconds of work, so a cancel or a kill lands mid-answer.
LONG = SamplingParams(max_new_tokens=4000, temperature=0)


@pytest.fixture(scope="module")
def family_dir(family_factory, tmp_path_factory):
    return save_family(family_factory(max_position_embeddings=4096), tmp_path_factory.mktemp("process") / "family")


@pytest.fixture
def engine(family_dir):
    engine = EngineProcess(family_dir, threads=1, max_batch_size=4, max_queue=8)
    yield engine
    engine.stop()


def test_answers_equal_the_engine_in_this_process(engine, family_dir):
    local = Engine.from_checkpoint(family_dir, max_batch_size=4, max_queue=8)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    for member in (1, 5):
        ours = engine.generate(PROMPTS, member=member, params=greedy)
        assert ours == local.generate(PROMPTS, member=member, params=greedy)
        assert all(len(r.token_ids) == 12 and r.exits == [member] * 12 for r in ours)
    speculative = engine.generate(PROMPTS, member=5, params=greedy, speculative=True)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in local.generate(PROMPTS, 5, greedy)]
    assert all(r.drafted > 0 for r in speculative)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert engine.generate(PROMPTS, 3, sampled) == local.generate(PROMPTS, 3, sampled)
    assert engine.stats() | {"alive": True} == local.stats() | {"alive": True}


def test_bad_requests_raise_in_the_caller_and_leave_the_engine_serving(engine):
    with pytest.raises(ValueError, match="unknown member 'exit-9'"):
        engine.submit([1, 2], member="exit-9")
    with pytest.raises(ValueError, match=r"token 500 is not an id in \[0, 97\)"):
        engine.submit([1, 500], member=1)
    assert engine.generate([[1, 2]], member=1, params=SamplingParams(max_new_tokens=3))[0].finish_reason == "length"


def test_cancel_and_stop_end_requests_as_cancelled(engine):
    handle = engine.submit(PROMPTS[0], member=5, params=LONG)
    assert handle.get(timeout=120).token_id is not None
    handle.cancel()
    assert list(handle)[-1].finish_reason == "cancelled"
    running = engine.submit(PROMPTS[1], member=5, params=LONG)
    assert running.get(timeout=120).token_id is not None
    engine.stop()
    assert list(running)[-1].finish_reason == "cancelled"
    assert engine.stats()["alive"] is False


def test_a_killed_engine_process_ends_every_request_saying_so(engine):
    handles = [engine.submit(p, member=5, params=LONG) for p in PROMPTS]
    assert handles[0].get(timeout=120).token_id is not None
    os.kill(engine._process.pid, signal.SIGKILL)
    for handle in handles:
        last = list(handle)[-1]
        assert last.finish_reason == "cancelled" and "the engine process ended" in last.error
    assert engine.stats()["alive"] is False
    with pytest.raises(EngineProcessError, match="the engine process ended"):
        engine.submit([1, 2], member=1)


def test_a_family_that_does_not_load_is_refused_with_its_reason(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'missing'}: not a directory"):
        EngineProcess(tmp_path / "missing")
