"""The HTTP face: OpenAI's speech API (``/v1/audio/speech``), the voice library and ``/ping``, for
a RunPod load-balancing endpoint (``F5_SERVE=http``). It runs jobs on the same worker as the queue
face (``f5worker.service``); only the request and the response differ."""
