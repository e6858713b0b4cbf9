"""OpenAI-compatible serving of a family: `create_app(engine, tokenizer)` and the playground page."""
