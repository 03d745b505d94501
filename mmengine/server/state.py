"""What the routes of one server app share (one ``ServerState`` per ``build_app``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mmengine.async_llm import AsyncLLM
from mmengine.server.media import MediaLoader
from mmengine.server.metrics import ServerMetrics
from mmengine.server.middleware import Admission
from mmengine.server.prompts import PromptRenderer

logger = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: AsyncLLM
    renderer: PromptRenderer  # chat templates and tokenization
    media: MediaLoader  # fetch + decode of image/video parts
    metrics: ServerMetrics
    admission: Admission  # in-flight count, overload cap, draining flag
    served_names: list[str]  # model names requests may use; the first is reported back
    exit_requested: bool = False  # the process should stop (engine died); run_server polls it
    exit_code: int = 0

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def request_exit(self, code: int) -> None:
        self.exit_code = max(self.exit_code, code)
        self.exit_requested = True
