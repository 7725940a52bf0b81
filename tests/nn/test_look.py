"""The look of a thumbnail: tissue, glass, stain and texture (nn/look.py), the 'no tissue'
reason and the look part of the unfamiliar-slide rule.

Issue 28: Undecided that holds on real slides.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REALDATA
from thumbclf.core.decide import (LOW_CONFIDENCE, NO_TISSUE, NO_TISSUE_FRACTION, UNDECIDED,
                                  UNFAMILIAR, decide_with_reasons)
from thumbclf.core import table
from thumbclf.nn import familiarity, look
from thumbclf.nn.modelcheck import _familiarity_problems

PINK, PURPLE, BROWN, PALE = (225, 130, 190), (110, 60, 150), (150, 95, 55), (240, 222, 232)


def _slide(colour=None, area=0.25, glass=(246, 246, 246), size=224, pen=False) -> np.ndarray:
    """A square thumbnail: glass, a square of tissue of ``area`` in ``colour``, maybe a black pen
    stroke."""
    x = np.empty((size, size, 3), dtype=np.uint8)
    x[:] = glass
    if colour is not None:
        side = int(round(size * area ** 0.5))
        x[:side, :side] = colour
    if pen:
        x[:, size // 2: size // 2 + 6] = (40, 34, 28)  # a dark, slightly warm pen line
    return x


def _fractions(*images) -> np.ndarray:
    return look.tissue_fraction(torch.from_numpy(np.stack(images)))


def test_stains_are_tissue_and_glass_pen_and_padding_are_not():
    fractions = _fractions(_slide(PINK), _slide(PURPLE), _slide(BROWN), _slide(PALE),
                           _slide(), _slide(pen=True), _slide(glass=(255, 255, 255), pen=True),
                           _slide(PINK, glass=(236, 232, 212)))  # yellowish glass
    assert fractions[:4] == pytest.approx(0.25, abs=0.02)  # H&E pink, purple, DAB, pale fat
    assert fractions[4] == 0 and fractions[5] == 0 and fractions[6] == 0  # glass, pen
    assert fractions[7] == pytest.approx(0.25, abs=0.02)  # tissue on tinted glass, not the glass


def test_a_fragment_of_a_few_pixels_is_no_tissue_and_a_thin_biopsy_is_tissue():
    fragment, strip = _slide(), _slide()
    fragment[100:106, 100:106] = PURPLE  # 36 pixels: 0.07% of 224 x 224
    strip[100:104, 20:200] = PINK  # a needle biopsy: 4 x 180 pixels, 1.4%
    fractions = _fractions(fragment, strip)
    assert fractions[0] < NO_TISSUE_FRACTION < fractions[1]


def test_glass_colour_is_measured_beside_the_white_padding():
    x = _slide(PINK, glass=(238, 234, 214))
    x[:, :40] = 255  # the padding that makes a thumbnail square
    colour = look.glass(torch.from_numpy(x[None]).permute(0, 3, 1, 2).reshape(1, 3, -1)
                        .float() / 255)
    assert colour[0].numpy() * 255 == pytest.approx([238, 234, 214], abs=1.5)


def test_no_tissue_wins_over_every_other_reason():
    """A blank slide is never a class, however confident the model (issue 28, item 2)."""
    probs = np.array([[0.99, 0.01], [0.99, 0.01], [0.6, 0.4], [0.99, 0.01]])
    decisions, reasons = decide_with_reasons(probs, ["A", "B"], 0.9,
                                             unfamiliarity=np.array([0.2, 3.0, 0.2, 0.2]),
                                             tissue=np.array([0.0, 0.001, 0.3, 0.3]))
    assert decisions == [UNDECIDED, UNDECIDED, UNDECIDED, "A"]
    assert reasons == [NO_TISSUE, NO_TISSUE, LOW_CONFIDENCE, ""]


def test_texture_tells_a_drawing_from_structured_tissue():
    rng = np.random.default_rng(0)
    flat = _slide(PINK, area=0.5)
    structured = flat.copy()
    side = int(224 * 0.5 ** 0.5)
    noise = rng.integers(-60, 60, (side, side, 1))
    structured[:side, :side] = np.clip(structured[:side, :side].astype(int) + noise, 0, 255)
    stats, _ = look.describe(torch.from_numpy(np.stack([flat, structured])))
    fine = look.NAMES.index("texture (log)")
    assert stats[1, fine] > stats[0, fine] + 1.0


def _looks(n: int, rng, shift=0.0) -> np.ndarray:
    images = []
    for _ in range(n):
        colour = np.clip(np.array(PINK) + rng.normal(0, 8, 3) + shift, 0, 255).astype(np.uint8)
        images.append(_slide(tuple(colour), area=rng.uniform(0.1, 0.4)))
    return look.describe(torch.from_numpy(np.stack(images)))[0]


def test_the_look_part_flags_another_world_and_survives_the_file():
    rng = np.random.default_rng(1)
    part = familiarity.Look.fit(_looks(80, rng), _looks(30, rng))
    assert (part.unfamiliarity(_looks(30, rng)) > 1).mean() <= 0.1
    dark = np.stack([_slide((200, 200, 40), glass=(5, 5, 5)) for _ in range(3)])  # fluorescence
    assert (part.unfamiliarity(look.describe(torch.from_numpy(dark))[0]) > 1).all()
    rule = familiarity.Familiarity(np.eye(4, dtype=np.float32), 0.5, k=2, look=part)
    again = familiarity.Familiarity.from_file(rule.to_file())
    far = look.describe(torch.from_numpy(dark))[0]
    assert np.allclose(again.look.unfamiliarity(far), part.unfamiliarity(far), rtol=1e-5)
    assert _familiarity_problems(rule.to_file()) == []


def test_signals_take_the_larger_part_and_say_which():
    rule = familiarity.Familiarity(np.eye(4, dtype=np.float32), 0.5, k=1,
                                   look=familiarity.Look(np.zeros((5, len(look.NAMES))),
                                                         np.zeros(len(look.NAMES)),
                                                         np.ones(len(look.NAMES)), 1.0, k=1))
    features = np.eye(4, dtype=np.float32)[:2]
    looks = np.zeros((2, len(look.NAMES)))
    looks[1, 0] = 30.0  # far in look only
    out = familiarity.ensemble_signals([rule], [features], looks, np.array([0.2, 0.2]))
    assert out[table.UNFAMILIAR_CONTENT] == pytest.approx([0, 0])
    assert out[table.UNFAMILIAR_LOOK][1] > 1 > out[table.UNFAMILIAR_LOOK][0]
    assert list(out[table.UNFAMILIARITY]) == list(np.maximum(out[table.UNFAMILIAR_CONTENT],
                                                             out[table.UNFAMILIAR_LOOK]))
    decisions, reasons = decide_with_reasons(np.array([[0.99, 0.01, 0, 0]] * 2), list("ABCD"),
                                             0.9, out[table.UNFAMILIARITY], out[table.TISSUE])
    assert reasons == ["", UNFAMILIAR]
    without = familiarity.ensemble_signals([None], [features], looks, np.array([0.2, 0.2]))
    assert set(without) == {table.TISSUE}  # a model without the rule: tissue only


@pytest.mark.parametrize("field, value, words", [
    ("scale", torch.zeros(len(look.NAMES), dtype=torch.float64), "scale must be"),
    ("bank", torch.zeros(5, 3), "statistics per row"),
    ("threshold", float("nan"), "threshold must be"),
])
def test_a_damaged_look_part_is_refused(field, value, words):
    part = familiarity.Look(np.zeros((5, len(look.NAMES))), np.zeros(len(look.NAMES)),
                            np.ones(len(look.NAMES)), 1.0, k=2).to_file()
    part[field] = value
    rule = familiarity.Familiarity(np.eye(4, dtype=np.float32), 0.5, k=2).to_file()
    rule["look"] = part
    assert any(words in p for p in _familiarity_problems(rule))


@pytest.mark.skipif(not (REALDATA / "public").is_dir(),
                    reason="../shared/realdata/public is absent (real slide thumbnails)")
def test_real_slides_have_tissue_and_the_pen_only_glass_has_none():
    """On real thumbnails of 14 public sources: the glass with a black pen stroke has no tissue,
    and no labelled real section (H&E, IHC, TMA, biopsy) is called blank."""
    from thumbclf.inputs.decode import load_array
    from thumbclf.inputs.images import Preprocessing

    labels = __import__("pandas").read_csv(REALDATA / "public" / "labels.csv")
    sections = labels[labels["CLASSIFICATION"].isin(["Tumor", "Healthy", "IHC", "TMA",
                                                     "Biopsy"])]["PATH"].tolist()
    prep = Preprocessing(size=224)
    arrays = [load_array(REALDATA / "public" / p, prep)
              for p in ["histoqc_pen-black_no-tissue.png", *sections]]
    fractions = look.tissue_fraction(torch.from_numpy(np.stack(arrays)))
    assert fractions[0] < NO_TISSUE_FRACTION
    assert (fractions[1:] > 2 * NO_TISSUE_FRACTION).all(), dict(zip(sections, fractions[1:]))


def test_a_blank_picture_is_undecided_for_no_tissue_through_the_api(tiny_model):
    """The whole path (decode, predict, decide, table) gives the reason and its columns."""
    import thumbclf

    model = thumbclf.load_model(tiny_model)
    blank = Image.fromarray(_slide())
    pen = Image.fromarray(_slide(pen=True))
    tissue = Image.fromarray(_slide(PURPLE, area=0.3))
    out = model.predict([blank, pen, tissue])
    assert list(out[table.DECISION][:2]) == [UNDECIDED, UNDECIDED]
    assert list(out[table.REASON][:2]) == [NO_TISSUE, NO_TISSUE]
    assert out[table.TISSUE].iloc[2] > 0.2 and out[table.REASON].iloc[2] != NO_TISSUE
