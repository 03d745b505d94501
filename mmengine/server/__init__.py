"""The OpenAI-compatible HTTP server (``mmengine serve``): ``api_server.build_app`` and
``api_server.run_server``. (Nothing is imported here, so ``mmengine serve --help`` reads
the flags in ``args`` without loading torch and the engine.)"""
