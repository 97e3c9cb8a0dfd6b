import pytest
import torch

from clawly.ablate.activations import RunningMean
from clawly.ablate.directions import (
    cosine,
    interpolated_direction,
    orthogonalize_against,
    orthogonalize_categories,
    orthonormalize,
    project_out,
    refusal_directions,
    winsorize,
)


def test_refusal_direction_matches_hand_computed_example():
    # one probe point, d = 3: harmful prompts (2,0,1), (4,0,1); harmless (0,1,1), (0,3,1)
    harmful = torch.tensor([[[2.0, 0, 1]], [[4.0, 0, 1]]])
    harmless = torch.tensor([[[0.0, 1, 1]], [[0.0, 3, 1]]])
    h, g = harmful.mean(0), harmless.mean(0)  # (3,0,1), (0,2,1)
    raw = refusal_directions(h, g, projected=False)
    expected = torch.tensor([3.0, -2.0, 0.0]) / 13**0.5
    torch.testing.assert_close(raw[0], expected.double())
    # projected: remove the component along the harmless mean (0,2,1)/sqrt(5):
    # (3,-2,0) . (0,2,1) = -4  ->  (3,-2,0) + 4/5 (0,2,1) = (3, -0.4, 0.8)
    proj = refusal_directions(h, g, projected=True)
    v = torch.tensor([3.0, -0.4, 0.8])
    torch.testing.assert_close(proj[0], (v / v.norm()).double())
    assert abs(float((proj[0] * g[0].double()).sum())) < 1e-12


def test_running_mean_equals_batch_mean_in_float64():
    torch.manual_seed(0)
    x = torch.randn(103, 4, 8, dtype=torch.float32) * 100 + 1e4
    m = RunningMean()
    for chunk in x.split(10):
        m.update(chunk)
    assert m.count == 103
    assert m.mean.dtype == torch.float64
    torch.testing.assert_close(m.mean, x.double().mean(0), rtol=0, atol=1e-9)
    a, b = RunningMean(), RunningMean()
    a.update(x[:40])
    b.update(x[40:])
    torch.testing.assert_close(a.merged(b).mean, x.double().mean(0), rtol=0, atol=1e-9)


def test_orthogonalize_against_removes_protected_span_and_reports_retained_fraction():
    torch.manual_seed(1)
    protected = torch.randn(2, 3, 16, dtype=torch.float64)  # k=2 directions, P=3 points
    v = torch.randn(1, 3, 16, dtype=torch.float64)
    u, retained = orthogonalize_against(v, protected)
    assert u.shape == v.shape and retained.shape == (1, 3)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(1, 3, dtype=torch.float64))
    assert (u[0] * protected[0]).sum(-1).abs().max() < 1e-10
    assert (u[0] * protected[1]).sum(-1).abs().max() < 1e-10
    # a direction inside the protected span retains (almost) nothing
    inside = (0.3 * protected[0] - 2.0 * protected[1]).unsqueeze(0)
    _, r_inside = orthogonalize_against(inside, protected)
    assert r_inside.max() < 1e-10
    # an orthogonal one retains everything
    second = project_out(protected[1], protected[0])  # Gram-Schmidt by hand
    ortho = project_out(project_out(v[0], protected[0]), second)
    _, r_ortho = orthogonalize_against(ortho.unsqueeze(0), protected)
    torch.testing.assert_close(r_ortho, torch.ones(1, 3, dtype=torch.float64))


def test_orthogonalize_against_nothing_only_normalizes():
    v = torch.tensor([[[3.0, 4.0]]])
    u, retained = orthogonalize_against(v, torch.empty(0, 1, 2))
    torch.testing.assert_close(u, torch.tensor([[[0.6, 0.8]]], dtype=torch.float64))
    assert float(retained) == 1.0


def test_winsorize_clamps_outliers_per_coordinate():
    x = torch.zeros(100, 1, 2)
    x[:, 0, 0] = torch.arange(100.0)
    x[0, 0, 1] = 1e6  # one massive activation
    w = winsorize(x, 0.05)
    assert float(w[0, 0, 1]) == 0.0  # clamped to the 95% quantile of that coordinate
    assert w[:, 0, 0].min() >= 4.9 and w[:, 0, 0].max() <= 94.1
    with pytest.raises(ValueError):
        winsorize(x, 0.5)


def test_interpolated_direction_blends_neighbours_and_clamps():
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(interpolated_direction(d, 0.5), torch.tensor([2**-0.5, 2**-0.5], dtype=torch.float64))
    torch.testing.assert_close(interpolated_direction(d, 7.0), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert float(cosine(d[0], d[1])) == 0.0


def test_orthonormalize_gives_orthonormal_set_with_the_same_span():
    torch.manual_seed(2)
    v = torch.randn(3, 4, 10, dtype=torch.float64)
    q = orthonormalize(v)
    gram = torch.einsum("mpd,npd->pmn", q, q)
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64).expand(4, 3, 3), rtol=0, atol=1e-12)
    # same span: each v is reproduced by its projection onto the q's
    proj = torch.einsum("mpd,npd,npe->mpe", v, q, q)
    torch.testing.assert_close(proj, v, rtol=0, atol=1e-10)
    assert (torch.einsum("mpd,mpd->mp", q, v) >= 0).all()  # signs follow the inputs


def test_orthonormalize_zeroes_a_dependent_direction():
    a = torch.tensor([[[1.0, 0.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0, 0.0]]])
    q = orthonormalize(torch.cat([a, b]))
    torch.testing.assert_close(q[0, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert float(q[1].abs().max()) == 0.0


def test_orthogonalized_category_directions_are_orthogonal_to_every_kept_direction():
    torch.manual_seed(3)
    kept = torch.randn(2, 5, 16, dtype=torch.float64)
    shared = torch.randn(1, 5, 16, dtype=torch.float64)
    removed = 0.7 * shared + 0.3 * torch.randn(3, 5, 16, dtype=torch.float64) + 0.5 * kept[:1]
    q, retained = orthogonalize_categories(removed, kept)
    assert q.shape == removed.shape and retained.shape == (3, 5)
    assert torch.einsum("mpd,kpd->mkp", q, kept).abs().max() < 1e-10
    gram = torch.einsum("mpd,npd->pmn", q, q)
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64).expand(5, 3, 3), rtol=0, atol=1e-10)
    assert ((retained > 0) & (retained < 1)).all()
