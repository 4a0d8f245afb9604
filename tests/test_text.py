"""Text in and out on a tiny model with a real tokenizer: a byte-level BPE trained here (so generated tokens
split multi-byte characters, as real ones do) and a chat template with role markers. The references are
transformers' tokenizer, its chat template and its greedy decoding."""

from __future__ import annotations

import pytest

from eec.compiler import compile_model
from eec.runtime import load
from tests.conftest import tiny_model
from tests.reference import chat_ids, hf_greedy

TEXT = ("Le café près de la gare ouvre à sept heures. Über den Fluß führt eine Brücke. "
        "東京の駅はとても大きい。 Emoji 🙂 and 🚀 cost four bytes each. def parse(line): return line.split()")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "Où est la gare? 駅はどこ?"


def text_model_dir(out, seed: int):
    """A tiny Llama with a byte-level BPE trained on `TEXT` and a chat template with role markers, saved
    as a Hugging Face directory ``out``; returns the transformers model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    hf = tiny_model("llama", seed=seed, vocab_size=tok.get_vocab_size(), num_attention_heads=4, num_key_value_heads=2,
                    eos_token_id=fast.eos_token_id)
    hf.save_pretrained(out)
    return hf


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("text")
    hf = text_model_dir(root / "hf", seed=5)
    compile_model(root / "hf", root / "t.eec", exits=[2, 4], calibrate=False)
    return load(root / "t.eec"), hf, AutoTokenizer.from_pretrained(root / "hf")


def test_prompts_are_tokenized_as_transformers_does(text_model):
    model, _, tok = text_model
    assert model.encode(QUESTION) == chat_ids(tok, QUESTION)
    assert model.encode(QUESTION, chat=False) == tok(QUESTION)["input_ids"]
    assert model.encode(TEXT, chat=False) == tok(TEXT)["input_ids"]


def test_generated_text_is_the_tokenizers_decoding(text_model):
    model, hf, tok = text_model
    result = model.generate(QUESTION, mode="full", max_new_tokens=40)
    assert result.tokens == hf_greedy(hf, chat_ids(tok, QUESTION), 40, stop_at_eos=True)
    assert result.text == tok.decode(result.tokens, skip_special_tokens=True)


@pytest.mark.parametrize("options", [dict(mode="full"), dict(thresholds=0.3)], ids=["full", "early-exit"])
def test_streamed_pieces_make_the_text(text_model, options):
    """Alone and in a batch: the pieces joined are the text, which is the tokenizer's decoding of the tokens."""
    model, _, tok = text_model
    prompts = [QUESTION, "Brücke", TEXT[:40]]
    results = model.generate(prompts, max_new_tokens=32, ignore_eos=True, **options)
    assert any(len(r.text.encode()) > len(r.text) for r in results), "no multi-byte character was generated"
    pieces = list(model.generate(QUESTION, max_new_tokens=32, ignore_eos=True, stream=True, **options))
    assert "".join(pieces) == results[0].text == tok.decode(results[0].tokens, skip_special_tokens=True)
    joined = {i: "" for i in range(len(prompts))}
    for event in model.generate(prompts, max_new_tokens=32, ignore_eos=True, stream=True, **options):
        joined[event.index] += event.text or ""
    assert [joined[i] for i in range(len(prompts))] == [r.text for r in results]
    assert [r.text for r in results] == [tok.decode(r.tokens, skip_special_tokens=True) for r in results]


def test_text_not_streamed_is_decoded_once_at_the_end(text_model, monkeypatch):
    """A request neither streamed nor watched for stop strings has its text decoded when it ends, not a
    piece per token (host time between steps), finished or cancelled, and it is the tokenizer's decoding."""
    from eec.runtime.engine import Engine
    from eec.runtime.text import PieceDecoder

    model, _, tok = text_model
    calls = []
    step = PieceDecoder.__call__
    monkeypatch.setattr(PieceDecoder, "__call__", lambda self, token: calls.append(token) or step(self, token))
    engine = Engine(model, max_batch=2)
    done, cancelled = engine.submit(QUESTION, max_new_tokens=20, ignore_eos=True), engine.submit("Brücke", max_new_tokens=20)
    for _ in range(5):
        engine.step()
    cancelled.cancel()
    engine.run()
    assert calls == []
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < 20
    for request in (done, cancelled):
        assert request.result().text == tok.decode(request.tokens, skip_special_tokens=True)
    streamed = list(model.generate(QUESTION, max_new_tokens=20, ignore_eos=True, stream=True))
    assert len(calls) == 20 and "".join(streamed) == done.result().text


def test_a_stop_string_ends_the_text_before_it(text_model):
    model, _, _ = text_model
    free = model.generate(QUESTION, mode="full", max_new_tokens=40, ignore_eos=True)
    stop = free.text[12:15]
    assert len(stop) == 3 and stop.strip()
    stopped = model.generate(QUESTION, mode="full", max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert stopped.text == free.text[: free.text.index(stop)] and stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]


def test_a_stream_never_shows_the_stop_string(text_model):
    """Alone and in a batch, the streamed pieces are the stopped text: no stop string, nor its start."""
    model, _, _ = text_model
    free = model.generate(QUESTION, mode="full", max_new_tokens=40, ignore_eos=True)
    stop = free.text[12:15]
    options = dict(mode="full", max_new_tokens=40, ignore_eos=True, stop=[stop, "never in this text"])
    stopped = model.generate(QUESTION, **options)
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert "".join(model.generate(QUESTION, stream=True, **options)) == stopped.text
    joined = {0: "", 1: ""}
    for event in model.generate([QUESTION, "Brücke"], stream=True, **options):
        joined[event.index] += event.text or ""
        assert stop not in joined[event.index]
    assert joined[0] == stopped.text
    assert joined[1] == model.generate("Brücke", **options).text
