"""Bad input by the surface it attacks (checkpoint, model folder, prompts file, runtime call, CLI option, file
system): each is a typed eec error, a one-line CLI message with exit status 1, and never a silent guess.

Artifact paths, links and manifest fields are in tests/test_trust.py; process faults in tests/test_faults.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eec.compiler import compile_model
from eec.compiler.checkpoint import Checkpoint, save_checkpoint
from eec.errors import ArtifactError, EecError, InputError, InputTypeError
from eec.runtime import load
from tests.conftest import tiny_model
from tests.test_cli_errors import run_fails

WORDS = [f"w{i}" for i in range(90)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama as a model.pt dict (to break field by field) and as an HF folder with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bad-inputs")
    hf = tiny_model("llama", seed=3, tie_word_embeddings=True)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(Checkpoint({"config": hf.config.to_dict(), "state_dict": state}, [], None, {}), root / "ok.pt")
    hf.save_pretrained(root / "hf")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(root / "hf")
    return root


@pytest.fixture(scope="module")
def text_artifact(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-inputs-art") / "t.eec"
    compile_model(source / "hf", out, exits=[2], calibrate=False)
    return out


def raw_checkpoint(source: Path) -> dict:
    return torch.load(source / "ok.pt", weights_only=True)


def set_in(path: tuple, value):
    def change(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return change


# --- checkpoint (model.pt) ----------------------------------------------------------------------------------

HEAD = {"layer": 2, "kind": "norm+linear"}


@pytest.mark.parametrize("change, message", [
    (set_in(("base", "state_dict", "model.embed_tokens.weight"), torch.ones(3, 3)), "size mismatch"),
    (set_in(("base", "state_dict"), [1, 2]), "'state_dict' must map"),
    (set_in(("base", "state_dict", "model.norm.weight"), [1.0] * 64), "'state_dict' must map"),
    (set_in(("base", "config", "hidden_size"), "64"), "hidden_size"),
    (set_in(("base", "config", "vocab_size"), 96.5), "vocab_size"),
    (set_in(("base", "config", "num_hidden_layers"), 0), "num_hidden_layers must be a whole number of at least 1"),
    (set_in(("base", "config", "num_attention_heads"), -4), "num_attention_heads"),
    (set_in(("base", "config"), "llama"), "'config' must be a dict"),
    (set_in(("base", "path"), 7), "'path' must be text"),
    (set_in(("metadata",), [1]), "'metadata' must be a dict"),
    (set_in(("metadata",), {"eos_token_ids": [1.5]}), "eos_token_ids"),
    (set_in(("tokenizer",), 5), "'tokenizer' must be a dict"),
    (set_in(("tokenizer",), {"json": b"{}"}), "'tokenizer' must be a dict"),
    (set_in(("exits",), {"layer": 2}), "'exits' must be a list"),
    (set_in(("exits",), ["head"]), "exit head 0 must be a dict"),
    (set_in(("exits",), [{**HEAD, "layer": "2", "state_dict": {}}]), "layer must be a whole number"),
    (set_in(("exits",), [{**HEAD, "state_dict": {"norm.weight": [1.0] * 64, "proj.weight": [[0.0] * 64] * 96}}]),
     "'norm.weight' must be a 1-D floating-point tensor, got list"),
    (set_in(("exits",), [{**HEAD, "state_dict": {"norm.weight": torch.ones(64), "proj.weight": torch.ones(96 * 64)}}]),
     "'proj.weight' must be a 2-D"),
    (set_in(("exits",), [{**HEAD, "state_dict": {"norm.weight": torch.ones(64), "proj.weight": torch.ones(96, 64),
                                                "proj.bias": torch.ones(96, dtype=torch.int64)}}]), "'proj.bias'"),
])
def test_a_malformed_checkpoint_is_one_line(source, tmp_path, change, message):
    body = copy.deepcopy(raw_checkpoint(source))
    change(body)
    torch.save(body, tmp_path / "model.pt")
    with pytest.raises(InputError, match=None) as caught:
        compile_model(tmp_path / "model.pt", tmp_path / "a.eec", exits=[2], calibrate=False)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no artifact, no staging folder, no lock
    run_fails(["compile", tmp_path / "model.pt", "--exits", "2", "--no-calibrate"], message)


# --- model folder -------------------------------------------------------------------------------------------

def test_a_model_folder_with_zero_layers(source, tmp_path):
    import shutil

    shutil.copytree(source / "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    run_fails(["compile", tmp_path / "hf", "-o", tmp_path / "a.eec"], "num_hidden_layers", "at least 1")


def test_a_garbage_tokenizer_is_refused_not_dropped(source, tmp_path):
    import shutil

    shutil.copytree(source / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(InputError, match="tokenizer files that cannot be read"):
        compile_model(tmp_path / "hf", tmp_path / "a.eec", exits=[2], calibrate=False)
    assert not (tmp_path / "a.eec").exists()


# --- prompts files ------------------------------------------------------------------------------------------

@pytest.fixture
def latin1_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    return path


def test_a_prompts_file_that_is_not_utf8(source, text_artifact, llama_compiled, latin1_prompts, tmp_path):
    expected = f"prompts file {latin1_prompts} is not UTF-8 text"
    run_fails(["compile", source / "hf", "-o", tmp_path / "a.eec", "--exits", "2", "--prompts", latin1_prompts],
              expected)
    assert not (tmp_path / "a.eec").exists()
    run_fails(["calibrate", text_artifact, "--prompts", latin1_prompts], expected)
    run_fails(["profile", llama_compiled.artifact, "--prompts", latin1_prompts], expected)
    run_fails(["generate", text_artifact, "--prompts", latin1_prompts], expected)
    run_fails(["train", source / "hf", "--exits", "2", "-o", tmp_path / "m.pt", "--prompts", latin1_prompts], expected)


# --- runtime calls ------------------------------------------------------------------------------------------

def test_a_prompt_that_is_not_valid_utf8(text_artifact):
    model = load(text_artifact)
    reference = model.generate("w1 w2 w3", max_new_tokens=3, mode="full").tokens  # the model does run on text
    assert len(reference) == 3
    with pytest.raises(InputError, match="not valid UTF-8"):
        model.generate("w1 \udcff w2", max_new_tokens=3)
    run_fails(["generate", text_artifact, "w1 \udcff"], "not valid UTF-8")


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", "chat template failed (TemplateError): no system role"),
    ("{{ messages.__class__.__mro__ }}", "chat template broke the sandbox"),
    ("{% for m in messages %}{{ m.content.upper() ", "chat template failed (TemplateSyntaxError)"),
])
def test_a_chat_template_that_raises_is_the_artifacts_fault(text_artifact, tmp_path, template, message):
    import shutil

    art = tmp_path / "t.eec"
    shutil.copytree(text_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["tokenizer"]["chat_template"] = template
    (art / "manifest.json").write_text(json.dumps(manifest))
    model = load(art)
    with pytest.raises(ArtifactError, match="pass chat=False") as caught:
        model.generate("w1 w2", max_new_tokens=2)
    assert message in str(caught.value)
    # Without the template the prompt goes as it is, and gives the same tokens as an unchanged artifact.
    plain = load(text_artifact).generate("w1 w2", max_new_tokens=2, chat=False).tokens
    assert model.generate("w1 w2", max_new_tokens=2, chat=False).tokens == plain
    run_fails(["generate", art, "w1 w2"], message, "--no-chat")


@pytest.mark.parametrize("thresholds, error", [
    ("05", InputTypeError), (b"\x05", InputTypeError), (True, InputTypeError), (["0.5"] * 3, InputTypeError),
    ({"3": "high"}, InputTypeError), ({"two": 0.5}, InputTypeError), ({2.5: 0.5}, InputTypeError),
    (object(), InputTypeError), ([0.5, 0.5], InputError), ({2: 0.5}, InputError), (float("nan"), InputError),
])
def test_thresholds_are_numbers_per_exit(llama_compiled, thresholds, error):
    model = load(llama_compiled.artifact)
    with pytest.raises(error):
        model.generate([1, 2, 3], max_new_tokens=2, thresholds=thresholds)


def test_well_formed_thresholds_of_any_numeric_type_agree(llama_compiled):
    """-inf in any numeric form, list or map exits every token after the first at the first exit."""
    model = load(llama_compiled.artifact)
    first, n = model.exits[0], len(model.exits)
    for thresholds in (-np.inf, np.float32(-np.inf), [-np.inf] + [np.inf] * (n - 1), {str(first): -np.inf},
                       {first: np.float64(-np.inf)}):
        result = model.generate([1, 2, 3], max_new_tokens=6, thresholds=thresholds)
        assert result.exits[1:] == [first] * 5, thresholds


@pytest.mark.parametrize("options, message", [
    (dict(thresholds=0.5, epsilon=0.9), "give thresholds or epsilon, not both"),
    (dict(epsilon=0.9, rule="risk", delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
    (dict(epsilon=0.9, rule="risk", delta=1.5), r"delta must be in \(0, 1\), got 1.5"),
    (dict(epsilon=0.9, rule="best"), "unknown threshold rule 'best'; choose from risk, valade"),
    (dict(epsilon=1.5), r"epsilon must be in \[0, 1\], got 1.5"),
    (dict(mode="speculative", metric="cosine"), "speculative decoding drafts on a head score"),
])
def test_options_that_contradict_or_fall_outside_their_range(llama_compiled, options, message):
    with pytest.raises(InputError, match=message):
        load(llama_compiled.artifact).generate([1, 2, 3], max_new_tokens=2, **options)


def test_empty_prompts_and_speculative_without_exits(source, text_artifact, tmp_path):
    model = load(text_artifact)
    for empty in ("", [], np.zeros(0, dtype=np.int64)):
        with pytest.raises(InputError, match="empty"):
            model.generate(empty, max_new_tokens=2)
    compile_model(source / "hf", tmp_path / "none.eec", exits=[], calibrate=False)
    with pytest.raises(InputError, match="speculative"):
        load(tmp_path / "none.eec").generate([1, 2, 3], max_new_tokens=2, mode="speculative")


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_threads_must_be_a_positive_whole_number(llama_compiled, threads):
    with pytest.raises(InputError, match="threads must be a whole number of at least 1"):
        load(llama_compiled.artifact, threads=threads)


def test_bad_arguments_are_also_the_python_types_callers_expect(llama_compiled):
    model = load(llama_compiled.artifact)
    with pytest.raises(TypeError):
        model.generate(b"\xff\xfe", max_new_tokens=2)
    with pytest.raises(TypeError):
        model.generate([1.7, 2.9], max_new_tokens=2)
    with pytest.raises(ValueError):
        model.generate([1, 2], max_new_tokens=0)
    assert issubclass(InputError, EecError) and issubclass(InputTypeError, InputError)


def test_compile_options_by_object_or_by_name(source, tmp_path):
    """`compile_model` takes a `CompileOptions`, fields changed by name on top; a misspelt name is a TypeError,
    not an option silently left at its default."""
    from eec.compiler import CompileOptions

    manifest = compile_model(source / "hf", tmp_path / "a.eec", CompileOptions(exits=[1, 3], calibrate=False),
                             exits=[2])
    assert manifest.exits == [2] and manifest.calibration is None
    with pytest.raises(TypeError, match="exitz"):
        compile_model(source / "hf", tmp_path / "b.eec", exitz=[2])
    with pytest.raises(InputError, match="--calibration-tokens"):
        compile_model(source / "hf", tmp_path / "b.eec", calibration_tokens=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.eec"]


def test_generation_options_by_object_or_by_name(llama_compiled):
    """A `GenerationOptions` gives what the same fields by name give (alone, in a batch, through an engine);
    names change it per call; a misspelt name is a TypeError and an options of another type an input error."""
    from eec.runtime import Engine, GenerationOptions

    model = load(llama_compiled.artifact)
    asked = dict(max_new_tokens=5, thresholds=0.0, ignore_eos=True)
    options = GenerationOptions(**asked)
    def what(result):
        return result.tokens, result.exits, result.finish_reason

    by_name = what(model.generate([1, 2, 3], **asked))
    assert len(by_name[0]) == 5 and llama_compiled.exits[0] in by_name[1]  # threshold 0: the first exit decides
    assert what(model.generate([1, 2, 3], options)) == by_name
    assert what(model.generate([[1, 2, 3], [4, 5]], options)[0]) == by_name
    assert model.generate([1, 2, 3], options, mode="full").exits == [model.manifest.model.num_layers] * 5
    with Engine(model, max_batch=2) as engine:
        assert what(engine.submit([1, 2, 3], options).result()) == by_name
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate([1, 2, 3], max_new_token=5)
    with pytest.raises(InputTypeError, match="GenerationOptions"):
        model.generate([1, 2, 3], 5)


# --- CLI options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exits", ["", ",,", " , "])
def test_empty_exits_are_refused_not_read_as_none(source, tmp_path, exits):
    run_fails(["compile", source / "hf", "-o", tmp_path / "a.eec", f"--exits={exits}"], "--exits needs layer numbers")
    assert not (tmp_path / "a.eec").exists()


@pytest.mark.parametrize("command", ["generate", "profile"])
def test_threads_below_one_are_refused(llama_compiled, command):
    args = ["1,2,3", "--ids"] if command == "generate" else ["--tokens", "4", "--rounds", "1"]
    run_fails([command, llama_compiled.artifact, *args, "--threads", "-1"], "threads must be a whole number")


def test_empty_token_ids_are_refused(llama_compiled):
    run_fails(["generate", llama_compiled.artifact, ",", "--ids"], "expected numbers separated by commas")


# --- file system --------------------------------------------------------------------------------------------

@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder this process cannot write: chmod 555, or for root (whom modes do not stop) a folder of sysfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no folder here refuses this process's writes")
    folder.chmod(0o755)


def test_compile_into_a_read_only_folder(source, read_only):
    run_fails(["compile", source / "hf", "-o", read_only / "a.eec", "--exits", "2"], "cannot write beside")


def test_train_into_a_read_only_folder_fails_before_training(source, read_only, monkeypatch):
    import eec.train.trainer as trainer

    def never(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer, "load_source", never)
    with pytest.raises(InputError, match="cannot write"):
        trainer.train(source / "hf", read_only / "m.pt", trainer.TrainConfig(exits=[2]))
    with pytest.raises(InputError, match="is a folder"):
        trainer.train(source / "hf", source, trainer.TrainConfig(exits=[2]))
