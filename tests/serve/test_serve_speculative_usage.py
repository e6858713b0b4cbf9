"""A speculative request's usage says how many tokens were drafted and accepted."""

from __future__ import annotations

PROMPT = "Once upon a time"


def test_usage_carries_speculative_statistics(client, live):
    response = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"speculative": True})
    plain = client.completions.create(model="exit-3", prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == plain.choices[0].text
    stats = response.usage.speculative
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["acceptance_rate"] == round(stats["accepted"] / stats["drafted"], 4)
    assert plain.usage.speculative is None
