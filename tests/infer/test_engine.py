"""The runtime against references: transformers, uncached forward, one-by-one decoding."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from familial.checkpoint_io import export_member, save_family
from familial.infer import Engine, QueueFull, SamplingParams
from familial.infer.cache import SlotCache
from familial.infer.requests import result_of
from familial.infer.runner import Row, Runner
from gates import HANG_S, ForwardGate

GREEDY = SamplingParams(max_new_tokens=10, greedy=True)


@pytest.mark.reference
@pytest.mark.parametrize("member", [1, 5])
def test_greedy_matches_transformers_generate_on_exported_member(family, tmp_path, member):
    from transformers import AutoModelForCausalLM

    save_family(family, tmp_path / "family")
    export_member(tmp_path / "family", tmp_path / "dense", member)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    prompt = [3, 14, 15, 92, 65]
    expected = dense.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    engine = Engine.from_checkpoint(tmp_path / "family", max_batch_size=2)
    result = engine.generate([prompt], member=member, params=GREEDY)[0]
    assert result.token_ids == expected
    assert result.exits == [member] * 10 and result.finish_reason == "length"


def test_cached_decoding_equals_uncached_forward(family):
    """Prefill, then one token at a time through the slot cache, at every exit."""
    cache = SlotCache(family.config, num_slots=3, max_len=32)
    runner = Runner(family, cache)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    full = family(ids)
    for exit_layer in family.config.exits:
        slot = 2
        out = runner.forward([Row(slot, 0, exit_layer, length=7, all_logits=True)], tokens=ids[0, :7])[0]
        torch.testing.assert_close(out.logits, full[exit_layer][0, :7], atol=1e-4, rtol=1e-4)
        for t in range(7, 12):
            out = runner.forward([Row(slot, t, exit_layer)], tokens=ids[0, t:t + 1])[0]
            torch.testing.assert_close(out.logits[-1], full[exit_layer][0, t], atol=1e-4, rtol=1e-4)


def test_batched_different_lengths_and_members_equals_one_by_one(family, greedy_reference):
    # Five requests through three slots: sequences join and leave the running batch.
    prompts = [[5, 6, 7], [8] * 9, [1, 2], [40, 41, 42, 43, 44, 45], [7]]
    members = [1, 5, 3, 5, 1]
    lengths = [10, 4, 7, 9, 6]
    engine = Engine(family, max_batch_size=3, max_seq_len=64)
    handles = [engine.submit(p, member=m, params=SamplingParams(max_new_tokens=n, greedy=True))
               for p, m, n in zip(prompts, members, lengths)]
    with engine._drive:
        while not all(h.done for h in handles):
            engine._step()
    for handle, prompt, member, n in zip(handles, prompts, members, lengths):
        events = list(handle)
        assert [e.token_id for e in events] == greedy_reference(family, prompt, member, n)
        assert {e.exit for e in events} == {member}
        assert events[-1].finish_reason == "length" and handle.completion_tokens == n


def test_sampling_with_seed_is_reproducible_whatever_the_batch(family):
    engine = Engine(family, max_batch_size=4)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.2, seed=7)
    alone = engine.generate([[1, 2, 3]], member=3, params=params)[0].token_ids
    crowd = [engine.submit(p, member=m, params=SamplingParams(max_new_tokens=12, seed=s))
             for p, m, s in (([9, 9], 1, 1), ([4, 5, 6, 7], 5, 2), ([2], 3, 3))]
    again = engine.generate([[1, 2, 3]], member=3, params=params)[0].token_ids
    assert all(h.done for h in crowd)
    assert again == alone
    other = engine.generate([[1, 2, 3]], member=3, params=SamplingParams(
        max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=8))[0]
    assert other.token_ids != alone


def test_stop_strings_and_eos_end_generation(family):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    engine = Engine(family, tokenizer=tokenizer)
    plain = engine.generate([[1, 2, 3]], member=5, params=GREEDY)[0]
    words = plain.text.split()
    assert plain.text == tokenizer.decode(plain.token_ids) and len(words) == 10
    stop = f" {words[4]}"
    cut = engine.generate([[1, 2, 3]], member=5, params=SamplingParams(
        max_new_tokens=10, greedy=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == plain.text[:plain.text.find(stop)]
    end_of_turn = plain.token_ids[3]
    turn = engine.generate([[1, 2, 3]], member=5, params=SamplingParams(
        max_new_tokens=10, greedy=True, stop_token_ids=[end_of_turn]))[0]
    assert turn.token_ids == plain.token_ids[:plain.token_ids.index(end_of_turn) + 1]
    assert turn.finish_reason == "stop"
    assert turn.text == tokenizer.decode(turn.token_ids[:-1])
    family.config.eos_token_id = plain.token_ids[5]
    eos = Engine(family).generate([[1, 2, 3]], member=5, params=GREEDY)[0]
    assert eos.token_ids == plain.token_ids[:plain.token_ids.index(plain.token_ids[5]) + 1]
    assert eos.finish_reason == "stop"


def test_run_steps_on_the_calling_thread_until_another_thread_stops_it(family):
    """As the engine process and `familial generate` use it: requests come from another thread."""
    expected = Engine(family).generate([[1, 2, 3]], member=5, params=GREEDY)[0]
    engine = Engine(family, max_batch_size=1)
    seen = {}

    def client() -> None:
        try:
            seen["result"] = result_of(engine.submit([1, 2, 3], member=5, params=GREEDY))
            seen["alive"] = engine.stats()["alive"]
        finally:
            engine.stop()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run()
    thread.join(HANG_S)
    assert seen["result"].token_ids == expected.token_ids and seen["result"].finish_reason == "length"
    assert seen["alive"] and not engine.stats()["alive"]


def test_run_with_returns_the_work_and_raises_its_error_on_the_calling_thread(family):
    engine = Engine(family, max_batch_size=1)
    expected = Engine(family).generate([[1, 2, 3]], member=5, params=GREEDY)[0].token_ids
    for _ in range(2):  # a second run after the first one stopped
        served = engine.run_with(lambda: result_of(engine.submit([1, 2, 3], member=5, params=GREEDY)))
        assert served.token_ids == expected and served.finish_reason == "length"
    with pytest.raises(ValueError, match="97"):
        engine.run_with(lambda: engine.submit([1, 500]))
    assert not engine.stats()["alive"]


def test_cancel_frees_the_slot_and_a_full_queue_refuses(family):
    engine = Engine(family, max_batch_size=1, max_queue=2, max_seq_len=600)
    long = engine.submit([1, 2], params=SamplingParams(max_new_tokens=500, greedy=True))
    engine.submit([3], params=SamplingParams(max_new_tokens=3, greedy=True))
    with pytest.raises(QueueFull):
        engine.submit([4], params=GREEDY)
    # Prefill and one decode step pass; the engine is then held, far from 500 tokens.
    gate = ForwardGate(family.model.embed_tokens, allow=2)
    engine.start()
    try:
        assert long.get(timeout=HANG_S).token_id is not None
        gate.wait_held()
        long.cancel()
        gate.release()
        events = list(long)
        assert events[-1].finish_reason == "cancelled" and len(events) < 500
        waiting = engine.submit([5], params=SamplingParams(max_new_tokens=3, greedy=True))
        assert [e.finish_reason for e in waiting][-1] == "length"
    finally:
        gate.remove()
        engine.stop()
    with pytest.raises(queue.Empty):
        long.get(timeout=0)


def test_bad_requests_raise_clear_errors(family):
    engine = Engine(family)
    with pytest.raises(ValueError, match="97"):
        engine.submit([1, 500])
    with pytest.raises(ValueError, match="unknown member"):
        engine.submit([1], member="exit-2")
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], params=SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="smallest"):
        engine.submit([1], member=1, speculative=True)
    assert [m["id"] for m in engine.members()] == ["exit-1", "exit-3", "exit-5", "auto"]


def _drive(engine, handles):
    with engine._drive:
        while not all(h.done for h in handles):
            engine._step()
    return [list(h) for h in handles]


def test_one_hostile_request_leaves_four_streams_untouched(family):
    streams = [([1, 2, 3], SamplingParams(max_new_tokens=60, greedy=True)),
               ([4, 5], SamplingParams(max_new_tokens=60, temperature=0.9, seed=1)),
               ([6, 7, 8, 9], SamplingParams(max_new_tokens=60, temperature=1.2, top_p=0.8, seed=2)),
               ([10], SamplingParams(max_new_tokens=60, top_k=5, repetition_penalty=1.3, seed=3))]
    engine = Engine(family, max_batch_size=5, max_seq_len=96)
    alone = [engine.generate([p], member=5, params=params)[0].token_ids for p, params in streams]
    handles = [engine.submit(p, member=5, params=params) for p, params in streams]
    hostile = engine.submit([11, 12], member=5, params=SamplingParams(
        max_new_tokens=60, temperature=1e-38, repetition_penalty=0.01))
    events = _drive(engine, handles + [hostile])
    assert [[e.token_id for e in ev if e.token_id is not None] for ev in events[:4]] == alone
    assert [ev[-1].finish_reason for ev in events] == ["length"] * 5


@pytest.mark.parametrize("params", [dict(top_p=1e-300), dict(temperature=1e-45), dict(top_p=1e-300, top_k=1)])
def test_extreme_sampling_values_give_tokens(family, greedy_reference, params):
    result = Engine(family).generate([[1, 2, 3]], member=5, params=SamplingParams(max_new_tokens=8, **params))[0]
    assert result.finish_reason == "length" and result.error is None
    assert result.token_ids == greedy_reference(family, [1, 2, 3], 5, 8)


@pytest.mark.parametrize("where", ["batched call", "stop handling"])
def test_a_failing_sequence_ends_alone_with_an_error(family, greedy_reference, where):
    engine = Engine(family, max_batch_size=4, max_seq_len=64)
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8]]
    handles = [engine.submit(p, member=3, params=SamplingParams(max_new_tokens=12, greedy=True)) for p in prompts]
    victim = handles[1]
    if where == "batched call":
        forward = engine.runner.forward

        def failing(rows, **inputs):
            slot = next((s.slot for s in engine.scheduler.running.values() if s.handle is victim), None)
            if any(row.slot == slot and row.start >= 6 for row in rows):
                raise RuntimeError("boom")
            return forward(rows, **inputs)

        engine.runner.forward = failing
    else:
        accept = engine._accept

        def failing(sequence, token, exit_layer):
            if sequence.handle is victim and len(sequence.generated) == 4:
                raise ValueError("boom")
            accept(sequence, token, exit_layer)

        engine._accept = failing
    events = _drive(engine, handles)
    for handle, prompt, ev in zip(handles, prompts, events):
        expected = greedy_reference(family, prompt, 3, 12)
        tokens = [e.token_id for e in ev if e.token_id is not None]
        if handle is victim:
            assert ev[-1].finish_reason == "error" and ev[-1].error.endswith("Error: boom")
            assert 0 < len(tokens) < 12 and tokens == expected[:len(tokens)]
        else:
            assert tokens == expected and ev[-1].finish_reason == "length"


def test_chunked_prefill_gives_the_same_tokens_as_whole_prompts(family, greedy_reference):
    prompts = [list(range(1, 40)), [5, 6, 7], list(range(50, 75))]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    results = {}
    for chunk in (4, 512):
        engine = Engine(family, max_batch_size=3, max_seq_len=96, max_prefill_tokens=chunk)
        results[chunk] = [[r.token_ids for r in engine.generate(prompts, member=5, params=params)],
                          [r.token_ids for r in engine.generate(prompts, member=5, params=params,
                                                                speculative="cascade")],
                          [(r.token_ids, r.exits) for r in engine.generate(prompts, params=params, budget=0.6)]]
    assert results[4] == results[512]
    assert results[4][0] == results[4][1] == [greedy_reference(family, p, 5, 8) for p in prompts]


def test_new_prompts_prefill_together_and_never_stall_running_sequences(family):
    engine = Engine(family, max_batch_size=4, max_seq_len=200, max_prefill_tokens=8)
    calls = []
    forward = engine.runner.forward
    engine.runner.forward = lambda rows, **inputs: calls.append(len(rows)) or forward(rows, **inputs)
    short = [engine.submit([i, i + 1], params=SamplingParams(max_new_tokens=50, greedy=True)) for i in range(3)]
    with engine._drive:
        engine._step()
        assert calls == [3] and [h.completion_tokens for h in short] == [1, 1, 1]
        long = engine.submit(list(range(1, 81)), params=SamplingParams(max_new_tokens=5, greedy=True))
        progress = []
        for _ in range(10):
            engine._step()
            progress.append((short[0].completion_tokens, long.completion_tokens))
    # An 80-token prompt in chunks of 8: the running sequences gain a token every step meanwhile.
    assert progress == [(n, 0) for n in range(2, 11)] + [(11, 1)]
    assert calls[1:] == [4] * 10


def test_the_warm_up_before_serving_leaves_nothing_behind(family, greedy_reference):
    # `familial serve` warms its engine before the first request: that request then gets what
    # a fresh engine gives it, from free slots and an empty queue.
    engine = Engine(family, max_batch_size=2, max_seq_len=32)
    engine.warm_up()
    stats = engine.stats()
    assert (stats["queued"], stats["running"], stats["free_slots"]) == (0, 0, 2)
    params = SamplingParams(max_new_tokens=6, temperature=0.9, repetition_penalty=1.3, seed=5)
    after = engine.generate([[4, 8, 15]], member=3, params=params)[0].token_ids
    assert after == Engine(family, max_batch_size=2).generate([[4, 8, 15]], member=3, params=params)[0].token_ids
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    assert engine.generate([[16, 23]], member=5, params=greedy)[0].token_ids == greedy_reference(family, [16, 23], 5, 6)
