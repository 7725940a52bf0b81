import math
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from thumbclf.core.errors import ModelError
from thumbclf.inputs.images import Preprocessing
from thumbclf.nn import models
from thumbclf.nn.data import IMAGENET, Normalisation
from thumbclf.nn.freeze import freeze, train_mode
from thumbclf.nn.models import LoadedModel, build_model, load_model, load_ssl, save_model

CLASSES = ("Biopsy", "IHC", "TMA")


def test_the_backbones_of_earlier_model_files_build_with_the_right_head():
    for name in ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0"):
        m = build_model(name, 4)
        out = m.eval()(torch.zeros(1, 3, 64, 64))
        assert out.shape == (1, 4), name


def test_unknown_model_name_suggests_close_ones_and_says_what_is_valid():
    with pytest.raises(ModelError, match=r"model_name 'vgg99' is unknown; did you mean vgg\w+"
                       r".*torchvision classification model.*prototype name \(resnet, resnet18"):
        build_model("vgg99", 3)


def test_prototype_model_names_still_work():
    assert isinstance(build_model("resnet", 2).fc, nn.Linear)  # the prototype's ResNet-50
    assert build_model("resnet", 2).fc.in_features == 2048


def test_freeze_ratio_freezes_children_in_order_and_keeps_bn_statistics():
    m = build_model("resnet18", 3)
    frozen = freeze(m, "resnet18", 0.5)
    assert frozen == ["conv1", "bn1", "relu", "maxpool", "layer1"]
    assert not any(p.requires_grad for p in m.layer1.parameters())
    assert all(p.requires_grad for p in m.layer2.parameters()) and m.fc.weight.requires_grad
    before = m.bn1.running_mean.clone()
    train_mode(m)
    assert not m.bn1.training and not m.layer1[0].bn1.training and m.layer2[0].bn1.training
    m(torch.rand(4, 3, 64, 64))
    assert torch.equal(before, m.bn1.running_mean)
    assert freeze(build_model("resnet18", 3), "resnet18", 1.0)[-1] == "avgpool"  # head never frozen
    assert freeze(build_model("resnet18", 3), "resnet18", 0.0) == []


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "prefixes"])
def test_ssl_checkpoints_with_common_layouts_load(tmp_path, wrap):
    src = build_model("resnet18", 10)
    state = src.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "prefixes":
        state = {"state_dict": {f"module.backbone.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "ssl.pth")
    dst = build_model("resnet18", 3)
    n = load_ssl(dst, tmp_path / "ssl.pth", "resnet18")
    assert n > 50
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.weight.shape[0] == 3


def test_ssl_checkpoint_that_matches_nothing_is_an_error(tmp_path):
    torch.save({"encoder.whatever": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(ModelError, match="no tensor of the SSL checkpoint matches resnet18"):
        load_ssl(build_model("resnet18", 2), tmp_path / "x.pth", "resnet18")


def test_pretrained_from_a_local_weights_file(tmp_path):
    src = build_model("resnet18", 1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    m = build_model("resnet18", 3, tmp_path / "imagenet.pth")
    assert torch.equal(m.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_model_file_is_self_describing_and_loads_weights_only(tmp_path):
    m = build_model("resnet18", 2)
    prep = Preprocessing(size=224)
    save_model(tmp_path / "m.pt", LoadedModel(m, "resnet18", ("A", "B"), prep,
                                              Normalisation((0.5,) * 3, (0.25,) * 3),
                                              threshold=0.8, temperature=1.5, meta={"fold": 1}))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["classes"] == ["A", "B"] and raw["arch"] == "resnet18" and raw["input_size"] == 224
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.classes == ("A", "B") and loaded.threshold == 0.8 and loaded.temperature == 1.5
    assert torch.equal(loaded.model.fc.weight, m.fc.weight)
    with pytest.raises(ModelError, match="differ from target_labels"):
        load_model(tmp_path / "m.pt", target_labels=("A", "C"))
    with pytest.raises(ModelError, match="the model is a resnet18, but model_name says resnet34"):
        load_model(tmp_path / "m.pt", model_name="resnet34")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_model_file_with_pickled_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="refused: the file holds pickled Python objects"):
        load_model(tmp_path / "evil.pt", target_labels=("A", "B"))
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    with pytest.raises(ModelError):
        load_model(tmp_path / "evil.pkl", target_labels=("A", "B"))
    assert not marker.exists()


def test_truncated_model_file_is_a_clear_error(tmp_path):
    torch.save(build_model("resnet18", 2).state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="perhaps truncated or corrupt"):
        load_model(tmp_path / "t.pt", target_labels=("A", "B"))


def test_prototype_state_dict_needs_labels_and_must_match_them(tmp_path):
    m = build_model("resnet18", 3)
    torch.save(OrderedDict(m.state_dict()), tmp_path / "proto.pt")
    with pytest.raises(ModelError, match="set target_labels"):
        load_model(tmp_path / "proto.pt")
    with pytest.raises(ModelError, match="has 3 outputs but target_labels lists 2"):
        load_model(tmp_path / "proto.pt", target_labels=("A", "B"))
    loaded = load_model(tmp_path / "proto.pt", target_labels=("c", "a", "b"))
    assert loaded.legacy and loaded.classes == ("a", "b", "c") and loaded.prep.recipe == "legacy"
    assert loaded.norm.mean == (0.0, 0.0, 0.0) and loaded.norm.std == (1.0, 1.0, 1.0)
    with pytest.raises(ModelError, match="do not fit the architecture"):
        load_model(tmp_path / "proto.pt", target_labels=("a", "b", "c"), model_name="resnet34")


def test_imagenet_weights_that_cannot_be_downloaded_give_a_clear_error(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ModelError, match=r"pretrained: cannot get the ImageNet weights of resnet18 "
                       r"\(OSError.*pretrained: false"):
        build_model("resnet18", 3, pretrained=True)


def test_imagenet_weights_are_loaded_without_unpickling_code(monkeypatch):
    from torchvision.models._api import WeightsEnum

    seen = {}
    reference = build_model("resnet18", 1000).state_dict()

    def fake(self, *a, **k):
        seen.update(k)
        return reference

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake)
    m = build_model("resnet18", 3, pretrained=True)
    assert seen.get("weights_only") is True
    assert torch.equal(m.conv1.weight, reference["conv1.weight"]) and m.fc.out_features == 3


def test_nan_weights_are_never_written(tmp_path):
    """Issue 24, item 7: a training that diverges writes no model file."""
    from thumbclf.core.errors import ConfigError

    net = models.build_model("resnet18", 3)
    with torch.no_grad():
        net.fc.weight.fill_(math.nan)
    with pytest.raises(ConfigError, match="training diverged: 1 tensors .* \\(first: fc.weight\\)"):
        models.save_model(tmp_path / "model.pt", models.LoadedModel(
            net, "resnet18", CLASSES, Preprocessing(size=64), IMAGENET, threshold=0.5))
    backbone, _ = models.backbone_only("resnet18")
    with torch.no_grad():
        backbone.conv1.weight.fill_(math.inf)
    with pytest.raises(ConfigError, match="training diverged"):
        models.save_ssl_checkpoint(tmp_path / "ssl_checkpoint.pt", backbone, arch="resnet18",
                                   prep=Preprocessing(size=224), norm=IMAGENET, description={})
    assert not list(tmp_path.iterdir())


def test_a_model_file_loads_without_drawing_the_weights_it_replaces(tmp_path, monkeypatch):
    """load_model built the network with random weights, then overwrote them with the file's
    (2 s for a VGG16, at every load: each model of an ensemble, each SLURM task, each Ray
    actor). It builds on the meta device and takes the file's tensors: the same outputs."""
    torch.manual_seed(0)
    net = build_model("resnet18", 3).eval()
    save_model(tmp_path / "m.pt", LoadedModel(net, "resnet18", CLASSES, Preprocessing(size=64),
                                              IMAGENET, threshold=0.5))
    torch.save({k: v.double() if v.is_floating_point() else v  # another dtype: as before
                for k, v in net.state_dict().items()}, tmp_path / "f64.pt")
    drawn = []
    original = torch.nn.init.kaiming_normal_

    def watched(tensor, *args, **kwargs):
        drawn.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", watched)
    loaded = load_model(tmp_path / "m.pt")
    assert drawn and set(drawn) == {"meta"}
    legacy = load_model(tmp_path / "f64.pt", model_name="resnet18", target_labels=CLASSES)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))
        assert torch.allclose(legacy.model(x), net(x), atol=1e-6)
    for m in (loaded.model, legacy.model):
        assert {(t.device.type, t.dtype) for t in m.parameters()} == {("cpu", torch.float32)}
        assert all(p.requires_grad for p in m.parameters())
