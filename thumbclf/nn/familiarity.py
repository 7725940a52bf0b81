"""Unfamiliar slides: how far an image's features lie from everything the model was trained on.

A model is forced to pick one of its classes, even for a slide type it never saw (a cytology
smear, a frozen section, a special stain). Confidence alone does not catch that: such slides
are often classified with high confidence. This module gives the second reason for
*Undecided*:

- the model's features are the input of its classification head (global-average-pooled where
  that input is a feature map), L2-normalised;
- at training, the features of up to ``BANK_SIZE`` of the best epoch's training passes (a
  seeded sample; augmented, as the model saw them) are kept in the model file, in float16
  (about 1 MB for ResNet-18); where none were kept (a checkpoint of an older version), those
  of a seeded sample of the training images, computed unaugmented;
- an image's score is the cosine distance to its ``K``-th nearest training feature (deep
  nearest neighbours, Sun et al., ICML 2022); no assumption about the shape of the classes;
- the model file stores the ``QUANTILE`` of the validation split's scores (images the model
  did not train on, as deployment images are); the threshold is that times ``MARGIN`` (1: the
  percentile itself, so that about 1-2% of slides like the validation ones are called
  unfamiliar; see below for why not more);
- ``unfamiliarity`` = score / threshold, averaged over an ensemble's models; above 1 the slide
  is Undecided with the reason ``unfamiliar`` (decide.decide_with_reasons).

That part sees *what* a slide shows. A classifier's penultimate features are trained to ignore
stain, scanner and rendering, so a slide from another world (a real slide for a model trained on
drawings, a fluorescence scan, another lab's processing) can sit among the training features
(issue 28 measured 0.2-0.7 of the threshold on real slides for a model trained on synthetic
ones). The second part, ``Look``, sees *how* it looks: the look statistics of look.py (tissue,
glass, stain in optical density, texture), scored the same way (distance to the k-th nearest
training image, standardised per statistic) against the training images as the model saw them
(with training's augmentation: the looks it learned to handle), thresholded on the validation
images and the training images themselves, each scored without its own draws in the bank (the
look statistics do not depend on the model, so those are as unseen as the validation images,
and the percentile of a few hundred images is far steadier than that of a few dozen: 2.93,
1.97 and 1.75 for three trained models on the same slides from the validation images alone).
The slide's unfamiliarity is the larger of the two parts; the table gives both
(unfamiliarity_content, unfamiliarity_look) so that a reader sees which part fired.

The margins (bench/realworld.py, three trained models, synthetic and real development slides):
the look part's threshold is ``LOOK_MARGIN`` (3) times its percentile, because a model handles a
moderate stain and scanner difference (98-99% right on the synthetic lab shift 1) and the look
part is there for slides from another world (fluorescence, blank glass: hundreds of times its
percentile), while on real slides the look part scores like a moderate shift (its median on
the real thumbnails was 1.05-1.34 times its percentile, on the shift-1 slides 1.05-1.35). The
content part is what tells real slides from synthetic ones and an unseen slide type from the
trained ones, so it gets no margin. Before (both margins 1.5, the look percentile of the
validation images alone): 61-96% of the shift-1 slides covered, 70-93% of an unseen type
Undecided, 65-71% of the real slides with tissue unfamiliar; now 82-91%, 93-97%, 76-88%.

Model files written before this rule (thumbclf 1.0, the prototype's) have no features: they
deploy with confidence-only decisions, and the run says so once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from thumbclf.core import table
from thumbclf.nn import look

log = logging.getLogger(__name__)
BANK_SIZE = 1024
K = 5
QUANTILE = 0.99
MARGIN = 1.0  # the content part's threshold: MARGIN x its validation QUANTILE
LOOK_MARGIN = 3.0  # the look part's: LOOK_MARGIN x its QUANTILE (module docstring: why)
MIN_VALIDATION = 20  # fewer validation images: no threshold can be chosen, the rule is off


class WithFeatures(nn.Module):
    """``model`` whose output is [logits, features]: one tensor, so that every inference engine
    (PyTorch, OpenVINO) computes both in one pass. ``split`` separates them again."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head  # the head's name: its input are the features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept: list[torch.Tensor] = []

        def keep(_module, inputs):
            f = inputs[0]
            kept.append(f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1))  # squeezenet:
            # a conv head whose input is a feature map, averaged over space

        # the hook lives for this call only: the plain model (Grad-CAM, training) is untouched
        hook = self.model.get_submodule(self.head).register_forward_pre_hook(keep)
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        if isinstance(logits, tuple):  # inception in training mode; not used for features
            logits = logits[0]
        return torch.cat([logits, kept[-1].to(logits.dtype)], dim=1)


class Capture:
    """The features (the head's pooled input, as WithFeatures gives them) of every forward pass
    of ``model`` inside the ``with`` block, for the passes training makes anyway."""

    def __init__(self, model: nn.Module, head: str | None):
        self.model, self.head, self.rows = model, head, []

    def __enter__(self) -> "Capture":
        if self.head is not None:
            self._hook = self.model.get_submodule(self.head).register_forward_pre_hook(self._keep)
        return self

    def _keep(self, _module, inputs) -> None:
        f = inputs[0].detach()
        self.rows.append((f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1)).float().cpu())

    def __exit__(self, *exc) -> None:
        if self.head is not None:
            self._hook.remove()

    def features(self) -> np.ndarray | None:
        return torch.cat(self.rows).numpy() if self.rows else None


def split(output: torch.Tensor | np.ndarray, n_classes: int):
    """(logits, features) of a WithFeatures output (features empty for a plain model)."""
    return output[:, :n_classes], output[:, n_classes:]


def normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def scores(features: np.ndarray, bank: np.ndarray, k: int = K) -> np.ndarray:
    """Cosine distance of each row of ``features`` to its k-th nearest bank row."""
    f, b = normalise(features), np.asarray(bank, dtype=np.float32)
    if len(f) == 0:
        return np.zeros(0)
    k = min(k, len(b))
    out = np.empty(len(f))
    for i in range(0, len(f), 1024):  # bounded memory for big batches and banks
        sim = f[i:i + 1024] @ b.T
        kth_similarity = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        out[i:i + 1024] = 1.0 - kth_similarity
    return out


def distances(rows: np.ndarray, bank: np.ndarray, k: int = K,
              groups: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Euclidean distance of each row to its k-th nearest bank row; with ``groups`` (a label
    per row, a label per bank row), a row's own group's bank rows do not count."""
    rows, bank = np.asarray(rows, dtype=np.float64), np.asarray(bank, dtype=np.float64)
    k = min(k, len(bank))
    out = np.empty(len(rows))
    for i in range(0, len(rows), 1024):
        part = rows[i:i + 1024]
        d2 = (part ** 2).sum(1)[:, None] - 2 * part @ bank.T + (bank ** 2).sum(1)[None, :]
        d2 = np.maximum(d2, 0)
        if groups is not None:
            d2[groups[0][i:i + 1024, None] == groups[1][None, :]] = np.inf
        out[i:i + 1024] = np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])
    return out


@dataclass(frozen=True)
class Look:
    """The look part of the rule: the look statistics (look.py) of training images as the model
    saw them, standardised per statistic, and the quantile of the scores of images it did not
    hold (Look.fit)."""

    bank: np.ndarray  # (n, d) standardised look statistics
    centre: np.ndarray  # (d,) the training images' mean ...
    scale: np.ndarray  # (d,) ... and spread, per statistic
    threshold: float
    k: int = K

    def unfamiliarity(self, looks: np.ndarray) -> np.ndarray:
        """score / (quantile x LOOK_MARGIN): above 1, unfamiliar."""
        return self.scores(looks) / (self.threshold * LOOK_MARGIN)

    def scores(self, looks: np.ndarray) -> np.ndarray:
        return distances((np.asarray(looks, dtype=np.float64) - self.centre) / self.scale,
                         self.bank, self.k)

    def adapted_to(self, looks: np.ndarray) -> "Look":
        """This part for a model adapted to a deploy (adapt_bn) whose images have the raw look
        statistics ``looks``: each statistic is moved by the difference between those images'
        median and the training images' (the bank's), as BatchNorm adaptation moves the
        network's statistics, so that a lab's look as a whole is what the training images'
        was, while a slide that stands out among the deploy's (a fluorescence scan among
        brightfield slides, however many) still stands out. Medians: a few such slides do not
        move them. Spreads and the threshold are the training's."""
        looks = np.asarray(looks, dtype=np.float64)
        trained = np.median(self.bank, axis=0) * self.scale + self.centre
        return dataclasses.replace(self, centre=self.centre + np.median(looks, axis=0) - trained)

    def to_file(self) -> dict:
        return {"bank": torch.from_numpy(self.bank.astype(np.float32)),
                "centre": torch.from_numpy(self.centre.astype(np.float64)),
                "scale": torch.from_numpy(self.scale.astype(np.float64)),
                "threshold": float(self.threshold), "k": int(self.k)}

    @classmethod
    def from_file(cls, obj: dict | None) -> "Look | None":
        if not obj:
            return None
        return cls(obj["bank"].double().numpy(), obj["centre"].double().numpy(),
                   obj["scale"].double().numpy(), float(obj["threshold"]), int(obj["k"]))

    @classmethod
    def fit(cls, train_looks: np.ndarray, val_looks: np.ndarray,
            held_out: np.ndarray | None = None, groups: np.ndarray | None = None) -> "Look":
        """The bank from ``train_looks``, thresholded on the validation images' scores and,
        where given, ``held_out``'s: the bank's images as they are (unaugmented), bank row i
        being a draw of held-out image i % len(held_out), each scored without the draws of its
        group (``groups``: a label per held-out image, its patient where the inputs have
        patients, as the validation split is made; by default each image alone). The look
        statistics do not depend on the model, so those images are as unseen as the
        validation ones, and a 99th percentile of a few hundred images is far steadier than
        one of a few dozen (in effect their largest)."""
        train_looks = np.asarray(train_looks, dtype=np.float64)
        centre = train_looks.mean(0)
        scale = np.maximum(train_looks.std(0), 1e-3)  # a statistic constant in training
        bank = ((train_looks - centre) / scale).astype(np.float32).astype(np.float64)
        part = cls(bank, centre, scale, 1.0)
        scored = [part.scores(val_looks)]
        if held_out is not None and len(held_out):
            if len(bank) % len(held_out):
                raise ValueError(f"{len(bank)} bank rows are no whole number of draws of "
                                 f"{len(held_out)} held-out images")
            labels = np.arange(len(held_out)) if groups is None else np.asarray(groups)
            owner = labels[np.arange(len(bank)) % len(held_out)]
            _, sizes = np.unique(owner, return_counts=True)
            if len(bank) - sizes.max() >= part.k:  # every row keeps k others: the same score
                rows = (np.asarray(held_out, dtype=np.float64) - centre) / scale
                scored.append(distances(rows, bank, part.k, groups=(labels, owner)))
        threshold = float(np.quantile(np.concatenate(scored), QUANTILE))
        return cls(bank, centre, scale, max(threshold, 1e-6))


@dataclass(frozen=True)
class Familiarity:
    """What the model file stores for the rule: its content part (features) and, in model
    files from thumbclf 1.3 on, its look part."""

    bank: np.ndarray  # (n, d) L2-normalised training features
    threshold: float  # the content part's validation quantile (the file's "threshold")
    k: int = K
    quantile: float = QUANTILE
    look: Look | None = None

    def unfamiliarity(self, features: np.ndarray) -> np.ndarray:
        """The content part: score / (validation quantile x MARGIN): above 1, unfamiliar."""
        return scores(features, self.bank, self.k) / (self.threshold * MARGIN)

    def to_file(self) -> dict:
        out = {"bank": torch.from_numpy(self.bank.astype(np.float16)),
               "threshold": float(self.threshold), "k": int(self.k),
               "quantile": float(self.quantile)}
        if self.look is not None:
            out["look"] = self.look.to_file()
        return out

    @classmethod
    def from_file(cls, obj: dict | None) -> "Familiarity | None":
        if not obj:
            return None
        return cls(obj["bank"].float().numpy(), float(obj["threshold"]), int(obj["k"]),
                   float(obj["quantile"]), Look.from_file(obj.get("look")))


def fit(train_features: np.ndarray, val_features: np.ndarray,
        train_looks: np.ndarray | None = None, val_looks: np.ndarray | None = None,
        held_out_looks: np.ndarray | None = None, groups: np.ndarray | None = None
        ) -> Familiarity | None:
    """The bank (the features of at most BANK_SIZE training images, which the caller picks)
    and the validation threshold, with the look part where looks are given (``held_out_looks``
    and ``groups``: see Look.fit); None (with the reason logged) when the validation split is
    too small to choose it."""
    if len(val_features) < MIN_VALIDATION or len(train_features) < K:
        log.warning("unfamiliar-slide rule off for this model: %d validation images (need %d "
                    "to choose its threshold: more images or a larger val_fraction)",
                    len(val_features), MIN_VALIDATION)
        return None
    bank = normalise(train_features).astype(np.float16).astype(np.float32)  # as the file has it
    threshold = float(np.quantile(scores(val_features, bank), QUANTILE))
    look = (Look.fit(train_looks, val_looks, held_out_looks, groups) if train_looks is not None
            and val_looks is not None and len(train_looks) >= K else None)
    return Familiarity(bank, max(threshold, 1e-6), look=look)


def bank_positions(train_pos: np.ndarray, seed) -> np.ndarray:
    """A seeded sample of at most BANK_SIZE training positions, in order."""
    return np.sort(np.random.default_rng(seed).permutation(train_pos)[:BANK_SIZE])


def training_looks(get, positions: np.ndarray, *, seed: int, augmented: bool,
                   stain: float) -> tuple[np.ndarray, np.ndarray]:
    """The look part's bank and the images it holds out (Look.fit's ``train_looks`` and
    ``held_out``): the training images at ``positions`` as training augmented them (``stain``:
    its lab-to-lab strength), seeded, in up to 4 draws each where there are few, so that the
    bank covers what the model saw (row i: a draw of positions[i % len(positions)]); and the
    same images as they are. ``get``: uint8 images by position."""
    draws = max(1, min(4, BANK_SIZE // max(1, len(positions))))
    plain = look.of_images(get, positions)[0]
    if not augmented:
        return np.tile(plain, (draws, 1)), plain
    gen = torch.Generator().manual_seed(seed)
    return look.of_images(get, np.tile(positions, draws), gen=gen, stain=stain)[0], plain


def rule_sentence(rule: Familiarity | None = None) -> str:
    """What the report says of the rule in force (``rule``: with its bank's size)."""
    how = (f" (cosine distance to the {rule.k}th nearest of {len(rule.bank)} training images)"
           if rule is not None else "")
    further = "further" if MARGIN == 1 else f"{MARGIN:g} times further"
    look = ("" if rule is not None and rule.look is None else
            f"; so is a slide whose look (tissue, glass, stain, texture) lies {LOOK_MARGIN:g} "
            f"times as far from the training images' looks as those of {QUANTILE:.0%} of the "
            "training and validation images do (a training image measured against the "
            "others; column unfamiliarity_look)")
    return (f"Unfamiliar-slide rule: on; a slide whose features lie {further} from the "
            f"training images than {QUANTILE:.0%} of the validation images did{how} is "
            f"Undecided (undecided_reason 'unfamiliar'){look}.")


def ensemble_signals(rules: list[Familiarity | None], features: list[np.ndarray],
                     looks: np.ndarray, tissue: np.ndarray) -> dict[str, np.ndarray]:
    """What the decision step needs besides the probabilities, by predictions-table column:
    the tissue fraction, and where every model has the rule its unfamiliarity (the larger of
    its parts) and each part, averaged over the models."""
    out = {table.TISSUE: np.asarray(tissue, dtype=float)}
    if not rules or any(r is None for r in rules):
        return out
    content = np.mean([r.unfamiliarity(f) for r, f in zip(rules, features)], axis=0)
    out[table.UNFAMILIARITY] = out[table.UNFAMILIAR_CONTENT] = content
    if all(r.look is not None for r in rules):
        out[table.UNFAMILIAR_LOOK] = np.mean([r.look.unfamiliarity(looks) for r in rules], axis=0)
        out[table.UNFAMILIARITY] = np.maximum(content, out[table.UNFAMILIAR_LOOK])
    return out
