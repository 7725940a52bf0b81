"""Every backbone the prototype accepted, and the rest of torchvision's classification zoo."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tvm

from conftest import run_script
from thumbclf.inputs import synth
from thumbclf.nn.data import IMAGENET
from thumbclf.nn.training import training_loss
from thumbclf.core.errors import ModelError
from thumbclf.outputs.explain import gradcam
from thumbclf.inputs.images import Preprocessing
from thumbclf.nn.models import (BUILD_KWARGS, LoadedModel, build_model, head_names, input_size,
                                load_model, save_model)
from thumbclf.nn.freeze import blocks, freeze, holds_head, train_mode
from thumbclf.core.backbones import PROTOTYPE_NAMES, arch_name, zoo

# prototype name -> (architecture, side used in these tests, input size in the model file)
PROTOTYPE = {"resnet": ("resnet50", 64, 224), "resnet18": ("resnet18", 64, 224),
             "alexnet": ("alexnet", 64, 224), "vgg": ("vgg11_bn", 64, 224),
             "vgg16": ("vgg16_bn", 64, 224), "squeezenet": ("squeezenet1_0", 64, 224),
             "densenet": ("densenet121", 64, 224), "inception": ("inception_v3", 299, 299),
             "vit": ("vit_b_32", 224, 224), "efficient": ("efficientnet_b7", 64, 600)}
HEAVY = {"resnet", "alexnet", "vgg", "vgg16", "inception", "vit", "efficient"}  # > 5 s each


def test_prototype_names_map_to_the_architectures_it_built():
    assert {k: v[0] for k, v in PROTOTYPE.items()} == PROTOTYPE_NAMES
    assert {name: arch_name(name) for name in PROTOTYPE} == PROTOTYPE_NAMES
    assert arch_name("VGG16") == "vgg16_bn" and arch_name(" convnext_tiny ") == "convnext_tiny"
    assert len(zoo()) >= 80 and {"vit_b_16", "regnet_y_800mf", "mobilenet_v3_large"} <= set(zoo())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
                                  for n in PROTOTYPE])
def test_each_prototype_backbone_freezes_trains_saves_and_reloads(tmp_path, name):
    arch, side, size = PROTOTYPE[name]
    torch.manual_seed(0)
    model = build_model(name, 3)
    heads = head_names(model)
    assert all(model.get_submodule(h).weight.shape[0] == 3 for h in heads)
    assert (len(heads) == 2) == (name == "inception")  # its AuxLogits.fc, replaced too
    frozen = freeze(model, name, 0.5)
    units = blocks(model)
    assert frozen == [b.name for b in units[:len(units) // 2] if not holds_head(b.name, heads)]
    assert len(frozen) >= 2
    for b in units:
        want = b.name not in frozen
        assert all(p.requires_grad == want for p in b.module.parameters()), b.name

    x = torch.randn(2, 3, side, side)
    y = torch.tensor([0, 2])
    train_mode(model)
    watched = (heads[0] + ".", frozen[0] + ".")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(watched)}
    # plain SGD: Adam's two moments of a VGG's 130 M weights cost 1.7 s a step (issue 32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits, loss = training_loss(model(x), y, nn.CrossEntropyLoss())
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    loss.backward()
    if name == "inception":  # the auxiliary output takes part in the loss
        assert model.AuxLogits.fc.weight.grad.abs().sum() > 0
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert any(k.startswith(heads[0] + ".") for k in changed)
    assert not any(k.startswith(frozen[0] + ".") for k in changed)  # frozen: weights and BN stats

    prep = Preprocessing(size=input_size(name))
    save_model(tmp_path / "m.pt",
               LoadedModel(model, arch_name(name), ("a", "b", "c"), prep, IMAGENET, threshold=0.5))
    loaded = load_model(tmp_path / "m.pt", model_name=name)
    assert loaded.arch == arch and loaded.prep.size == size
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), 1)
        got = torch.softmax(loaded.model(x), 1)
    assert torch.allclose(expected, got, atol=1e-6)


def prototype_model(name: str, n: int) -> nn.Module:
    """The network the prototype's Initialize_model built (without downloading weights)."""
    if name == "resnet":
        m = tvm.resnet50()
        m.fc = nn.Linear(m.fc.in_features, n)
    elif name == "resnet18":
        m = tvm.resnet18()
        m.fc = nn.Linear(m.fc.in_features, n)
    elif name in ("alexnet", "vgg", "vgg16"):
        m = {"alexnet": tvm.alexnet, "vgg": tvm.vgg11_bn, "vgg16": tvm.vgg16_bn}[name]()
        m.classifier[6] = nn.Linear(m.classifier[6].in_features, n)
    elif name == "squeezenet":
        m = tvm.squeezenet1_0()
        m.classifier[1] = nn.Conv2d(512, n, kernel_size=(1, 1), stride=(1, 1))
    elif name == "densenet":
        m = tvm.densenet121()
        m.classifier = nn.Linear(m.classifier.in_features, n)
    else:  # inception: pretrained=True built it with transform_input=True
        m = tvm.inception_v3(aux_logits=True, transform_input=True, init_weights=False)
        m.AuxLogits.fc = nn.Linear(m.AuxLogits.fc.in_features, n)
        m.fc = nn.Linear(m.fc.in_features, n)
    return m


@pytest.mark.parametrize("name, size", [
    ("resnet", 256), ("resnet18", 224), ("alexnet", 224), ("vgg", 224),
    pytest.param("vgg16", 224, marks=pytest.mark.slow), ("squeezenet", 224), ("densenet", 224),
    pytest.param("inception", 299, marks=pytest.mark.slow)])
def test_prototype_state_dicts_load_with_the_prototype_input_size(tmp_path, name, size):
    torch.manual_seed(1)
    proto = prototype_model(name, 2).eval()
    torch.save(OrderedDict(proto.state_dict()), tmp_path / "proto.pt")
    loaded = load_model(tmp_path / "proto.pt", model_name=name, target_labels=("b", "a"))
    assert loaded.legacy and loaded.classes == ("a", "b") and loaded.prep.recipe == "legacy"
    assert loaded.prep.size == size and loaded.norm.std == (1.0, 1.0, 1.0)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(proto(x), loaded.model(x), atol=1e-5)


@pytest.mark.parametrize("name, keys, package", [
    ("vit", ["patch_embedding.weight", "transformer.blocks.0.attn.proj_q.weight", "fc.weight"],
     "pytorch_pretrained_vit"),
    ("efficient", ["_conv_stem.weight", "_blocks.0._bn1.weight", "_fc.weight", "fc.weight"],
     "efficientnet_pytorch"),
    ("resnet18", ["_conv_stem.weight", "_blocks.0._bn1.weight"], "efficientnet_pytorch")])
def test_prototype_vit_and_efficient_state_dicts_are_refused_saying_where_they_came_from(
        tmp_path, name, keys, package):
    torch.save({k: torch.zeros(2, 2) for k in keys}, tmp_path / "p.pt")
    with pytest.raises(ModelError) as err:
        load_model(tmp_path / "p.pt", model_name=name, target_labels=("a", "b"))
    message = str(err.value)
    assert "\n" not in message and package in message and "Retrain with model_name" in message


def test_every_torchvision_classifier_has_one_head_and_a_freezing_order():
    for name in zoo():
        try:
            with torch.device("meta"):  # built as thumbclf builds it (googlenet: no aux heads)
                model = tvm.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
        except NotImplementedError:  # regnets compute their widths with real tensors
            continue
        heads = head_names(model)
        outputs = model.get_submodule(heads[0])
        assert getattr(outputs, "out_features", getattr(outputs, "out_channels", 0)) == 1000, name
        assert len(heads) == (2 if name == "inception_v3" else 1), name
        units = blocks(model)
        body = [b for b in units if not holds_head(b.name, heads)]
        total = sum(b.size() for b in body)
        assert len(units) >= 6 and holds_head(units[-1].name, heads), name
        assert all(b.size() <= 0.8 * total or not list(b.module.children()) for b in body), name
        params = {id(p) for b in units for p in [*b.module.parameters(), *b.loose]}
        assert params == {id(p) for p in model.parameters()}, name  # every parameter has a block


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "googlenet", "regnet_x_400mf",
                                  "shufflenet_v2_x0_5"])
def test_other_torchvision_backbones_train_and_explain(name):
    torch.manual_seed(0)
    model = build_model(name, 2)
    assert freeze(model, name, 0.5)
    train_mode(model)
    logits, loss = training_loss(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]),
                                 nn.CrossEntropyLoss())
    loss.backward()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        predicted = int(model.eval()(x).argmax())  # its map is rarely all negative
    cam = gradcam(model, name, x, predicted)
    assert cam.shape == (128, 128) and np.isfinite(cam).all() and cam.min() == 0.0
    assert cam.max() == pytest.approx(1.0) or cam.max() == 0.0  # all-negative maps are possible


def test_gradcam_target_is_resnets_layer4():
    torch.manual_seed(0)
    model = build_model("resnet18", 3).eval()
    x = torch.randn(1, 3, 96, 96)
    store = {}
    model.layer4.register_forward_hook(lambda m, i, o: store.update(act=o))
    model(x)[0, 1].backward()
    act = store["act"]
    grad = torch.autograd.grad(model(x)[0, 1], store["act"])[0]
    manual = torch.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    manual = torch.nn.functional.interpolate(manual, size=(96, 96), mode="bilinear")[0, 0]
    manual = ((manual - manual.min()) / (manual.max() - manual.min())).detach().numpy()
    assert np.allclose(gradcam(model, "resnet18", x, 1), manual, atol=1e-5)


@pytest.mark.slow
def test_gradcam_of_a_vit_uses_the_tokens_entering_its_last_layer():
    torch.manual_seed(0)
    model = build_model("vit", 2).eval()
    cam = gradcam(model, "vit_b_32", torch.randn(1, 3, 224, 224), 0)
    assert cam.shape == (224, 224) and cam.max() == pytest.approx(1.0) and cam.std() > 0.05
    # the last layer's patch tokens never reach the class token: their gradient is zero
    store = {}
    model.encoder.layers[-1].register_forward_hook(lambda m, i, o: store.update(out=o))
    score = model(torch.randn(1, 3, 224, 224))[0, 0]
    assert torch.autograd.grad(score, store["out"])[0][:, 1:].abs().sum() == 0


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    return synth.generate(out, per_class=1, seed=5, sides=(60, 200),
                          classes=("Biopsy", "IHC", "TMA"))


@pytest.mark.slow
def test_a_prototype_state_dict_deploys_with_the_prototypes_preprocessing(three_images, tmp_path):
    """The recipe is the prototype's whatever the network: SqueezeNet (1.2 M parameters, its
    Grad-CAM on a layer of its own) rather than the VGG16 of 138 M that took 10 s (issue 32)."""
    from PIL import Image

    import pandas as pd

    torch.manual_seed(0)
    proto = prototype_model("squeezenet", 3).eval()
    torch.save(proto.state_dict(), tmp_path / "proto.pt")  # as the prototype saved it
    exp = tmp_path / "proto.txt"
    exp.write_text(json.dumps({"thumbData": str(three_images), "modelAdr": "proto.pt",
                               "target_labels": ["TMA", "Biopsy", "IHC"],
                               "model_name": "squeezenet",
                               "hasLabels": 1, "sortThumbs": 0, "bootstrap": 0, "gradcam": "1",
                               "num_workers": 0, "batch_size": "2"}))
    r = run_script("deploy_thumbclassifier.py", str(exp))
    assert r.returncode == 0, r.stderr
    pred = pd.read_csv(tmp_path / "proto" / "predictions.csv")
    for i in range(len(pred)):  # the prototype's recipe by hand: black padding, bicubic, [0, 1]
        img = Image.open(pred["PATH"][i]).convert("RGB")
        side = max(img.size)
        canvas = Image.new("RGB", (side, side))
        canvas.paste(img, (int((side - img.size[0]) / 2), int((side - img.size[1]) / 2)))
        arr = np.array(canvas.resize((224, 224), Image.Resampling.BICUBIC))
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).unsqueeze(0)
        with torch.no_grad():
            p = torch.softmax(proto(x), 1)[0].numpy()
        assert np.allclose(pred.loc[i, ["Biopsy", "IHC", "TMA"]].to_numpy(float), p, atol=1e-4)
    assert list((tmp_path / "proto" / "gradcam").rglob("*.png"))


@pytest.mark.slow
def test_a_prototype_experiment_file_with_0_1_and_numeric_strings_trains(tiny_data, tmp_path):
    exp = tmp_path / "proto.txt"
    exp.write_text(json.dumps({
        "thumbData": str(tiny_data), "model_name": "squeezenet", "trainFull": 0, "SSL": 0,
        "foldNumber": "2", "max_epochs": "1", "stopEpoch": "1", "patience": "1", "seed": "3",
        "batch_size": "8", "lr": "0.001", "wd": "0.0001", "freezeRatio": "0.5",
        "prediction_threshold": "0.5", "pretrained": 0, "bootstrap": "0", "gradcam": 1,
        "num_workers": 0}))
    r = run_script("train_thumbclassifier.py", "--ExpFile", str(exp))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "proto"
    model = torch.load(out / "fold_2" / "model.pt", weights_only=True)
    assert model["arch"] == "squeezenet1_0" and model["input_size"] == 224
    log = (out / "run.log").read_text()
    assert "frozen (freezeRatio 0.50): features.0" in log
    assert list((out / "gradcam").rglob("*.png"))

    bad = tmp_path / "bad.txt"
    bad.write_text(json.dumps({"thumbData": str(tiny_data), "trainFull": "False"}))
    r = run_script("train_thumbclassifier.py", "--ExpFile", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {bad}: trainFull must be true or false (or 1 or 0), not a string: the prototype "
        "read every non-empty string as true, even \"False\", so thumbclf will not guess; write "
        "true or false without quotes; got 'False'"]
