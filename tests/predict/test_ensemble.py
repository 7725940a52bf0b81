"""The ensemble's prediction with a verified reduced precision: fast and exact (issue 29).

A candidate with a known error (a deterministic perturbation of the logits and the features)
computes every image; PyTorch fp32 computes again those in the band measured on verification
images. Every decision, and every reason, then equals fp32's; without the band some differ."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from thumbclf.core import table
from thumbclf.core.decide import decide_with_reasons
from thumbclf.nn import familiarity
from thumbclf.nn.data import Normalisation
from thumbclf.predict import gate, inference
from thumbclf.predict.ensemble import ensemble_predict

CPU = torch.device("cpu")
CLASSES = ("A", "B", "C")


class _Net(nn.Module):
    """Logits and features in one tensor, as familiarity.WithFeatures gives them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        f = self.features(x) * 10
        return torch.cat([self.head(f) * 3, f], dim=1)


def _images(n: int, seed: int) -> torch.Tensor:
    """Images of many colours and textures, so that the outputs spread widely."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 1, 1, 3, generator=g) * 255
    noise = torch.randn(n, 16, 16, 3, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 80
    return (colour + noise).clamp(0, 255).to(torch.uint8)


def test_looks_measured_by_the_decoding_worker_are_not_measured_again(setting, monkeypatch):
    """Issue 29: with the worker's look measures the main process computes no look statistics,
    and the decision step's inputs are those it computed before."""
    from thumbclf.nn import look

    *_, model, x, _ = setting
    runner = inference.torch_runner(_Net().eval(), CPU, "fp32", False)
    before = ensemble_predict([model], [runner], x[:64], CPU, tta=False)
    measures = look.measured(x[:64])

    def refuse(batch):
        raise AssertionError("the look statistics were measured again")

    monkeypatch.setattr(look, "describe", refuse)
    probs, signals = ensemble_predict([model], [runner], x[:64], CPU, tta=False, looks=measures)
    assert np.array_equal(probs, before[0])
    assert signals.keys() == before[1].keys()
    for column, values in before[1].items():
        assert np.array_equal(signals[column], values), column


def _decisions(models, runners, x, threshold):
    probs, signals = ensemble_predict(models, runners, x, CPU, tta=False)
    return decide_with_reasons(probs, CLASSES, threshold, signals.get(table.UNFAMILIARITY),
                               signals.get(table.TISSUE))


@pytest.fixture(scope="module")
def setting():
    net = _Net().eval()
    exact = inference.torch_runner(net, CPU, "fp32", False)
    norm = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = _images(2400, 1)
    bare = SimpleNamespace(classes=CLASSES, norm=norm, legacy=True, temperature=1.0,
                           familiarity=None, path=None)
    with torch.inference_mode():
        out = exact(inference_input(x[:200], norm)).numpy()
    logits, feats = familiarity.split(out, 3)
    bank = familiarity.normalise(feats[:100])
    raw = familiarity.scores(feats[100:200], bank)
    rule = familiarity.Familiarity(bank, float(np.median(raw)) / familiarity.MARGIN)
    model = SimpleNamespace(**{**vars(bare), "familiarity": rule})
    probs, _ = ensemble_predict([bare], [exact], x, CPU, tta=False)
    threshold = float(np.median(probs.max(1)))  # half the images near-ish the threshold

    def perturbed(t):  # the known error: deterministic in the image, up to 0.01 per output
        out = net(t)
        return out + 0.01 * torch.sin(1000 * out)

    return net, exact, perturbed, model, x, threshold


def inference_input(x, norm):
    from thumbclf.nn.data import to_input

    return to_input(x, norm, CPU, channels_last=False)


def test_a_candidate_with_a_known_error_decides_as_fp32_with_the_band(setting):
    net, exact, perturbed, model, x, threshold = setting
    verification, deploy = x[:300], x[300:]
    reference = _decisions([model], [exact], deploy, threshold)
    candidate = inference.Runner("test", "bf16", perturbed)
    without = _decisions([model], [candidate], deploy, threshold)
    assert without != reference  # the error changes decisions ...
    changed = sum(a != b for a, b in zip(without[0], reference[0]))
    assert changed >= 3, changed
    # ... the band measured on the verification images (the gate's discrepancy) ...
    with torch.inference_mode():
        ref_out = exact(inference_input(verification, model.norm)).numpy()
        cand_out = candidate(inference_input(verification, model.norm)).numpy()
    (rl, rf), (cl, cf) = familiarity.split(ref_out, 3), familiarity.split(cand_out, 3)
    from thumbclf.nn.training import softmax

    measured = gate.discrepancy(softmax(rl, 1.0), softmax(cl, 1.0),
                                model.familiarity.unfamiliarity(rf),
                                model.familiarity.unfamiliarity(cf))
    assert measured["probability"] > 0 and measured[gate.UNFAMILIARITY] > 0
    candidate.exact, candidate.measured = exact, measured
    band = inference.ensemble_band([candidate], threshold)
    # ... makes every decision and every reason fp32's, recomputing a minority of images
    with_band = _decisions([model], [candidate], deploy, threshold)
    assert with_band == reference
    assert band.images == len(deploy) and 0 < band.recomputed < len(deploy) / 2
    assert f"{band.recomputed} of {len(deploy)} images" in band.describe()


def test_a_band_measured_too_narrow_widens_itself(setting):
    net, exact, perturbed, model, x, threshold = setting
    candidate = inference.Runner("test", "bf16", perturbed, exact=exact,
                                 measured={"probability": 1e-6, gate.UNFAMILIARITY: 1e-6})
    band = inference.ensemble_band([candidate], threshold)
    _decisions([model], [candidate], x[300:], threshold)
    assert band.widened >= 1 and band.measured["probability"] > 1e-5


def test_a_ray_actor_computes_with_the_drivers_engine_and_band(setting):
    """Issue 29: Ray's inference actors computed PyTorch fp32 while the local deploy computed
    verified bf16. The driver's runners travel as recipes; an actor rebuilds them (the
    verified engine, fp32 beside it, the band) and says which images it recomputed."""
    pytest.importorskip("ray", reason="Ray is the optional extra thumbclf[ray]")
    import pickle

    from thumbclf.predict.ray_backend import _Infer

    net, exact, _, model, x, threshold = setting
    if not inference.native("bf16", CPU):
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
    m = SimpleNamespace(**{**vars(model), "runnable": lambda: net,
                           "prep": SimpleNamespace(size=16)})
    driver = inference.torch_runner(net, CPU, "bf16", False)
    driver.exact, driver.measured = exact, {"probability": 0.01, gate.UNFAMILIARITY: 0.02}
    band = inference.ensemble_band([driver], threshold)
    band.learn({"probability": 0.015})  # widened on the driver before the rest went to Ray
    recipes = pickle.loads(pickle.dumps([driver.recipe()]))  # as Ray sends them
    actor = _Infer([m], False, "cpu", 1, recipes)
    rebuilt = actor.runners[0]
    assert (rebuilt.engine, rebuilt.precision) == ("torch", "bf16") and rebuilt.exact is not None
    assert rebuilt.band.measured == band.measured == {"probability": 0.015, gate.UNFAMILIARITY: 0.02}
    assert rebuilt.band.threshold == threshold
    batch = {"position": np.arange(200), "image": x[:200].numpy(),
             "error": np.array([""] * 200, dtype=object),
             "error_kind": np.array([""] * 200, dtype=object)}  # issue 32: the errors' kinds
    out = actor(batch)
    probs, _ = ensemble_predict([m], [driver], x[:200], CPU, tta=False)
    assert np.allclose(out["probs"], probs, atol=1e-6)
    assert out["recomputed"].tolist() == band.last.tolist() and out["recomputed"].any()
    assert inference.torch_runner(net, CPU, "fp32", False).recipe() is None
