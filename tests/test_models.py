import pytest
import torch

from empathy import checkpoints, models
from empathy.models import FusionLSTM
from empathy.utils import ToolkitError

DIMS = {"audio": 7, "text": 5, "v_sub": 9}


def random_inputs(lengths, dims=DIMS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return {mod: torch.randn(total, dim, generator=generator) for mod, dim in dims.items()}


def reference_forward(model, inputs):
    """The SPEC's model written out step by step for one unpadded video."""
    embedded = torch.cat([torch.relu(getattr(model, f"embed_{mod}")[1](inputs[mod]))
                          for mod in model.mods], dim=-1)
    weights = model.attn(embedded)
    states, _ = model.lstm(embedded[None])
    states = states[0]
    outputs = []
    for t in range(len(states)):
        context = sum(weights[t, lag] * states[t - lag] for lag in range(3) if t - lag >= 0)
        outputs.append(model.dec_target(context))
    return torch.cat(outputs)


def test_parameter_names_match_the_original_release():
    names = set(FusionLSTM(DIMS).state_dict())
    expected = {f"embed_{mod}.1.{kind}" for mod in DIMS for kind in ("weight", "bias")}
    expected |= {"attn.0.weight", "attn.0.bias", "attn.2.weight", "attn.2.bias",
                 "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
                 "dec_target.0.weight", "dec_target.0.bias", "dec_target.2.weight",
                 "dec_target.2.bias"}
    assert names == expected
    model = FusionLSTM(DIMS)
    assert model.lstm.hidden_size == 512 and model.attn[0].in_features == 3 * 128
    assert [model.embed_audio[0].p, model.embed_v_sub[0].p] == [0.1, 0.2]


def test_forward_matches_the_step_by_step_definition():
    torch.manual_seed(0)
    model = FusionLSTM(DIMS).eval()
    inputs = random_inputs([6])
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, torch.tensor([6])), reference_forward(model, inputs))


def test_shapes_and_features():
    model = FusionLSTM(DIMS).eval()
    inputs = random_inputs([4, 7, 2])
    predictions, features = model.forward_embedded(model.embed(inputs), torch.tensor([4, 7, 2]),
                                                   with_features=True)
    assert predictions.shape == (13,) and features.shape == (13, 128)
    # the decision-level features are taken before the decoder's ReLU
    assert (features < 0).any()
    torch.testing.assert_close(model.dec_target[2](torch.relu(features)).squeeze(-1), predictions)


def test_a_video_predicts_the_same_alone_or_batched_with_longer_ones():
    torch.manual_seed(0)
    model = FusionLSTM(DIMS).eval()
    lengths = [3, 11, 6]
    inputs = random_inputs(lengths)
    with torch.no_grad():
        batched = model(inputs, torch.tensor(lengths)).split(lengths)
        for index, length in enumerate(lengths):
            start = sum(lengths[:index])
            alone = model({m: x[start:start + length] for m, x in inputs.items()},
                          torch.tensor([length]))
            torch.testing.assert_close(batched[index], alone, atol=1e-6, rtol=1e-5)


def test_original_plain_state_dict_loads_and_predicts_identically(tmp_path):
    torch.manual_seed(3)
    original = FusionLSTM(DIMS).eval()
    path = tmp_path / "best.save"
    torch.save(original.state_dict(), path)   # what the original release wrote
    loaded, checkpoint = checkpoints.load_model(path, list(DIMS), DIMS)
    assert loaded.mods == list(DIMS) and checkpoint.get("config") is None
    inputs = random_inputs([5, 8])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(inputs, torch.tensor([5, 8])),
                                   original(inputs, torch.tensor([5, 8])), rtol=0, atol=0)


def test_checkpoint_modality_order_is_kept(tmp_path):
    dims = {"text": 5, "audio": 7}
    torch.save(FusionLSTM(dims).state_dict(), tmp_path / "m.save")
    loaded, _ = checkpoints.load_model(tmp_path / "m.save", ["audio", "text"], {"audio": 7, "text": 5})
    assert loaded.mods == ["text", "audio"]


def test_mismatched_checkpoints_are_refused_with_the_fix(tmp_path):
    torch.save(FusionLSTM(DIMS).state_dict(), tmp_path / "m.save")
    with pytest.raises(ToolkitError, match="trained on --mods audio,text,v_sub, not audio,text: "
                                           "run with --mods audio,text,v_sub"):
        checkpoints.load_model(tmp_path / "m.save", ["audio", "text"], {"audio": 7, "text": 5})
    with pytest.raises(ToolkitError, match="expects 7-d audio features but the data has 8"):
        checkpoints.load_model(tmp_path / "m.save", list(DIMS), {**DIMS, "audio": 8})


def test_corrupt_unsafe_and_foreign_checkpoints_are_refused(tmp_path):
    state = FusionLSTM(DIMS).state_dict()
    torch.save(state, tmp_path / "good.save")
    (tmp_path / "cut.save").write_bytes((tmp_path / "good.save").read_bytes()[:1000])
    with pytest.raises(ToolkitError, match="cut.save .*corrupt, truncated"):
        checkpoints.load_model(tmp_path / "cut.save", list(DIMS), DIMS)
    torch.save({"model": FusionLSTM}, tmp_path / "code.save")  # a pickled class: code
    with pytest.raises(ToolkitError, match="cannot read checkpoint .*code.save"):
        checkpoints.load_model(tmp_path / "code.save", list(DIMS), DIMS)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.save")
    with pytest.raises(ToolkitError, match="other.save is not a fusion-LSTM checkpoint"):
        checkpoints.load_model(tmp_path / "other.save", list(DIMS), DIMS)
    with pytest.raises(ToolkitError, match="missing.save does not exist"):
        checkpoints.load_model(tmp_path / "missing.save", list(DIMS), DIMS)


def test_input_dropout_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    dropout = models.InputDropout(0.2).train()
    inputs = torch.ones(400, 1000)
    outputs = dropout(inputs)
    dropped = (outputs == 0).float().mean().item()
    assert dropped == pytest.approx(0.2, abs=0.005)
    assert outputs[outputs != 0].unique().tolist() == pytest.approx([1 / (1 - 13107 / 65536)])
    assert outputs.mean().item() == pytest.approx(1.0, abs=0.01)
    assert not torch.equal(dropout(inputs), outputs)   # a fresh mask each call
    torch.manual_seed(0)
    torch.testing.assert_close(dropout(inputs), outputs)   # seeded like the rest of torch
    assert torch.equal(dropout.eval()(inputs), inputs)
    odd = torch.ones(3, 7)
    assert dropout.train()(odd).shape == (3, 7)
