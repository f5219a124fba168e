"""Compact subnetwork files and materialize: round trips, size, and every error a user can meet."""

import hashlib
import json
import math
import os

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

from supermask_fx import (
    SubnetworkFileError,
    gated_layers,
    load_subnetwork,
    mask_stats,
    materialize,
    popupify,
    save_subnetwork,
)
from supermask_fx.files.subnetwork import pack_bits, unpack_bits, write_file

CHECKSUM = "supermask_fx.content_sha256"
HEADER_CHECKSUM = "supermask_fx.header_sha256"


def trained_resnet(seed=0, k=0.3):
    model = popupify(torchvision.models.resnet18(num_classes=10), k=k, seed=seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # move scores (and BN stats) away from their initial values
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
        opt.step()
    return model.eval()


def read(path):
    """(tensors, metadata) of a safetensors file, by the package."""
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


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


def test_file_is_at_most_one_bit_per_weight_plus_bn_stats(saved):
    """Each mask takes the smaller of its bitmap (1 bit per weight) and its Rice code (about H(k) bits per weight)."""
    model, path, size = saved
    assert size == os.path.getsize(path)
    tensors, metadata = read(path)
    state_bytes = sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("state/"))
    assert all(name.startswith(("mask/", "state/")) for name in tensors)
    gated = {gate.name for _, gate in gated_layers(model)}
    stored = {name[len("state/") :] for name in tensors if name.startswith("state/")}
    assert stored and not stored & gated and not any(name.endswith("scores") for name in stored)
    info = json.loads(metadata["supermask_fx"])
    assert info["version"] == 2
    for layer in info["layers"]:
        mask_bytes = tensors[f"mask/{layer['name']}"].numel()
        bitmap_bytes = -(-math.prod(layer["shape"]) // 8)
        assert layer["encoding"] in ("bits", "rice") and mask_bytes <= bitmap_bytes
        assert (layer["encoding"] == "rice") == (mask_bytes < bitmap_bytes)  # a tie keeps the bitmap
    masked = mask_stats(model).numel
    h = -(0.3 * math.log2(0.3) + 0.7 * math.log2(0.7))  # k = 0.3: 0.881 bits of information per weight
    assert (size - state_bytes) * 8 <= 1.02 * h * masked + 8 * 16384  # a few KB of header
    assert size * 8 / masked < 0.95  # BatchNorm statistics included


def test_k_0_3_file_is_smaller_than_k_0_5(saved, tmp_path):
    model, path, size = saved
    half = trained_resnet(k=0.5)
    half_path = tmp_path / "half.safetensors"
    half_size = save_subnetwork(half, half_path)
    assert size < 0.92 * half_size
    tensors, metadata = read(half_path)
    layers = json.loads(metadata["supermask_fx"])["layers"]
    bitmap_bytes = sum(-(-math.prod(layer["shape"]) // 8) for layer in layers)
    mask_bytes = sum(tensors[f"mask/{layer['name']}"].numel() for layer in layers)
    # k = 0.5 stays at 1 bit per weight: bitmaps, except where the last byte holds no minority entry, so that a
    # Rice code with b = 0 (the minority's bitmap, cut after its last entry) is a byte or so shorter
    assert bitmap_bytes - len(layers) <= mask_bytes <= bitmap_bytes
    assert all(layer["encoding"] == "bits" or layer["rice_b"] == 0 for layer in layers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_subnetwork(torchvision.models.resnet18(num_classes=10), half_path).eval()(x), half(x))
        assert torch.equal(load_subnetwork(torchvision.models.resnet18(num_classes=10), path).eval()(x), model(x))


def rewrite(source, target, edit):
    tensors, metadata = read(source)
    info = json.loads(metadata["supermask_fx"])
    edit(info)
    write_file(
        target, tensors, {"supermask_fx": json.dumps(info)}, checksum_key=CHECKSUM, header_checksum_key=HEADER_CHECKSUM
    )


def test_newer_format_version_or_encoding_says_upgrade(saved, tmp_path):
    _, path, _ = saved
    newer = tmp_path / "v3.safetensors"
    rewrite(path, newer, lambda info: info.update(version=3))
    with pytest.raises(SubnetworkFileError, match="format version 3 is newer than this supermask_fx reads.*upgrade"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), newer)
    unknown = tmp_path / "zstd.safetensors"
    rewrite(path, unknown, lambda info: info["layers"][4].update(encoding="zstd"))
    with pytest.raises(SubnetworkFileError, match=r"layer1\.1\.conv2\.weight uses the mask encoding 'zstd'.*upgrade"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), unknown)


def test_pre_release_version_1_is_refused(saved, tmp_path):
    _, path, _ = saved
    old = tmp_path / "v1.safetensors"
    rewrite(path, old, lambda info: info.update(version=1))
    with pytest.raises(SubnetworkFileError, match="format version 1 predates 0.1.0"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), old)


def test_mask_not_matching_its_metadata_is_corrupted(saved, tmp_path):
    _, path, _ = saved
    bad = tmp_path / "m.safetensors"
    rewrite(path, bad, lambda info: info["layers"][2].update(m=info["layers"][2]["m"] + 1))
    with pytest.raises(SubnetworkFileError, match=r"m.safetensors: corrupted mask for layer1\.0\.conv2\.weight"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), bad)


def test_files_laid_out_in_name_order_load(saved, tmp_path):
    """The safetensors package lays data out by dtype, then name; files of the earlier hand-written writer have it
    in name order. Both are the format: the checksums cover whatever layout the file has. Written here by hand
    (name order, checksums by their definition), such a file loads with identical logits."""
    model, path, _ = saved
    tensors, metadata = read(path)
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        blob = t.numpy().tobytes()
        dtype = {torch.uint8: "U8", torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    data = b"".join(blobs)
    meta = {"supermask_fx": metadata["supermask_fx"], CHECKSUM: hashlib.sha256(data).hexdigest()}
    header["__metadata__"] = meta
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    meta[HEADER_CHECKSUM] = hashlib.sha256(canonical).hexdigest()
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    by_name = tmp_path / "by_name.safetensors"
    by_name.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    assert by_name.read_bytes() != path.read_bytes()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_subnetwork(torchvision.models.resnet18(num_classes=10), by_name).eval()(x), model(x))


def test_wrong_architecture_names_what_differs(saved):
    _, path, _ = saved
    with pytest.raises(SubnetworkFileError, match=r"another architecture.*fc.weight: shape \(10, 512\) in the file"):
        load_subnetwork(torchvision.models.resnet18(num_classes=7), path)
    with pytest.raises(SubnetworkFileError, match="another architecture.*(missing from the model|lacks state entries)"):
        load_subnetwork(torchvision.models.resnet34(num_classes=10), path)  # resnet18's layers exist in resnet34
    with pytest.raises(
        SubnetworkFileError, match=r"another architecture.*layer1.0.conv1.weight: missing from the model"
    ):
        load_subnetwork(torchvision.models.resnet18(num_classes=10).layer1, path)  # a part of the architecture


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


def test_header_edits_are_caught_by_the_header_checksum(saved, tmp_path):
    """The header is covered too: a changed config value (k 0.3 -> 0.5 loaded silently before, the masks being
    stored), the model class, a dtype in the safetensors header: each a SubnetworkFileError naming the file."""
    _, path, _ = saved
    data = path.read_bytes()
    for old, new in [(b'\\"k\\": 0.3', b'\\"k\\": 0.5'), (b"resnet.ResNet", b"resnet.ResNeT"), (b'"U8"', b'"I8"')]:
        assert old in data[: 8 + int.from_bytes(data[:8], "little")], old
        bad = tmp_path / "edited.safetensors"
        bad.write_bytes(data.replace(old, new, 1))
        with pytest.raises(SubnetworkFileError, match=r"edited.safetensors: corrupted: the header does not match"):
            load_subnetwork(torchvision.models.resnet18(num_classes=10), bad)
    size = int.from_bytes(data[:8], "little")  # the checksum by hand, as docs/file-formats.md gives it
    header = json.loads(data[8 : 8 + size])
    stored = header["__metadata__"].pop(HEADER_CHECKSUM)
    assert stored == hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_missing_checksums_are_named_not_called_a_mismatch(saved, tmp_path):
    _, path, _ = saved
    tensors, metadata = read(path)
    bare = tmp_path / "bare.safetensors"
    write_file(bare, tensors, {"supermask_fx": metadata["supermask_fx"]})
    with pytest.raises(SubnetworkFileError, match=r"bare.safetensors: corrupted: the header checksum .* is missing; "):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), bare)
    no_data_sum = tmp_path / "nodata.safetensors"
    write_file(no_data_sum, tensors, {"supermask_fx": metadata["supermask_fx"]}, header_checksum_key=HEADER_CHECKSUM)
    with pytest.raises(SubnetworkFileError, match=r"nodata.safetensors: corrupted: the data checksum .* is missing"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), no_data_sum)
    renamed = tmp_path / "renamed.safetensors"  # a damaged key name: not an older file, a damaged one
    metadata = {"supermask_fx": metadata["supermask_fx"], "supermask_fx.header_sha257": "0"}
    write_file(renamed, tensors, metadata, checksum_key=CHECKSUM)
    with pytest.raises(SubnetworkFileError, match=r"header checksum .* is missing \(metadata keys"):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), renamed)


def test_files_without_the_header_checksum_are_refused(saved, tmp_path):
    """No released file lacks the header checksum: one without it is refused, even when everything else is intact
    (the data checksum matches, the masks agree with the header), so an edited header cannot pass itself off as a
    file of an older format. The issue's case: k changed in the header (0.3 -> 0.5) and the checksum key removed,
    which used to load and report k=0.5 over masks that keep 30 %."""
    _, path, _ = saved
    tensors, metadata = read(path)
    info = json.loads(metadata["supermask_fx"])
    for name, meta in [
        ("intact", metadata["supermask_fx"]),
        ("edited", json.dumps({**info, "config": {**info["config"], "k": 0.5}})),
    ]:
        target = tmp_path / f"{name}.safetensors"
        write_file(target, tensors, {"supermask_fx": meta}, checksum_key=CHECKSUM)
        assert set(read(target)[1]) == {"supermask_fx", CHECKSUM}
        with pytest.raises(
            SubnetworkFileError,
            match=rf"{name}.safetensors: corrupted: the header checksum \({HEADER_CHECKSUM}\) is missing",
        ):
            load_subnetwork(torchvision.models.resnet18(num_classes=10), target)


def test_kept_counts_that_k_does_not_give_are_refused(saved, tmp_path):
    """A file whose header says another k than its masks keep, checksums recomputed (a forged or mis-written
    file): each layer's kept count must be what top-k keeps at the header's k, int((1 - k) * n) dropped of n."""
    model, path, _ = saved
    first = next(iter(gated_layers(model)))[1].name  # conv1.weight, 64 * 3 * 7 * 7 = 9408 weights
    assert first == "conv1.weight"
    kept_at_half = 9408 - int(0.5 * 9408)  # 4704
    kept_at_0_3 = 9408 - int((1 - 0.3) * 9408)  # 2823: what the file's masks keep
    edited = tmp_path / "k.safetensors"
    rewrite(path, edited, lambda info: info["config"].update(k=0.5))
    with pytest.raises(
        SubnetworkFileError,
        match=rf"k.safetensors: corrupted: conv1.weight keeps {kept_at_0_3:,} weights in the file, but k=0.5 keeps "
        rf"exactly {kept_at_half:,}",
    ):
        load_subnetwork(torchvision.models.resnet18(num_classes=10), edited)
    # and the file's own count is the one k = 0.3 gives: the unedited file passes the same check
    layer = json.loads(read(path)[1]["supermask_fx"])["layers"][0]
    assert layer["name"] == "conv1.weight" and layer["kept"] == kept_at_0_3


def test_global_scope_and_sampled_files_pass_the_kept_count_check(tmp_path):
    """The check follows each method's rule: scope="global" keeps kept_count over all layers together (each layer
    keeps its own share), "sampled" keeps what its threshold gives (no count to check); both load."""
    torch.manual_seed(0)
    for options in ({"scope": "global"}, {"method": "sampled"}):
        model = popupify(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4)), k=0.3, seed=2, **options)
        target = tmp_path / "model.safetensors"
        save_subnetwork(model.eval(), target)
        kept = [layer["kept"] for layer in json.loads(read(target)[1]["supermask_fx"])["layers"]]
        if options.get("scope") == "global":  # not each layer's own k share: a per-layer check would refuse it
            assert sum(kept) == 280 - int(0.7 * 280) and kept[0] != 200 - int(0.7 * 200)
        fresh = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
        x = torch.randn(3, 10)
        with torch.no_grad():
            assert torch.equal(load_subnetwork(fresh, target).eval()(x), model(x))


def test_damaged_fields_are_named(saved, tmp_path):
    """A damaged field in a file whose checksums match (a bug in a writer) is a SubnetworkFileError naming the
    file, not a bare JSONDecodeError, KeyError or ValueError."""
    _, path, _ = saved
    tensors, metadata = read(path)
    info = json.loads(metadata["supermask_fx"])
    edits = {
        "not valid JSON": metadata["supermask_fx"][:-1],
        "has no config": json.dumps({key: value for key, value in info.items() if key != "config"}),
        "invalid config": json.dumps({**info, "config": {**info["config"], "k": "0.3"}}),
        "invalid config.*scope": json.dumps({**info, "config": {**info["config"], "scope": "glob"}}),
        "no list of layers": json.dumps({**info, "layers": {}}),
        "layer entry 3 .*shape": json.dumps(
            {**info, "layers": info["layers"][:3] + [{**info["layers"][3], "shape": "3"}]}
        ),
        "layer entry 0 .*kept": json.dumps(
            {**info, "layers": [{**info["layers"][0], "kept": None}] + info["layers"][1:]}
        ),
        "unknown format": json.dumps({**info, "version": "2"}),
    }
    for message, meta in edits.items():
        damaged = tmp_path / "damaged.safetensors"
        write_file(damaged, tensors, {"supermask_fx": meta}, checksum_key=CHECKSUM, header_checksum_key=HEADER_CHECKSUM)
        with pytest.raises(SubnetworkFileError, match=f"damaged.safetensors: .*{message}"):
            load_subnetwork(torchvision.models.resnet18(num_classes=10), damaged)


def test_not_a_subnetwork_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    write_file(plain, {"x": torch.zeros(3)}, {})
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
    tensors, metadata = read(path)
    info = json.loads(metadata["supermask_fx"])
    info["layers"][3]["sha256"] = "0" * 64  # as if this torch's RNG drew other weights
    forged = tmp_path / "forged.safetensors"
    write_file(
        forged, tensors, {"supermask_fx": json.dumps(info)}, checksum_key=CHECKSUM, header_checksum_key=HEADER_CHECKSUM
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

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SubnetworkFileError, match=r"cannot write .*keep.safetensors: no space left on device") as error:
        save_subnetwork(model, target)
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == 28
    assert "previous keep.safetensors is unchanged" in str(error.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]  # no temporary left behind


def test_save_refuses_retrained_weights_and_dense():
    model = popupify(nn.Sequential(nn.Linear(4, 4)), k=0.5)
    with torch.no_grad():
        model[0]._parameters["weight"].neg_()  # other weights of the same form (also under weight_storage="bits")
    with pytest.raises(ValueError, match="not the ones seed 0 gives"):
        save_subnetwork(model, "unused.safetensors")
    with pytest.raises(ValueError, match="dense"):
        save_subnetwork(popupify(nn.Linear(4, 4), k=0.5, method="dense"), "unused.safetensors")


def test_non_regenerable_parameters_are_stored(tmp_path):
    """ViT-style parameters (position embeddings) cannot be redrawn from the seed: the file keeps them."""
    model = popupify(torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5), k=0.5).eval()
    path = tmp_path / "vit.safetensors"
    save_subnetwork(model, path)
    tensors, _ = read(path)
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


def test_load_installs_the_files_masks_without_selecting_any(saved, monkeypatch):
    """The masks come from the file: no top-k is computed only to be overwritten (a WRN-50-2 file's load peak
    held every layer's selected mask besides the file's). Loading into a channels_last model keeps its layout."""
    model, path, _ = saved
    fresh = popupify(torchvision.models.resnet18(num_classes=10), k=0.3, seed=0).to(memory_format=torch.channels_last)
    methods = {type(gate.method) for _, gate in gated_layers(fresh)}

    def no_selection(self, gate, module):
        raise AssertionError(f"{gate.name}: a mask was selected during load_subnetwork")

    for method in methods:
        monkeypatch.setattr(method, "eval_mask", no_selection)
    load_subnetwork(fresh, path)
    monkeypatch.undo()
    for (module, gate), (saved_module, saved_gate) in zip(gated_layers(fresh), gated_layers(model), strict=True):
        mask, weight = module._buffers[gate.mask_buffer], module._parameters[gate.param]
        assert mask.dtype == torch.bool and mask.stride() == weight.stride()
        assert torch.equal(mask, saved_gate.current_mask(saved_module))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # channels_last convolutions round differently: close, not bit-equal
        torch.testing.assert_close(fresh.eval()(x), model(x))
