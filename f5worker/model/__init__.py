"""The F5-TTS network in plain torch, and where its files come from.

The DiT, the log-mel, the Vocos vocoder and text-to-tokens (each equal to stock f5-tts's), the
checkpoint checks, the loader that picks the worker's own model or stock f5-tts's for a layout it
does not cover, and the store that finds model files on the volume or the hub. Imports nothing
above it (``inference``, ``jobs``); no re-exports here, so importing a torch-free submodule
(``constants``) stays torch-free.
"""
