"""Text in and out: the artifact's tokenizer.json and its chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from eec.runtime.manifest import TokenizerSpec


class TextCodec:
    def __init__(self, root: Path, spec: TokenizerSpec):
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(root / spec.file))

    def encode(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of ``prompt``; with ``chat``, wrapped in the model's chat template."""
        if chat and self.spec.chat_template:
            text = self.render_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(prompt).ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        # The same Jinja settings transformers uses for chat templates.
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.spec.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.spec.bos_token or "",
            eos_token=self.spec.eos_token or "",
        )

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece_decoder(self) -> Callable[[int], str]:
        """A function from each next token to the text it completes ("" while a character's bytes wait)."""
        decoder = DecodeStream(skip_special_tokens=True)
        return lambda token: decoder.step(self.tokenizer, token) or ""

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces as tokens arrive; bytes of a split character wait for the rest."""
        decoder = DecodeStream(skip_special_tokens=True)
        for token in ids:
            piece = decoder.step(self.tokenizer, token)
            if piece:
                yield piece
