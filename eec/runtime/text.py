"""Text in and out: the artifact's tokenizer.json and its chat template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from eec.errors import ArtifactError, InputError
from eec.runtime.manifest import TokenizerSpec


class TextCodec:
    def __init__(self, root: Path, spec: TokenizerSpec):
        self.spec = spec
        try:
            self.tokenizer = Tokenizer.from_file(str(root / spec.file))
        except Exception as e:  # noqa: BLE001 - a tokenizer file the tokenizers library cannot read is broken
            raise ArtifactError(f"the artifact's tokenizer {spec.file} cannot be read: {str(e)[:200]}") from None

    def encode(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, wrapped in the model's chat template."""
        if chat and self.spec.chat_template:
            text = self.render_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    def check(self, prompt: str) -> str:
        """A prompt the tokenizer can take: text without lone surrogates (not valid UTF-8)."""
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the prompt is not valid UTF-8 text") from None
        return prompt

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        # The same Jinja settings transformers uses for chat templates.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.spec.chat_template)
            text = template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.spec.bos_token or "",
                eos_token=self.spec.eos_token or "",
            )
        except Exception as e:  # noqa: BLE001 - the template is the artifact's code: any failure is its fault
            what = "broke the sandbox" if type(e).__name__ == "SecurityError" else f"failed ({type(e).__name__})"
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ArtifactError(f"the artifact's chat template {what}: {detail}; pass chat=False "
                                "(--no-chat) to send the prompt as it is") from None
        if not isinstance(text, str):
            raise ArtifactError("the artifact's chat template did not produce text")
        return text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece_decoder(self) -> "PieceDecoder":
        return PieceDecoder(self)


class PieceDecoder:
    """Each next token's text ("" while a character's bytes wait for the rest), and, when a generation
    ends, what still waits: the tokenizer renders an incomplete character as U+FFFD, so the text a
    generation ends with is the tokenizer's decoding of its tokens, streamed or not."""

    def __init__(self, codec: TextCodec):
        self.codec, self.stream = codec, DecodeStream(skip_special_tokens=True)

    def __call__(self, token: int) -> str:
        return self.stream.step(self.codec.tokenizer, token) or ""

    def rest(self, tokens: list[int], text: str) -> str:
        """What decoding all of ``tokens`` adds to ``text``, the pieces given so far."""
        whole = self.codec.decode(tokens)
        return whole[len(text):] if whole.startswith(text) else ""
