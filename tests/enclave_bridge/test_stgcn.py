"""ST-GCN: graph facts of the reference, parameter counts, shapes, strict loading, BN folding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from enclave_bridge.measured.stgcn import STGCN, Graph, fold_batchnorm, load_label_map
from enclave_bridge.shared.errors import CheckpointError

# --- graph facts (reference behaviour, max_hop=1 quirk included) ---------------------------


@pytest.mark.parametrize(
    ("layout", "strategy", "shape", "sums", "nonzeros"),
    [
        ("openpose", "spatial", (3, 18, 18), [6.666667, 8.583333, 2.75], [18, 25, 9]),
        ("openpose", "uniform", (1, 18, 18), [18.0], [52]),
        ("openpose", "distance", (2, 18, 18), [6.666667, 11.333333], None),
        ("ntu-rgb+d", "spatial", (3, 25, 25), [8.95, 13.3, 2.75], [25, 40, 8]),
    ],
)
def test_adjacency_matches_reference_facts(layout, strategy, shape, sums, nonzeros):
    g = Graph(layout, strategy)
    assert g.A.shape == shape
    np.testing.assert_allclose(g.A.sum(axis=(1, 2)), sums, atol=1e-6)
    if nonzeros is not None:
        assert list((g.A != 0).sum(axis=(1, 2))) == nonzeros


def test_graph_centres_and_sizes():
    assert (Graph("openpose").num_node, Graph("openpose").center) == (18, 1)
    assert (Graph("ntu-rgb+d").num_node, Graph("ntu-rgb+d").center) == (25, 20)


def test_unknown_layout_and_strategy_are_rejected():
    with pytest.raises(ValueError, match="layout"):
        Graph("coco-17")
    with pytest.raises(ValueError, match="strategy"):
        Graph("openpose", "random")


# --- architecture --------------------------------------------------------------------------


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_kinetics_model_has_reference_tensor_and_parameter_counts():
    m = STGCN(400)
    keys = [k for k in m.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 149
    assert _n_params(m) == 3_177_140
    # Spot-check reference key names and shapes.
    sd = m.state_dict()
    assert sd["A"].shape == (3, 18, 18)
    assert sd["data_bn.running_mean"].shape == (54,)
    assert sd["st_gcn_networks.0.gcn.conv.weight"].shape == (192, 3, 1, 1)
    assert sd["st_gcn_networks.4.residual.0.weight"].shape == (128, 64, 1, 1)
    assert sd["st_gcn_networks.7.tcn.2.weight"].shape == (256, 256, 9, 1)
    assert sd["edge_importance.9"].shape == (3, 18, 18)
    assert sd["fcn.weight"].shape == (400, 256, 1, 1)
    assert "st_gcn_networks.1.residual.0.weight" not in sd  # identity residual has no tensors


def test_ntu_model_parameter_count_differs_only_by_graph_and_classes():
    m = STGCN(60, layout="ntu-rgb+d")
    assert m.state_dict()["A"].shape == (3, 25, 25)
    assert m.state_dict()["data_bn.weight"].shape == (75,)
    no_imp = STGCN(60, layout="ntu-rgb+d", edge_importance_weighting=False)
    assert _n_params(m) - _n_params(no_imp) == 10 * 3 * 25 * 25


@pytest.mark.parametrize(("n", "t", "m"), [(1, 300, 2), (2, 64, 1), (3, 31, 3), (1, 9, 2)])
def test_output_shapes(n, t, m):
    model = STGCN(7).eval()
    with torch.no_grad():
        out = model(torch.randn(n, 3, t, 18, m))
    assert out.shape == (n, 7)
    assert torch.isfinite(out).all()


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected input \(N, 3, T, 18, M\)"):
        STGCN(5)(torch.randn(1, 3, 20, 25, 1))


# --- an independent functional reference forward ------------------------------------------


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Reference st-gcn forward written directly from state_dict tensors (no STGCN code).

    data_bn over channel v*C+c of the (N·M, V·C, T) view; per block: conv1x1 → K partitions →
    einsum with A·importance → BN → ReLU → 9x1 conv (stride) → BN, + residual, ReLU; avg pool,
    mean over persons, 1x1 conv.
    """

    def bn(z, p):
        return F.batch_norm(
            z,
            sd[p + ".running_mean"],
            sd[p + ".running_var"],
            sd[p + ".weight"],
            sd[p + ".bias"],
            training=False,
            eps=1e-5,
        )

    n, c, t, v, m = x.shape
    a = sd["A"]
    k = a.shape[0]
    h = x.permute(0, 4, 3, 1, 2).reshape(n * m, v * c, t)
    h = bn(h, "data_bn").view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
    strides = [1, 1, 1, 1, 2, 1, 1, 2, 1, 1]
    for i, s in enumerate(strides):
        p = f"st_gcn_networks.{i}"
        if i == 0:
            res = 0
        elif p + ".residual.0.weight" in sd:
            res = bn(
                F.conv2d(h, sd[p + ".residual.0.weight"], sd[p + ".residual.0.bias"], (s, 1)),
                p + ".residual.1",
            )
        else:
            res = h
        y = F.conv2d(h, sd[p + ".gcn.conv.weight"], sd[p + ".gcn.conv.bias"])
        y = y.view(y.shape[0], k, -1, y.shape[2], v)
        y = torch.einsum("nkctv,kvw->nctw", y, a * sd[f"edge_importance.{i}"])
        y = torch.relu(bn(y, p + ".tcn.0"))
        y = bn(F.conv2d(y, sd[p + ".tcn.2.weight"], sd[p + ".tcn.2.bias"], (s, 1), (4, 0)), p + ".tcn.3")
        h = torch.relu(y + res)
    h = h.mean(dim=(2, 3)).view(n, m, -1).mean(dim=1)
    return h @ sd["fcn.weight"][:, :, 0, 0].T + sd["fcn.bias"]


def randomise(model: STGCN, seed: int = 0) -> STGCN:
    """Random weights *and* random BN running statistics / edge importance (not the init values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name == "A" or name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
            elif name.startswith("edge_importance") or (
                ".tcn.0." in name or ".tcn.3." in name or "data_bn" in name or "residual.1" in name
            ):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / fan_in**0.5)
    return model.eval()


@pytest.fixture(scope="module")
def random_model() -> STGCN:
    return randomise(STGCN(12).double())


def test_forward_equals_independent_reference(random_model):
    x = torch.randn(2, 3, 40, 18, 2, dtype=torch.float64)
    sd = {k: v for k, v in random_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    with torch.no_grad():
        ours = random_model(x)
        ref = reference_forward(sd, x)
    assert (ours - ref).abs().max().item() < 1e-10


# --- checkpoints ---------------------------------------------------------------------------


def test_reference_state_dict_roundtrip_without_num_batches_tracked(tmp_path: Path, random_model):
    sd = {k: v for k, v in random_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "st_gcn.ref.pt"
    torch.save(sd, path)
    loaded = STGCN.from_checkpoint(path).double().eval()
    assert loaded.num_class == 12
    x = torch.randn(1, 3, 30, 18, 2, dtype=torch.float64)
    with torch.no_grad():
        assert (loaded(x) - random_model(x)).abs().max().item() < 1e-4
        assert (loaded(x) - reference_forward(sd, x)).abs().max().item() < 1e-4


def test_strict_loading_of_fresh_model_state_dict(tmp_path: Path):
    m = STGCN(5)
    path = tmp_path / "fresh.pt"
    torch.save({"state_dict": m.state_dict()}, path)
    loaded = STGCN.from_checkpoint(path, num_class=5)
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_ntu_layout_is_inferred_from_the_checkpoint(tmp_path: Path):
    path = tmp_path / "ntu.pt"
    torch.save(STGCN(60, layout="ntu-rgb+d").state_dict(), path)
    assert STGCN.from_checkpoint(path).layout == "ntu-rgb+d"


def test_malformed_checkpoints_are_rejected_with_the_offending_keys(tmp_path: Path):
    sd = STGCN(5).state_dict()
    bad = dict(sd)
    del bad["st_gcn_networks.3.tcn.2.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["fcn.bias"] = torch.zeros(6)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        STGCN.from_checkpoint(path, num_class=5)
    msg = str(e.value)
    assert "st_gcn_networks.3.tcn.2.weight" in msg
    assert "extra.weight" in msg
    assert "fcn.bias" in msg

    wrong_classes = tmp_path / "k400.pt"
    torch.save(sd, wrong_classes)
    with pytest.raises(CheckpointError, match=r"fcn\.weight"):
        STGCN.from_checkpoint(wrong_classes, num_class=400)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        STGCN.from_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        STGCN.from_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_other_graph_is_rejected(tmp_path: Path):
    path = tmp_path / "uniform.pt"
    torch.save(STGCN(5, strategy="uniform").state_dict(), path)
    with pytest.raises(CheckpointError):
        STGCN.from_checkpoint(path)  # default strategy spatial: A has K=3, file K=1


def test_label_map(tmp_path: Path):
    p = tmp_path / "labels.txt"
    p.write_text("# kinetics subset\nwalking\n\n  running \nfalling\n")
    assert load_label_map(p) == ["walking", "running", "falling"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CheckpointError, match="empty"):
        load_label_map(tmp_path / "empty.txt")


# --- BN folding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "strategy", "importance"),
    [
        ("openpose", "spatial", True),
        ("openpose", "uniform", False),
        ("ntu-rgb+d", "distance", True),
    ],
)
def test_folded_model_matches_unfolded(layout, strategy, importance):
    model = randomise(
        STGCN(9, layout=layout, strategy=strategy, edge_importance_weighting=importance).double(), seed=3
    )
    folded = fold_batchnorm(model)
    v = model.A.shape[1]
    x = torch.randn(2, 3, 37, v, 2, dtype=torch.float64)
    with torch.no_grad():
        err = (model(x) - folded(x)).abs().max().item()
    assert err < 1e-5


def test_folded_model_has_only_linear_tensors_and_expected_shapes(random_model):
    f = fold_batchnorm(random_model)
    assert len(f.blocks) == 10
    b0 = f.blocks[0]
    assert b0.gcn_per_joint and b0.gcn_weight.shape == (3, 64, 3, 18) and b0.residual == "none"
    assert f.blocks[1].gcn_weight.shape == (3, 64, 64) and f.blocks[1].residual == "identity"
    b4 = f.blocks[4]
    assert (b4.stride, b4.residual, b4.res_weight.shape) == (2, "conv", (128, 64))
    assert b4.gcn_bias.shape == (128, 18) and b4.tcn_weight.shape == (128, 128, 9)
    assert f.fcn_weight.shape == (12, 256)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in f.modules())
