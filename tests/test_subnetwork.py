"""Compact subnetwork files and materialize: round trips, size, and every error a user can meet."""

import json
import os

import pytest
import torch
import torchvision
from torch import nn

from supermask_fx import (
    SubnetworkFileError,
    gated_layers,
    load_subnetwork,
    mask_stats,
    materialize,
    popupify,
    safetensors_io,
    save_subnetwork,
)
from supermask_fx.subnetwork import pack_bits, unpack_bits


def trained_resnet(seed=0, k=0.3):
    model = popupify(torchvision.models.resnet18(num_classes=10), k=k, seed=seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # move scores (and BN stats) away from their initial values
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = trained_resnet()
    path = tmp_path_factory.mktemp("sub") / "r18.safetensors"
    size = save_subnetwork(model, path)
    return model, path, size


def test_pack_unpack_round_trip():
    for n in [1, 7, 8, 9, 1000]:
        mask = torch.rand(n) < 0.3
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert torch.equal(unpack_bits(packed, (n,)), mask)


def test_save_load_gives_identical_eval_logits(saved):
    model, path, _ = saved
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        again = load_subnetwork(torchvision.models.resnet18(num_classes=10), path).eval()
        assert torch.equal(again(x), model(x))
    assert [layer.kept for layer in mask_stats(again).layers] == [layer.kept for layer in mask_stats(model).layers]


def test_file_is_about_one_bit_per_weight_plus_bn_stats(saved):
    model, path, size = saved
    assert size == os.path.getsize(path)
    tensors, metadata, _ = safetensors_io.read(path)
    state_bytes = sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("state/"))
    assert all(name.startswith(("mask/", "state/")) for name in tensors)
    gated = {gate.name for _, gate in gated_layers(model)}
    stored = {name[len("state/") :] for name in tensors if name.startswith("state/")}
    assert stored and not stored & gated and not any(name.endswith("scores") for name in stored)
    masked = mask_stats(model).numel
    assert (size - state_bytes) * 8 <= 1.05 * masked + 8 * 16384  # 1.05 bits/weight + a few KB of header


def test_file_reads_with_the_official_safetensors_package(saved):
    safetensors = pytest.importorskip("safetensors.torch")
    _, path, _ = saved
    ours, _, _ = safetensors_io.read(path)
    theirs = safetensors.load_file(str(path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_wrong_architecture_names_what_differs(saved):
    _, path, _ = saved
    with pytest.raises(SubnetworkFileError, match=r"another architecture.*fc.weight: shape \(10, 512\) in the file"):
        load_subnetwork(torchvision.models.resnet18(num_classes=7), path)
    with pytest.raises(SubnetworkFileError, match="another architecture.*missing from the model|not in the file"):
        load_subnetwork(torchvision.models.resnet34(num_classes=10), path)


def test_wrong_seed_names_the_field(saved):
    _, path, _ = saved
    other = popupify(torchvision.models.resnet18(num_classes=10), k=0.3, seed=1)
    with pytest.raises(SubnetworkFileError, match="seed: file has 0, model has 1"):
        load_subnetwork(other, path)


def test_truncated_file(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    for cut in [4, 100, len(data) // 2, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(SubnetworkFileError, match="truncated"):
            load_subnetwork(torchvision.models.resnet18(num_classes=10), bad)


def test_corrupted_byte_is_caught_by_the_checksum(saved, tmp_path):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x10
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(SubnetworkFileError, match="corrupted"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), bad)


def test_not_a_subnetwork_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors_io.write(plain, {"x": torch.zeros(3)}, {})
    with pytest.raises(SubnetworkFileError, match="not a supermask_fx subnetwork"):
        load_subnetwork(nn.Linear(3, 3), plain)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SubnetworkFileError, match="not valid JSON"):
        load_subnetwork(nn.Linear(3, 3), junk)
    with pytest.raises(SubnetworkFileError, match="no such file"):
        load_subnetwork(nn.Linear(3, 3), tmp_path / "missing.safetensors")


def test_weights_regenerating_differently_is_caught(saved, tmp_path):
    _, path, _ = saved
    tensors, metadata, _ = safetensors_io.read(path)
    info = json.loads(metadata["supermask_fx"])
    info["layers"][3]["sha256"] = "0" * 64  # as if this torch's RNG drew other weights
    forged = tmp_path / "forged.safetensors"
    safetensors_io.write(
        forged, tensors, {"supermask_fx": json.dumps(info)}, checksum_key="supermask_fx.content_sha256"
    )
    assert info["layers"][3]["name"] == "layer1.1.conv1.weight"
    with pytest.raises(SubnetworkFileError, match=r"weights regenerated for layer1.1.conv1.weight .* differ"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), forged)


def test_atomic_write_keeps_the_old_file_on_failure(saved, tmp_path, monkeypatch):
    model, path, _ = saved
    target = tmp_path / "keep.safetensors"
    save_subnetwork(model, target)
    before = target.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_subnetwork(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]  # no temporary left behind


def test_save_refuses_retrained_weights_and_dense():
    model = popupify(nn.Sequential(nn.Linear(4, 4)), k=0.5)
    with torch.no_grad():
        model[0]._parameters["weight"].add_(1.0)
    with pytest.raises(ValueError, match="not the ones seed 0 gives"):
        save_subnetwork(model, "unused.safetensors")
    with pytest.raises(ValueError, match="dense"):
        save_subnetwork(popupify(nn.Linear(4, 4), k=0.5, method="dense"), "unused.safetensors")


def test_non_regenerable_parameters_are_stored(tmp_path):
    """ViT-style parameters (position embeddings) cannot be redrawn from the seed: the file keeps them."""
    model = popupify(torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5), k=0.5).eval()
    path = tmp_path / "vit.safetensors"
    save_subnetwork(model, path)
    tensors, _, _ = safetensors_io.read(path)
    assert "state/encoder.pos_embedding" in tensors and "state/class_token" in tensors
    fresh = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5)
    torch.nn.init.normal_(fresh.encoder.pos_embedding)  # different from the saved one
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_subnetwork(fresh, path).eval()(x), model(x))


def test_materialize_round_trips_into_the_original_class():
    model = trained_resnet(seed=3)
    plain = materialize(model)
    assert type(plain) is torchvision.models.ResNet and type(plain.conv1) is nn.Conv2d
    assert not any("scores" in k or k.endswith(".mask") for k in plain.state_dict())
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert type(model.conv1).__name__ == "SupermaskConv2d"  # the original is untouched
    exported = torch.export.export(plain.eval(), (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_saved_file_has_the_usual_permissions(saved):
    _, path, _ = saved
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
