"""Request bodies: OpenAI's completions and chat completions, with eec's own fields, and classification.

Unknown fields are ignored (clients send fields of newer API versions); fields
eec cannot honour are refused in one line rather than silently dropped
(`unsupported`). Types are strict: a number given as text is a 400, not a guess.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class Generation(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the chat API's newer name for max_tokens
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # not OpenAI's; vLLM's and llama.cpp's
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict | None = None
    user: StrictStr | None = None
    # eec's own
    epsilon: Number | None = Field(None, description="accuracy level: the share of exited tokens that agree "
                                                     "with the full model")
    mode: Literal["early-exit", "full"] = "early-exit"

    def unsupported(self) -> str | None:
        """A one-line reason when the body asks for what eec does not do."""
        if self.n != 1:
            return "n must be 1: send one request per completion"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported"
        if self.logit_bias:
            return "logit_bias is not supported"
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return "at most 4 stop strings"
        return None


class Completion(Generation):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.logprobs is not None:
            return "logprobs is not supported"
        if self.best_of not in (None, 1):
            return "best_of must be 1"
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()

    def prompts(self) -> list:
        """The prompts, each text or token ids: a list of texts or of id lists is several completions."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]


class Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[Part] | None = None

    def text(self) -> str:
        """The message's text; parts other than text are refused by the caller's check."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class Chat(Generation):
    messages: list[Message]
    logprobs: StrictBool = False
    tools: list | None = None

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs is not supported"
        if self.tools:
            return "tools are not supported"
        if not self.messages:
            return "messages must not be empty"
        for m in self.messages:
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                return "only text content is supported"
        return super().unsupported()


class Classify(BaseModel):
    """``input``: a text or a list of texts (text classifiers); an array of samples, or one sample, otherwise."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    input: StrictStr | list
    epsilon: Number | None = None
    criterion: Literal["agreement", "accuracy"] | None = None
    mode: Literal["early-exit", "full"] = "early-exit"
    metric: StrictStr | None = None
    return_probs: StrictBool = False
