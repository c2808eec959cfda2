r"""Tests for the denoiser backbones in `plausible.nets`."""

import json

import pytest
import torch

from plausible.nets import ResMLP, TimeEmbedding, UNet

SMALL = {"hidden_channels": (8, 16, 16), "hidden_blocks": 1, "embedding": 16}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_time_embedding_shapes_and_broadcast():
    emb = TimeEmbedding(32)
    t = torch.linspace(-3, 3, 5)

    assert emb(t).shape == (5, 32)
    assert emb(torch.tensor(0.5), batch=7).shape == (7, 32)
    assert emb(torch.tensor(0.5)).shape == (1, 32)

    # a 0-d t broadcast to the batch equals the same value repeated
    out = emb(torch.tensor(0.5), batch=3)
    torch.testing.assert_close(out, emb(torch.full((3,), 0.5)))

    # different times give different embeddings
    assert (emb(t)[1:] - emb(t)[:-1]).abs().amax(dim=-1).min() > 1e-3

    with pytest.raises(ValueError):
        emb(torch.zeros(4), batch=5)
    with pytest.raises(ValueError):
        emb(torch.zeros(2, 3))


# --------------------------------------------------------------------------- ResMLP


def test_resmlp_shapes():
    net = ResMLP(5, hidden=32, blocks=2)
    assert net.shape == (5,)

    x = torch.randn(7, 5)
    assert net(x, torch.randn(7)).shape == (7, 5)
    assert net(x, torch.tensor(0.0)).shape == (7, 5)
    assert net(x, 0.0).shape == (7, 5)

    # output is not zero-initialised: O(1) at init
    assert net(x, 0.0).std() > 0.1

    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        net(torch.randn(7, 4), 0.0)


def test_resmlp_time_changes_output():
    net = ResMLP(4, hidden=32, blocks=2)
    x = torch.randn(6, 4)
    y0 = net(x, torch.full((6,), -1.0))
    y1 = net(x, torch.full((6,), 1.0))
    assert (y0 - y1).abs().max() > 1e-2

    # per-sample t is used per sample
    t = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    y = net(x, t)
    torch.testing.assert_close(y[0::2], y0[0::2])
    torch.testing.assert_close(y[1::2], y1[1::2])


def test_resmlp_context():
    net = ResMLP(3, hidden=32, blocks=2, context=2)
    x, t = torch.randn(4, 3), torch.zeros(4)

    y0 = net(x, t, torch.zeros(4, 2))
    y1 = net(x, t, torch.ones(4, 2))
    assert (y0 - y1).abs().max() > 1e-2

    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        net(x, t)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        net(x, t, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        net(x, t, torch.zeros(2))

    plain = ResMLP(3, hidden=32, blocks=2)
    with pytest.raises(ValueError, match="without context"):
        plain(x, t, torch.zeros(4, 2))


def _assert_round_trip(net, *inputs):
    config = json.loads(json.dumps(net.config))  # JSON-serialisable
    copy = type(net)(**config)
    assert copy.config == net.config

    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in copy.state_dict().items()} == shapes

    net.eval()
    copy.eval()
    with torch.no_grad():
        assert not torch.allclose(copy(*inputs), net(*inputs))  # independent init
        copy.load_state_dict(net.state_dict())
        torch.testing.assert_close(copy(*inputs), net(*inputs), rtol=0, atol=0)


def test_resmlp_config_round_trip():
    net = ResMLP(3, hidden=16, blocks=2, context=4, embedding=8, dropout=0.1)
    _assert_round_trip(net, torch.randn(5, 3), torch.randn(5), torch.randn(5, 4))


def test_resmlp_overfits():
    net = ResMLP(4, hidden=64, blocks=2, embedding=32)
    x = torch.randn(64, 4)
    t = torch.rand(64) * 6 - 3
    target = torch.sin(2 * x) * torch.cos(t).unsqueeze(-1) + x.roll(1, dims=-1) * t.unsqueeze(-1)

    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = (net(x, t) - target).square().mean().item()
    for _ in range(200):
        loss = (net(x, t) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = (net(x, t) - target).square().mean().item()

    assert final < initial / 10, (initial, final)


# --------------------------------------------------------------------------- UNet


@pytest.mark.parametrize(
    "spatial, size",
    [(1, (32,)), (1, (12,)), (2, (16, 8)), (2, (4, 12)), (3, (8, 4, 4))],
)
def test_unet_shapes(spatial, size):
    net = UNet(2, 3, spatial=spatial, **SMALL)
    assert net.shape is None

    x = torch.randn(2, 2, *size)
    assert net(x, torch.randn(2)).shape == (2, 3, *size)
    assert net(x, torch.tensor(0.3)).shape == (2, 3, *size)


def test_unet_attention_and_blocks():
    net = UNet(
        3,
        hidden_channels=(8, 16, 32),
        hidden_blocks=(1, 2, 1),
        attention=[2],
        heads=4,
        spatial=2,
        embedding=16,
    )
    x = torch.randn(2, 3, 8, 12)
    y = net(x, torch.zeros(2))
    assert y.shape == x.shape
    assert y.std() > 0.1  # output not zero-initialised

    with pytest.raises(ValueError, match="heads"):
        UNet(3, hidden_channels=(8, 12), attention=[1], heads=8)
    with pytest.raises(ValueError, match="attention"):
        UNet(3, hidden_channels=(8, 12), attention=[2])
    with pytest.raises(ValueError, match="hidden_blocks"):
        UNet(3, hidden_channels=(8, 12), hidden_blocks=(1, 2, 3))
    with pytest.raises(ValueError, match="padding"):
        UNet(3, padding="reflect")
    with pytest.raises(ValueError, match="kernel_size"):
        UNet(3, kernel_size=4)


def test_unet_bad_size():
    net = UNet(1, spatial=1, **SMALL)  # 3 levels -> divisor 4
    with pytest.raises(ValueError, match=r"\(30,\).*4"):
        net(torch.randn(2, 1, 30), torch.zeros(2))

    net2d = UNet(1, spatial=2, **SMALL)
    with pytest.raises(ValueError, match=r"\(8, 6\).*4"):
        net2d(torch.randn(2, 1, 8, 6), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        net2d(torch.randn(2, 1, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        net2d(torch.randn(2, 2, 8, 8), torch.zeros(2))


@pytest.mark.parametrize("spatial, size", [(1, (32,)), (2, (16, 12))])
def test_unet_circular_roll_equivariance(spatial, size):
    net = UNet(2, spatial=spatial, padding="circular", **SMALL).eval()
    x = torch.randn(2, 2, *size)
    t = torch.tensor([-1.0, 0.5])
    dims = tuple(range(2, 2 + spatial))
    shifts = tuple(4 * (k + 1) for k in range(spatial))  # multiples of 2 ** (levels - 1) = 4

    with torch.no_grad():
        y = net(x, t)
        y_rolled = net(x.roll(shifts, dims), t)

    assert y.abs().max() > 0.1
    torch.testing.assert_close(y_rolled, y.roll(shifts, dims), rtol=1e-4, atol=1e-5)


def test_unet_circular_roll_equivariance_with_attention():
    # self-attention has no positional encoding, so equivariance is preserved
    net = UNet(2, spatial=2, padding="circular", attention=[2], heads=2, **SMALL).eval()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        y = net(x, 0.0)
        y_rolled = net(x.roll((4, -8), (2, 3)), 0.0)
    torch.testing.assert_close(y_rolled, y.roll((4, -8), (2, 3)), rtol=1e-4, atol=1e-5)


def test_unet_zeros_padding_not_roll_equivariant():
    net = UNet(2, spatial=2, padding="zeros", **SMALL).eval()
    x = torch.randn(2, 2, 16, 16)
    shifts, dims = (4, 8), (2, 3)
    with torch.no_grad():
        y = net(x, 0.0)
        y_rolled = net(x.roll(shifts, dims), 0.0)

    error = (y_rolled - y.roll(shifts, dims)).abs().max()
    assert error > 0.1 * y.abs().max(), error


def test_unet_time_changes_output():
    net = UNet(2, spatial=1, **SMALL).eval()
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        y0 = net(x, torch.tensor(-2.0))
        y1 = net(x, torch.tensor(2.0))
        y = net(x, torch.tensor([-2.0, 2.0, -2.0]))
    assert (y0 - y1).abs().max() > 1e-2
    torch.testing.assert_close(y[0], y0[0])
    torch.testing.assert_close(y[1], y1[1])


def test_unet_context():
    net = UNet(2, spatial=1, context=3, **SMALL).eval()
    x, t = torch.randn(4, 2, 16), torch.zeros(4)
    with torch.no_grad():
        y0 = net(x, t, torch.zeros(4, 3))
        y1 = net(x, t, torch.ones(4, 3))
    assert (y0 - y1).abs().max() > 1e-2

    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        net(x, t)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        net(x, t, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        net(x, t, torch.zeros(3, 3))

    plain = UNet(2, spatial=1, **SMALL)
    with pytest.raises(ValueError, match="without context"):
        plain(x, t, torch.zeros(4, 3))


def test_unet_config_round_trip():
    net = UNet(
        2,
        1,
        hidden_channels=(8, 16),
        hidden_blocks=(1, 2),
        spatial=2,
        padding="zeros",
        attention=(1,),
        heads=2,
        context=3,
        embedding=16,
        kernel_size=5,
    )
    assert isinstance(net.config["hidden_channels"], list)
    assert isinstance(net.config["attention"], list)
    _assert_round_trip(net, torch.randn(2, 2, 8, 8), torch.randn(2), torch.randn(2, 3))
