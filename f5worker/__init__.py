"""F5-TTS voice cloning worker for RunPod serverless: inference, model storage, audio and job rules.

The entry points (``runpod-handler.py``, ``validate-storage-config.py``) are thin; their logic is here.
"""
