"""Self-supervised exit-head training: the loss, the data, fitting, reproducibility, end to end."""

import itertools

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eec.cli.main import app
from eec.compiler.checkpoint import load_checkpoint
from eec.train import TrainConfig, train
from eec.train.data import generate_training_data
from eec.train.heads import new_head, valade_loss
from eec.train.trainer import agreement, fit_head
from tests.conftest import tiny_model
from tests.reference import hf_forward, hf_greedy
from tests.test_cli_errors import run_fails

PROMPTS = [[i, i + 1, i + 2] for i in range(0, 90, 3)]


def test_loss_matches_hand_computed_with_full_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7))
    p = np.exp(rng.normal(size=(5, 7)))
    p /= p.sum(-1, keepdims=True)
    lam = 0.3
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.exp(logq)
    want = np.mean((1 - lam) * -(p * logq).sum(-1) - lam * -(q * logq).sum(-1))
    idx = np.argsort(-p, axis=-1)  # top-k with k = vocabulary: nothing in the rest bucket
    got = valade_loss(torch.tensor(logits), torch.tensor(idx), torch.tensor(np.log(np.take_along_axis(p, idx, -1))), lam)
    assert abs(float(got) - want) < 1e-6


def test_rest_bucket_counts_mass_outside_top_k():
    logits = torch.zeros(1, 4)  # q uniform
    idx, logp = torch.tensor([[0]]), torch.log(torch.tensor([[0.5]]))  # p: 0.5 on token 0, 0.5 elsewhere
    want = -(0.5 * np.log(0.25) + 0.5 * np.log(0.75))  # λ = 0: cross-entropy over {token 0, the rest}
    assert abs(float(valade_loss(logits, idx, logp, 0.0)) - want) < 1e-6


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama", seed=5)


def test_training_data_matches_unpadded_transformers(hf):
    prompts = [[5, 6, 7, 8, 9], [40], [11, 12, 13]]  # different lengths: left padding in the batch
    data = generate_training_data(hf, prompts, [2, 4], max_new_tokens=6, eos_ids=[])
    assert len(data) == 3 * 6
    for i, prompt in enumerate(prompts):
        rows = (data.sequence == i).nonzero().flatten()
        generated = hf_greedy(hf, prompt, 6)
        assert data.target[rows].tolist() == generated
        out = hf_forward(hf, prompt + generated[:-1])
        for layer in (2, 4):
            want = out.hidden_states[layer][0, len(prompt) - 1 :]
            torch.testing.assert_close(data.hidden[layer][rows], want, atol=1e-4, rtol=1e-4)


def test_fitting_raises_agreement_on_the_training_tokens(hf):
    data = generate_training_data(hf, PROMPTS, [2], max_new_tokens=12, eos_ids=[])
    g = torch.Generator().manual_seed(0)
    head = new_head(hf, "copy", g)
    before = agreement(head, data, 2)
    config = TrainConfig(exits=[2], epochs=30, lr=3e-3, batch_size=64, lam=0.05)
    losses = []
    fit_head(head, data, 2, config, g, losses.append)
    assert agreement(head, data, 2) > before + 0.2
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_same_seed_same_heads_and_compiles(tmp_path):
    src = tmp_path / "base"
    tiny_model("llama", seed=5).save_pretrained(src)
    config = TrainConfig(exits=[2, 4], prompts=PROMPTS[:12], max_new_tokens=8, epochs=2, lr=1e-3, batch_size=32)
    train(src, tmp_path / "a.pt", config)
    train(src, tmp_path / "b.pt", config)
    a, b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert [h.layer for h in a.exits] == [2, 4]
    for ha, hb in zip(a.exits, b.exits):
        assert torch.equal(ha.proj_weight, hb.proj_weight) and torch.equal(ha.norm_weight, hb.norm_weight)
    other = train(src, tmp_path / "c.pt", TrainConfig(**{**config.__dict__, "seed": 1}))
    assert other and not torch.equal(load_checkpoint(tmp_path / "c.pt").exits[0].proj_weight, a.exits[0].proj_weight)

    from eec.compiler import compile_model
    from eec.runtime import load

    compile_model(tmp_path / "a.pt", tmp_path / "a.eec")
    model = load(tmp_path / "a.eec")
    assert [s.exit.kind for s in model.manifest.segments] == ["trained", "trained", "final"]


def test_train_cli_and_bad_input(tmp_path):
    src = tmp_path / "base"
    tiny_model("llama", seed=5).save_pretrained(src)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS[:6]))
    run_fails(["train", src, "--exits", "2,9", "-o", tmp_path / "m.pt"], "out of range")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt", "--lambda", "1.5"], "lambda")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt", "--init", "magic"], "init")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt", "--mode", "joint", "--floor", "2"], "floor")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt", "--mode", "joint", "--layer-drop", "1"], "layer-drop")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt", "--prompts", empty], "no prompts")
    run_fails(["train", src, "--exits", "2", "-o", tmp_path / "m.pt"], "no tokenizer")  # default prompts are text
    assert not (tmp_path / "m.pt").exists()
    result = CliRunner().invoke(app, ["train", str(src), "--exits", "2,4", "-o", str(tmp_path / "m.pt"), "--prompts", str(ids),
                                      "--max-new-tokens", "6", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert [h.layer for h in load_checkpoint(tmp_path / "m.pt").exits] == [2, 4]
    assert "agreement" in result.stderr


def test_layer_weights_grow_with_depth_and_sum_to_one():
    from eec.train.joint import layer_weights

    w = layer_weights([2, 4], 6)
    assert list(w) == [2, 4, 6] and w[2] < w[4] < w[6]
    assert abs(sum(w.values()) - 1) < 1e-12


def test_layer_drop_skips_deep_layers_only_while_training():
    from eec.train.joint import LayerDrop

    model = tiny_model("llama", seed=5)
    ids = torch.tensor([[3, 9, 27, 4]])
    drop = LayerDrop(model, 0.999, torch.Generator().manual_seed(0))
    assert drop.p[0] == 0.0 and drop.p[-1] == 0.999 and drop.p == sorted(drop.p)
    drop.skip = [False, False, False, False, True, False]  # (the last hidden state is after the final norm)
    model.train()
    hs = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(hs[5], hs[4]) and not torch.equal(hs[4], hs[3])
    model.eval()  # never while measuring or generating
    hs = model(ids, output_hidden_states=True).hidden_states
    assert not torch.equal(hs[5], hs[4])
    counts = [0] * 6
    for _ in range(400):
        drop.resample()
        counts = [c + s for c, s in zip(counts, drop.skip)]
    assert counts[0] == 0 and 200 < counts[3] < 280 and counts[5] > 390  # p = 0, 0.6, 0.999 of 400 draws
    drop.skip = [True] * 6
    drop.remove()
    model.train()
    hs = model(ids, output_hidden_states=True).hidden_states
    assert not torch.equal(hs[5], hs[4])


def test_joint_mode_fine_tunes_backbone_and_compiles(tmp_path):
    from eec.compiler import compile_model
    from eec.runtime import load

    src = tmp_path / "base"
    original = tiny_model("llama", seed=5)
    original.save_pretrained(src)
    config = TrainConfig(exits=[2, 4], prompts=PROMPTS[:20], max_new_tokens=10, epochs=3, lr=1e-3, backbone_lr=1e-3,
                         mode="joint", floor=0.0, layer_drop=0.5)
    result = train(src, tmp_path / "joint.pt", config)
    assert [r.layer for r in result.heads] == [2, 4]
    ckpt = load_checkpoint(tmp_path / "joint.pt")
    assert "state_dict" in ckpt.base and ckpt.metadata["final_agreement"] == result.final_agreement
    # The reference model is rebuilt with transformers from the checkpoint's config and weights, not
    # through eec's front-end.
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(ckpt.base["config"])
    tuned = AutoModelForCausalLM.from_config(AutoConfig.for_model(config_dict.pop("model_type"), **config_dict))
    tuned.load_state_dict(ckpt.base["state_dict"], strict=False)
    tuned.tie_weights()
    tuned.eval()
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert any("layers.0." in k for k in changed)  # the backbone itself moved
    # final_agreement is the tuned final layer's agreement with the original's greedy tokens on the
    # held-out prompts: the agreement on some 2 of the 20 prompts (validation 0.1), each prompt's
    # 10 generated tokens teacher-forced through transformers.
    per_prompt = []
    for prompt in config.prompts:
        generated = hf_greedy(original, prompt, config.max_new_tokens)
        with torch.no_grad():
            logits = tuned(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1:]
        per_prompt.append((int((logits.argmax(-1) == torch.tensor(generated)).sum()), len(generated)))
    possible = {sum(per_prompt[i][0] for i in pair) / sum(per_prompt[i][1] for i in pair)
                for pair in itertools.combinations(range(len(per_prompt)), 2)}
    assert any(abs(result.final_agreement - a) < 1e-9 for a in possible), (result.final_agreement, sorted(possible))
    overall = sum(h for h, _ in per_prompt) / sum(n for _, n in per_prompt)
    assert overall < 1.0, "the fine-tuned model agrees everywhere: the check above cannot tell models apart"
    compile_model(tmp_path / "joint.pt", tmp_path / "joint.eec", calibrate=False)
    prompt = [3, 9, 27]
    assert load(tmp_path / "joint.eec").generate(prompt, max_new_tokens=8, mode="full").tokens == hf_greedy(tuned, prompt, 8)


def test_joint_floor_undoes_the_epoch_that_crosses_it(tmp_path):
    from eec.compiler.frontends import load_source

    src = tmp_path / "base"
    original = tiny_model("llama", seed=5)
    original.save_pretrained(src)
    config = TrainConfig(exits=[2], prompts=PROMPTS[:20], max_new_tokens=10, epochs=3, lr=1e-3, backbone_lr=1e-2,
                         mode="joint", floor=1.0)
    result = train(src, tmp_path / "j.pt", config)
    assert result.epochs_run == 0 and result.final_agreement == 1.0  # the first epoch moved it; undone
    assert result.undone_final_agreement is not None and result.undone_final_agreement < 1.0  # ... and says how far
    tuned = load_source(tmp_path / "j.pt").model
    for k, v in tuned.state_dict().items():
        assert torch.equal(v, original.state_dict()[k]), k
    # ... and the heads were then trained on the unchanged backbone, not left at their initial copy.
    head = load_checkpoint(tmp_path / "j.pt").exits[0]
    assert not torch.equal(head.proj_weight, original.lm_head.weight)
    assert "stopped by --floor" in load_checkpoint(tmp_path / "j.pt").metadata["trained_by"]
