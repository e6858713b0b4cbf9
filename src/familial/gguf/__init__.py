"""llama.cpp's GGUF format: families imported from GGUF files and members exported as them.

Needs the `gguf` package (`pip install 'familial[gguf]'`), imported only when a GGUF file is
read or written.
"""
