"""mmengine: a multimodal (vision-language) LLM inference engine."""

from mmengine.llm import LLM
from mmengine.outputs import CompletionOutput, Logprob, RequestOutput
from mmengine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
