"""Request bodies of the OpenAI API (chat and completions) and their sampling parameters.

Field names and defaults follow OpenAI; vLLM's extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``...) are accepted
at the top level, as the ``openai`` client sends them through ``extra_body``. Unknown
fields are ignored, as OpenAI-compatible servers do. Range checks live in
``SamplingParams``; its ValueError names the parameter and becomes a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmengine.sampling_params import SamplingParams
from mmengine.server.errors import APIError, param_of_value_error

INT64 = 2**63 - 1
MAX_MESSAGES = 2048  # one conversation; bounded so a tiny body cannot cost much to walk
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_SEQUENCES = 128  # prompts x n of one request


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- chat messages ---------------------------------------------------------------------------
class TextPart(_Model):
    type: Literal["text"]
    text: str


class MediaURL(_Model):
    url: str
    detail: str | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: MediaURL
    uuid: str | None = Field(default=None, max_length=256)  # names the media for caching


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: MediaURL
    uuid: str | None = Field(default=None, max_length=256)


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (content never None)."""
        out = self.model_dump(exclude_none=True)
        out.setdefault("content", "")
        return out


class StreamOptions(_Model):
    include_usage: bool = False


# ---- shared sampling fields ----------------------------------------------------------------
class _SamplingFields(_Model):
    # Numeric fields accept null as "the default", as OpenAI does.
    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64)]] | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options requires stream=true.", param="stream_options")

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        *,
        max_tokens_name: str = "max_tokens",
        logprobs_name: str = "logprobs",
    ) -> SamplingParams:
        """Builds and range-checks the engine's parameters (400 naming the bad field)."""
        try:
            return SamplingParams(
                n=self.num_choices,
                temperature=_or(self.temperature, 1.0),
                top_p=_or(self.top_p, 1.0),
                top_k=_or(self.top_k, 0),
                min_p=_or(self.min_p, 0.0),
                seed=self.seed,
                presence_penalty=_or(self.presence_penalty, 0.0),
                frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=_or(self.repetition_penalty, 1.0),
                max_tokens=max_tokens,
                min_tokens=_or(self.min_tokens, 0),
                stop=self.stop or [],
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
            )
        except ValueError as e:
            engine_name = param_of_value_error(e)
            # Name the field the client actually sent.
            renamed = {"max_tokens": max_tokens_name, "logprobs": logprobs_name}
            param = renamed.get(engine_name or "", engine_name)
            message = str(e).replace(f"'{engine_name}'", f"'{param}'")
            raise APIError(400, message[:1].upper() + message[1:], param=param) from None


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---- request bodies --------------------------------------------------------------------------
class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None  # refused unless the server trusts request templates
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server.", param="tools")
        if self.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported.", param="tool_choice")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(
                400, "Only response_format type 'text' is supported.", param="response_format"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise APIError(400, "best_of other than n is not supported.", param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported.", param="echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings, or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(t, int) for t in p):
            items = [list(p)]  # type: ignore[arg-type]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt must not be empty.", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise APIError(400, f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        if len(items) * self.num_choices > MAX_SEQUENCES:
            raise APIError(
                400, f"prompts x n must be at most {MAX_SEQUENCES} per request.", param="n"
            )
        return items
