"""The quality gate's rule (gate.py) on constructed probabilities: decisions, not raw argmax."""

import numpy as np
import pytest

from thumbclf.predict import gate
from thumbclf.core.decide import UNDECIDED

CLASSES = ("A", "B", "C")


def confident(n: int, rng, top: float = 0.97) -> np.ndarray:
    """``n`` images decided with probability ``top`` for a random class."""
    p = np.full((n, 3), (1 - top) / 2)
    p[np.arange(n), rng.integers(0, 3, n)] = top
    return p


def test_the_bound_is_clopper_pearson():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 300), (1, 300), (3, 100), (10, 486), (36, 37)]:
        assert gate.upper_bound(k, n, 0.95) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k),
                                                             abs=1e-9)
    assert gate.upper_bound(5, 5, 0.95) == 1.0 and gate.upper_bound(0, 0, 0.95) == 1.0
    assert gate.min_images() == 149  # (1 - 0.02)^149 < 0.05 <= (1 - 0.02)^148
    assert gate.upper_bound(0, 149, 0.95) <= 0.02 < gate.upper_bound(0, 148, 0.95)


def test_one_near_tie_flip_among_undecided_passes():
    rng = np.random.default_rng(0)
    ref = confident(337, rng)
    ref[5] = [0.45, 0.44, 0.11]  # Undecided, its top two classes nearly tie
    cand = ref.copy()
    cand[5] = [0.44, 0.45, 0.11]  # the argmax flips; still Undecided
    labels = np.r_[np.full(300, -1), ref[300:].argmax(1)]  # 300 of the deploy, 37 labelled
    labels[5] = -1
    v = gate.gate(ref, cand, labels, CLASSES, 0.9, deploy_images=300)
    assert v["passed"], v
    assert v["argmax_changed"] == 1 and v["changed"] == 0 and v["images"] == 337
    assert v["labels"]["accuracy_decided_drop"] == 0
    text = gate.describe(v)
    assert "changed on 0 of 337 images (300 of this deploy's images and 37 labelled images;" in text
    assert "without the band decisions changed on 0 (at most 0.9% with 95% confidence)" in text


def test_a_systematic_shift_of_decided_images_fails():
    rng = np.random.default_rng(1)
    ref = confident(300, rng, top=0.93)
    cand = ref.copy()
    shifted = rng.permutation(300)[:15]  # 5% of the decided images fall below the threshold
    cand[shifted] = [0.88, 0.06, 0.06]
    v = gate.gate(ref, cand, np.full(300, -1), CLASSES, 0.9, deploy_images=300)
    # issue 29: the band (4 x 0.05) takes in every image, so the decisions are fp32's, but the
    # candidate would gain nothing: refused for what it would recompute
    assert not v["passed"] and v["failed"] == ["recomputed"] and v["changed_with_band"] == 0
    assert v["changed"] == 15 and v["changed_bound"] > 0.02 and v["recomputed"] == 1.0
    assert "without the band decisions changed on 15" in gate.describe(v)


def test_without_labels_it_passes_on_agreement_alone_and_says_so():
    rng = np.random.default_rng(2)
    ref = confident(300, rng)
    cand = ref + rng.normal(0, 1e-3, ref.shape)  # bf16-sized noise: no decision moves
    v = gate.gate(ref, cand, np.full(300, -1), CLASSES, 0.9, deploy_images=300)
    assert v["passed"] and v["labels"] is None and v["labelled"] == 0
    assert gate.describe(v).endswith("no labels used: agreement alone")


def test_a_sample_too_small_cannot_pass_whatever_it_shows():
    rng = np.random.default_rng(3)
    ref = confident(37, rng)
    v = gate.gate(ref, ref.copy(), ref.argmax(1), CLASSES, 0.9, deploy_images=0)
    assert not v["passed"] and v["failed"] == ["agreement"] and v["changed"] == 0
    assert "37 images to check it on; even with no decision changed, at least 149" in \
        gate.too_few(37)
    assert gate.too_few(149) is None


def test_labels_catch_changes_that_agreement_allows():
    rng = np.random.default_rng(4)
    ref = confident(1050, rng)
    labels = np.r_[np.full(1000, -1), ref[1000:].argmax(1)]
    cand = ref.copy()
    for i in (1000, 1001, 1002):  # three right decisions become wrong ones
        cand[i] = np.roll(ref[i], 1)
    v = gate.gate(ref, cand, labels, CLASSES, 0.9, deploy_images=1000)
    assert v["changed"] == 3 and v["changed_bound"] < 0.02  # the old bound alone would pass
    assert v["changed_between_classes"] == 3
    # issue 29: a difference of 0.95 makes a band that recomputes everything: refused
    assert not v["passed"] and "recomputed" in v["failed"]
    lenient = gate.gate(ref, cand, labels, CLASSES, 0.9, deploy_images=1000,
                        limits={"safety": 0.0})  # no band: the labels catch what changed
    assert not lenient["passed"] and "accuracy_decided" in lenient["failed"]
    assert lenient["labels"]["accuracy_decided_drop"] == pytest.approx(0.06)


def test_one_changed_decision_among_few_decided_is_within_one_image():
    rng = np.random.default_rng(5)
    ref = confident(400, rng)
    labels = np.r_[np.full(360, -1), ref[360:].argmax(1)]  # 40 labelled, all decided and right
    cand = ref.copy()
    cand[370] = [0.5, 0.3, 0.2] if ref[370].argmax() else [0.3, 0.5, 0.2]  # now Undecided
    v = gate.gate(ref, cand, labels, CLASSES, 0.9, deploy_images=360, limits={"safety": 0.0})
    # accuracy among decided stays 1.0; coverage falls by one image: rule 2 allows it (issue
    # 29: without a band, rule 1 no longer allows any changed decision)
    assert v["failed"] == ["agreement"] and v["labels"]["accuracy_decided_drop"] == 0, v


def test_the_unfamiliar_rule_is_part_of_the_decisions():
    rng = np.random.default_rng(6)
    ref = confident(300, rng)
    u_ref = np.full(300, 0.5)
    u_cand = u_ref.copy()
    u_cand[:20] = 1.2  # twenty images become unfamiliar, so Undecided
    v = gate.gate(ref, ref.copy(), np.full(300, -1), CLASSES, 0.9, deploy_images=300,
                  unfamiliarity=(u_ref, u_cand))
    assert not v["passed"] and v["changed"] == 20
    assert v["discrepancy"][gate.UNFAMILIARITY] == pytest.approx(0.7)
    assert (gate.decisions(ref, CLASSES, 0.9, u_cand)[:20] == UNDECIDED).all()


def test_the_band_makes_every_decision_fp32s():
    """Issue 29: a candidate whose error changes decisions near the threshold, a tie and an
    unfamiliarity of 1 changes none with the band applied; without it, some change."""
    rng = np.random.default_rng(7)
    ref = rng.dirichlet([0.3, 0.3, 0.3], 400)  # probabilities everywhere, many near 0.9
    ref[:10] = [0.9, 0.05, 0.05]  # exactly at the threshold
    ref[10:20] = [0.48, 0.47, 0.05]  # near a tie (threshold 0.4 below: decided either way)
    u_ref = rng.uniform(0.5, 1.5, 400)
    error = rng.uniform(-0.004, 0.004, ref.shape)
    cand = np.clip(ref + error, 0, None)
    u_cand = u_ref + rng.uniform(-0.01, 0.01, 400)
    for threshold in (0.9, 0.4):
        args = (ref, cand, np.full(400, -1), CLASSES, threshold)
        u = dict(unfamiliarity=(u_ref, u_cand))
        with_band = gate.gate(*args, deploy_images=400, **u)
        without = gate.gate(*args, deploy_images=400, limits={"safety": 0.0}, **u)
        assert with_band["changed_with_band"] == 0 and with_band["passed"], with_band
        assert without["changed_with_band"] > 0 and not without["passed"]
        assert 0 < with_band["recomputed"] < 0.5


def test_the_band_widens_when_a_recomputed_image_differs_more():
    band = gate.Band({"probability": 0.001}, 4.0, 0.9)
    assert band.width == {"probability": 0.004, gate.UNFAMILIARITY: gate.FLOOR[gate.UNFAMILIARITY]}
    probs = np.array([[0.903, 0.05, 0.047], [0.95, 0.03, 0.02], [0.5, 0.499, 0.001]])
    assert band.near(probs, None).tolist() == [True, False, False]  # threshold 0.9, no tie above
    band.learn({"probability": 0.02, gate.UNFAMILIARITY: 0.0})
    assert band.width["probability"] == pytest.approx(0.08) and band.widened == 1
    assert band.near(probs, np.array([0.5, 1.0, 0.2])).tolist() == [True, True, False]
    assert band.images == 6 and band.recomputed == 3
    assert "3 of 6 images (50.0%) recomputed in fp32" in band.describe()
