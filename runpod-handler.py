#!/usr/bin/env python
"""RunPod serverless entry point for the F5-TTS worker.

    python runpod-handler.py                          # as a RunPod worker
    python runpod-handler.py --test_input "$(cat test_input.json)"   # one local job, exit 0/1
    python runpod-handler.py --rp_serve_api --rp_api_host 127.0.0.1  # runpod's local API server
    F5_SERVE=http PORT=8000 python runpod-handler.py                 # OpenAI's speech API over HTTP

The logic lives in ``f5worker.service``; this script only orders start-up: cache variables first
(huggingface_hub reads them once, at import), then logging, then the worker.
"""
import logging
import sys


def main(argv=None) -> int:
    from f5worker.settings import Settings, apply_cache_env, quiet_runpod_logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # it logs full URLs, signatures included
    logging.getLogger("botocore").setLevel(logging.WARNING)
    # runpod's own logger defaults to DEBUG, at which it prints every job's input (the text) and
    # output (presigned URLs, signatures included).
    quiet_runpod_logs()
    try:
        settings = Settings.from_env()
    except ValueError as err:  # one sentence naming the variable, not a traceback
        logging.getLogger("runpod-handler").error("cannot start: %s", err)
        from f5worker.refusal import serve_refusal  # on RunPod's queue each job is told; else exit 2

        return serve_refusal(str(err))
    for warning in settings.warnings:  # conflicting storage variables ...: names only, never values
        logging.getLogger("runpod-handler").warning("%s", warning)
    apply_cache_env(settings)
    if settings.serve == "http":  # OpenAI's speech API on PORT, for a load-balancing endpoint
        from f5worker.http.server import serve_http

        return serve_http(settings)
    from f5worker.service import serve  # imports torch: only after the cache variables are set

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
