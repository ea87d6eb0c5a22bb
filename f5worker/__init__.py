"""F5-TTS voice cloning worker for RunPod serverless.

Layers, each importing only those below it (``tests/test_layers.py`` holds this):

- ``settings``, ``errors``: every setting and the error types, imported by everything;
- ``model/``: the F5-TTS network in plain torch, and where its files come from;
- ``inference/``: running the model on one device (engine, sampler, fast path, batcher);
- ``jobs/``: one job, input dict to result dict;
- ``service``, ``validation``, ``preload``, ``local_job``: the faces the entry scripts call.

The entry points (``runpod-handler.py``, ``validate-storage-config.py``) are thin; their logic is here.
"""
