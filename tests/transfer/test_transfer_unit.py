"""Unit tests of training/transfer.py on small real models (no training loop, no network)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from imgformat.spec import make_preprocess
from training.checkpoint import save_checkpoint
from training.models import build_model, get_model_spec
from training.transfer import (FREEZE_POLICIES, PretrainedError, apply_freeze, imagenet_state_dict,
                               keep_frozen_bn_eval, load_pretrained, param_groups, parse_unfreeze_schedule,
                               unfreeze)


def _resnet(num_classes=10, in_channels=1, input_size=16, **kw) -> nn.Module:
    return build_model("resnet18", num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kw)


def _ckpt(model: nn.Module, name="resnet18", **kwargs) -> dict:
    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 16, **kwargs}
    return {"model": {"name": name, "kwargs": kwargs}, "num_classes": kwargs["num_classes"],
            "in_channels": kwargs["in_channels"], "input_size": kwargs["input_size"],
            "preprocess": make_preprocess(channels=kwargs["in_channels"], input_size=kwargs["input_size"],
                                          mean=[0.5] * kwargs["in_channels"], std=[0.25] * kwargs["in_channels"]),
            "class_names": [str(i) for i in range(kwargs["num_classes"])], "state_dict": model.state_dict()}


def test_checkpoint_source_loads_backbone_and_reinitialises_head(tmp_path):
    torch.manual_seed(0)
    src = _resnet(num_classes=10)
    path = save_checkpoint(tmp_path / "src.pt", _ckpt(src))
    dst = _resnet(num_classes=4, head=(32,), dropout=0.2)   # another task, dense head (seeds/002)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("fc.")}
    report = load_pretrained(dst, "resnet18", str(path), in_channels=1)
    s, d = src.state_dict(), dst.state_dict()
    for k in report["loaded"]:
        assert torch.equal(s[k], d[k]), f"{k} was reported loaded but differs"
    assert not any(k.startswith("fc.") for k in report["loaded"])
    assert sorted(report["reinitialised"]) == sorted(head_before), report["reinitialised"]
    for k, v in head_before.items():
        assert torch.equal(v, d[k]), f"head {k} should keep its fresh init"
    assert "layer4.1.bn2.running_var" in report["loaded"]


def test_plain_state_dict_3_to_1_channel_sums_rgb_filters(tmp_path):
    """A torchvision RGB ImageNet-stem state_dict into a 1-channel model: conv1 = sum of RGB filters."""
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None)       # stands in for the ImageNet file: same keys/shapes
    path = tmp_path / "resnet18-rgb.pth"
    torch.save(rgb.state_dict(), path)
    gray = _resnet(num_classes=5, in_channels=1, input_size=96)   # > 64 px: ImageNet 7x7 stem
    report = load_pretrained(gray, "resnet18", str(path), in_channels=1)
    assert report["adapted"] == ["conv1.weight"], report
    assert report["mismatched"]["conv1.weight"] == [[64, 3, 7, 7], [64, 1, 7, 7]]
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    # the summed filter answers a grey image exactly as the RGB filter answers (g, g, g)
    x = torch.rand(2, 1, 96, 96)
    assert torch.allclose(gray.conv1(x), rgb.conv1(x.repeat(1, 3, 1, 1)), atol=1e-5)
    assert "fc.weight" in report["mismatched"] and "fc.weight" in report["reinitialised"]


def test_small_stem_conv1_is_reported_and_reinitialised(tmp_path):
    rgb = torchvision.models.resnet18(weights=None)
    path = tmp_path / "rgb.pth"
    torch.save({"module." + k: v for k, v in rgb.state_dict().items()}, path)   # DDP-style prefix
    small = _resnet(num_classes=10, in_channels=3, input_size=32)                # 3x3 small stem
    init = small.conv1.weight.clone()
    report = load_pretrained(small, "resnet18", str(path), in_channels=3)
    assert "conv1.weight" in report["reinitialised"]
    assert report["mismatched"]["conv1.weight"] == [[64, 3, 7, 7], [64, 3, 3, 3]]
    assert torch.equal(small.conv1.weight, init)
    # a re-initialised input conv must stay trainable under --freeze backbone
    names = apply_freeze(small, "fc", "backbone", None, keep_trainable=report["reinitialised"])
    assert names == ["conv1.weight", "fc.weight", "fc.bias"]


def test_other_architecture_is_an_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(PretrainedError, match="does not fit model 'resnet18'.*unexpected layer1.2"):
        load_pretrained(_resnet(), "resnet18", str(path), in_channels=1)


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(_resnet(), "resnet18", str(tmp_path / "nope.pt"), in_channels=1)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="cannot load pretrained weights") as e:
        load_pretrained(_resnet(), "resnet18", str(junk), in_channels=1)
    assert "\n" not in str(e.value)
    with pytest.raises(PretrainedError, match="no ImageNet weights for model 'lenet'"):
        imagenet_state_dict("lenet")


def test_imagenet_from_cache_and_clear_error_offline(tmp_path, monkeypatch):
    """TORCH_HOME with the file -> loads it, no network; without -> one-line error naming path and flag."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # An unreachable proxy makes any download attempt fail at once, with or without internet.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(PretrainedError) as e:
        imagenet_state_dict("resnet18")
    msg = str(e.value)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(cache) in msg and "resnet18-f37072fd.pth" in msg and "--pretrained PATH" in msg, msg
    assert "\n" not in msg
    cache.mkdir(parents=True, exist_ok=True)
    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), cache / "resnet18-f37072fd.pth")
    model = _resnet(num_classes=3, in_channels=3, input_size=96)
    report = load_pretrained(model, "resnet18", "imagenet", in_channels=3)
    assert report["source"].startswith("imagenet")
    assert torch.equal(model.conv1.weight, rgb.conv1.weight)
    assert "fc.weight" in report["reinitialised"]


def test_freeze_backbone_and_unfreeze_from_follow_parameter_order():
    model = _resnet()
    names = [n for n, _ in model.named_parameters()]
    assert apply_freeze(model, "fc", "backbone", None) == ["fc.weight", "fc.bias"]
    trainable = apply_freeze(model, "fc", None, "layer4.0.conv1")
    assert trainable == names[names.index("layer4.0.conv1.weight"):]
    assert apply_freeze(model, "fc", "backbone", "layer4") == names[names.index("layer4.0.conv1.weight"):]
    assert apply_freeze(model, "fc", None, None) == names
    with pytest.raises(ValueError, match="unknown --freeze 'all'; valid: none, backbone"):
        apply_freeze(model, "fc", "all", None)
    with pytest.raises(ValueError, match="--unfreeze-from 'layer9' names no parameter"):
        apply_freeze(model, "fc", None, "layer9")
    assert set(FREEZE_POLICIES) >= {"none", "backbone"}


@pytest.mark.parametrize("name", ["resnet18", "resnet18_scratch", "cifar_cnn_m3", "simple_cnn", "lenet", "mlp"])
def test_freeze_backbone_over_registry(name):
    """Every registered model's classifier prefix names its head: freezing leaves exactly the head."""
    from training.models import list_models
    if name not in list_models():
        pytest.skip(f"{name} not registered")
    model = build_model(name, num_classes=3, in_channels=1, input_size=16)
    prefix = get_model_spec(name).classifier
    trainable = apply_freeze(model, prefix, "backbone", None)
    assert trainable and all(n.startswith(prefix + ".") for n in trainable), trainable


def test_schedule_parse_and_unfreeze():
    assert parse_unfreeze_schedule("3:layer4,6:layer3") == {3: ["layer4"], 6: ["layer3"]}
    assert parse_unfreeze_schedule("6:layer3, 3:layer4+layer2,3:bn1") == {3: ["layer4", "layer2", "bn1"],
                                                                        6: ["layer3"]}
    assert parse_unfreeze_schedule("") == {}
    for bad in ("layer4", "0:layer4", "x:layer4", "3:"):
        with pytest.raises(ValueError, match="bad --unfreeze-at item"):
            parse_unfreeze_schedule(bad)
    model = _resnet()
    apply_freeze(model, "fc", "backbone", None)
    newly = unfreeze(model, ["layer4"])
    assert newly and all(n.startswith("layer4.") for n in newly)
    assert unfreeze(model, ["layer4"]) == []          # already trainable: nothing new
    with pytest.raises(ValueError, match="names no parameter"):
        unfreeze(model, ["layer7"])


def test_frozen_batchnorm_stays_in_eval_and_keeps_running_stats():
    model = _resnet()
    apply_freeze(model, "fc", None, "layer4")
    model.train()
    frozen_bn = keep_frozen_bn_eval(model)
    assert "bn1" in frozen_bn and "layer3.1.bn2" in frozen_bn and not any(n.startswith("layer4") for n in frozen_bn)
    before = model.bn1.running_mean.clone()
    l4_before = model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 1, 16, 16))
    assert torch.equal(model.bn1.running_mean, before), "frozen BN running stats moved"
    assert not torch.equal(model.layer4[0].bn1.running_mean, l4_before), "trainable BN should update its stats"
    assert model.layer4[0].bn1.training and not model.bn1.training


def test_param_groups_lower_backbone_lr_and_include_frozen():
    model = _resnet()
    apply_freeze(model, "fc", None, "layer4")
    groups = param_groups(model, lr=1e-3, backbone_lr=1e-4, classifier_prefix="fc")
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == 1e-4
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    all_groups = param_groups(model, 1e-3, None, "fc", include_frozen=True)
    assert sum(len(g["params"]) for g in all_groups) == len(list(model.parameters()))
    assert {g["lr"] for g in all_groups} == {1e-3}
    # frozen params inside the optimizer stay bit-identical (their grad is None), then train once unfrozen
    apply_freeze(model, "fc", "backbone", None)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 1e-3, "fc", include_frozen=True), weight_decay=0.1)
    w = model.layer4[0].conv1.weight.clone()
    for step in range(2):
        if step == 1:
            unfreeze(model, ["layer4"])
        opt.zero_grad()
        model(torch.randn(4, 1, 16, 16)).sum().backward()
        opt.step()
        if step == 0:
            assert torch.equal(model.layer4[0].conv1.weight, w)
    assert not torch.equal(model.layer4[0].conv1.weight, w)
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        param_groups(model, 1e-3, None, "fc")
