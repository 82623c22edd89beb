import math

import pytest
import torch

from mar3d.schedules import (cfg_scale_at, cosine_alphas_cumprod, respaced_timesteps, sample_mask_ratio,
                             tokens_per_step)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 32, 128, 256, 1024])
@pytest.mark.parametrize("steps", [1, 2, 4, 16, 64])
def test_mask_schedule_decodes_everything_few_first(seq_len, steps):
    steps = min(steps, seq_len)  # the sampler never runs more steps than tokens
    counts = tokens_per_step(seq_len, steps)
    assert len(counts) == steps
    assert sum(counts) == seq_len                     # every token decoded once: the last step clears the mask
    assert all(c >= 1 for c in counts)                # every step decodes something
    assert all(a <= b for a, b in zip(counts, counts[1:])), counts  # never fewer later
    if steps >= 8 and seq_len >= 8 * steps:           # cosine shape: the last step decodes far more than the first
        assert counts[-1] > 4 * counts[0]


def test_mask_schedule_rejects_more_steps_than_tokens():
    with pytest.raises(ValueError):
        tokens_per_step(8, 9)


def test_cfg_ramp_endpoints():
    assert cfg_scale_at(4.0, masked_after=256, seq_len=256) == 1.0  # nothing decoded yet: no guidance
    assert cfg_scale_at(4.0, masked_after=0, seq_len=256) == 4.0    # all decoded: full guidance
    assert cfg_scale_at(4.0, masked_after=128, seq_len=256) == pytest.approx(2.5)
    assert cfg_scale_at(1.0, masked_after=10, seq_len=256) == 1.0


def test_mask_ratio_sampler_bounds_and_mean():
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(g) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 − 0.25·(φ(0) − φ(−1.2)) / (Φ(0) − Φ(−1.2))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    expected = 1 - 0.25 * (phi(0) - phi(-1.2)) / (0.5 - 0.5 * (1 + math.erf(-1.2 / math.sqrt(2))))
    assert ratios.mean().item() == pytest.approx(expected, abs=0.005)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert sample_mask_ratio(g1) == sample_mask_ratio(g2)


def test_cosine_noise_schedule():
    acp = cosine_alphas_cumprod(1000)
    assert acp.shape == (1000,)
    assert 0.999 < acp[0] < 1.0 and acp[-1] < 1e-6
    assert torch.all(acp[1:] < acp[:-1])
    # f(t)/f(0) of the cosine schedule at the midpoint
    s = 0.008
    mid = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert acp[499].item() == pytest.approx(mid, rel=0.01)


def test_respacing():
    t = respaced_timesteps(1000, 100)
    assert len(t) == 100 and t[0] == 0 and t[-1] == 999 and torch.all(t[1:] > t[:-1])
    with pytest.raises(ValueError):
        respaced_timesteps(1000, 0)
