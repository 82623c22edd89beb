import pytest
import torch

from mar3d.diffusion import DiffLoss, Diffusion


def test_full_schedule_posterior_is_consistent():
    """With all 1000 steps, the respaced quantities equal the plain DDPM ones."""
    d = Diffusion.cosine(1000)
    alphas = 1 - d.betas
    torch.testing.assert_close(torch.cumprod(alphas, 0), d.acp)
    # noise-free x_t = √ᾱ_t·x_0 must have posterior mean √ᾱ_{t−1}·x_0 (for every respacing)
    for steps in (1000, 100, 7):
        r = Diffusion.cosine(1000, steps)
        torch.testing.assert_close(r.coef_x0 + r.coef_xt * r.acp.sqrt(), r.acp_prev.sqrt())


@pytest.mark.slow
def test_head_is_zero_initialised_and_learns_a_2d_gaussian():
    """The head learns a toy 2-D distribution: sample mean and covariance within tolerance."""
    torch.manual_seed(0)
    head = DiffLoss(token_dim=2, z_dim=4, width=64, depth=2)
    assert torch.all(head.net(torch.randn(5, 2), torch.arange(5), torch.randn(5, 4)) == 0)
    mean = torch.tensor([1.0, -2.0])
    chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(700):
        x = mean + torch.randn(256, 2) @ chol.T
        loss = head.loss(x, torch.zeros(256, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = head.sample(torch.zeros(4000, 4), steps=50, generator=torch.Generator().manual_seed(0))
    print("sample mean", samples.mean(0), "cov", torch.cov(samples.T))
    torch.testing.assert_close(samples.mean(0), mean, atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), chol @ chol.T, atol=0.2, rtol=0)


@pytest.mark.slow
def test_head_uses_its_condition_and_cfg():
    """Two conditions → two modes; guidance pushes samples further from the unconditional mean."""
    torch.manual_seed(0)
    head = DiffLoss(token_dim=1, z_dim=2, width=32, depth=2)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    z_a, z_b, z_null = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.zeros(2)
    for _ in range(500):
        which = torch.randint(0, 3, (256,))
        target = torch.where(which == 0, 2.0, -2.0)[:, None] + 0.1 * torch.randn(256, 1)
        target = torch.where(which[:, None] == 2, torch.randn(256, 1) * 2, target)  # "unconditional"
        z = torch.stack([z_a, z_b, z_null])[which]
        loss = head.loss(target, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = lambda: torch.Generator().manual_seed(1)
    a = head.sample(z_a.expand(500, 2), steps=25, generator=g())
    b = head.sample(z_b.expand(500, 2), steps=25, generator=g())
    assert a.mean() > 1.5 and b.mean() < -1.5
    guided = head.sample(torch.cat([z_a.expand(500, 2), z_null.expand(500, 2)]), cfg=3.0, steps=25, generator=g())
    assert guided.shape == (500, 1)
    # same seed and settings → identical samples
    torch.testing.assert_close(head.sample(z_a.expand(500, 2), steps=25, generator=g()), a)
